"""Summarize a pytest-benchmark JSON of bench_pgd_step.py (or bench_half_huber.py) as a markdown table.

    python benchmarks/summarize.py results.json

One row per (size, norm, impl): median time, effective bandwidth (3 reads + 1 write per value),
share of the copy bandwidth measured in the same run, and speedup over the unfused chain.
"""

from __future__ import annotations

import argparse
import json


def rows(data: dict) -> list[dict]:
    out = [dict(b["extra_info"], median=b["stats"]["median"]) for b in data["benchmarks"] if b.get("extra_info")]
    unfused = {(r["size"], r["norm"]): r["median"] for r in out if r["impl"] == "unfused"}
    for r in out:
        base = unfused.get((r["size"], r["norm"]))
        r["speedup"] = base / r["median"] if base else float("nan")
    return out


def half_huber_table(data: dict) -> str:
    """bench_half_huber.py: one row per (size, impl), speedup over the composite torch expression."""
    out = [dict(b["extra_info"], median=b["stats"]["median"]) for b in data["benchmarks"]
           if b.get("extra_info", {}).get("bench") == "half_huber"]
    base = {r["size"]: r["median"] for r in out if r["impl"] == "composite"}
    lines = [
        "| size | impl | median ms | GB/s | % of copy | × composite | saved for backward (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in out:
        speedup = base[r["size"]] / r["median"] if r["size"] in base else float("nan")
        lines.append(
            f"| {r['size']} | {r['impl']} | {1e3 * r['median']:.2f} | {r['gbps']:.1f} | "
            f"{r['pct_of_copy']:.0f}% | {speedup:.2f} | {r['saved_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def table(data: dict) -> str:
    if data["benchmarks"] and data["benchmarks"][0].get("extra_info", {}).get("bench") == "half_huber":
        first = data["benchmarks"][0]["extra_info"]
        head = f"Device: {first.get('device', '?')}, {first.get('threads', '?')} CPU threads; "
        head += f"machine: {data.get('machine_info', {}).get('cpu', {}).get('brand_raw', '?')}"
        return head + "\n\n" + half_huber_table(data)
    lines = [
        "| size | norm | impl | median ms | GB/s | % of copy | × unfused |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows(data):
        lines.append(
            f"| {r['size']} | {r['norm']} | {r['impl']} | {1e3 * r['median']:.3f} | {r['gbps']:.1f} | "
            f"{r['pct_of_copy']:.0f}% | {r['speedup']:.2f} |"
        )
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    head = f"Device: {first.get('device', '?')}, {first.get('threads', '?')} CPU threads; "
    head += f"machine: {data.get('machine_info', {}).get('cpu', {}).get('brand_raw', '?')}"
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    args = parser.parse_args()
    with open(args.json) as f:
        print(table(json.load(f)))


if __name__ == "__main__":
    main()
