"""Summarize a pytest-benchmark JSON of bench_pgd_step.py as a markdown table.

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


def power_iteration_table(data: dict) -> str:
    """bench_power_iteration.py: median (and min) per row, speedups of the batched op over the
    per-layer loop, costs relative to forward+backward / a training step, Gram ratios."""
    out = [dict(b["extra_info"], median=b["stats"]["median"], min=b["stats"]["min"])
           for b in data["benchmarks"] if b.get("extra_info", {}).get("suite") == "power_iteration"]
    ref = {r["impl"]: r["median"] for r in out if r["group"] == "reference"}
    loop = next((r for r in out if r["impl"] == "loop"), None)
    lines = ["| group | impl | median ms | min ms | relative |", "|---|---|---:|---:|---|"]
    for r in out:
        rel = ""
        if r["group"] == "reshaped" and loop and r["impl"] != "loop":
            rel = f"{loop['median'] / r['median']:.2f}× faster than loop (min: {loop['min'] / r['min']:.2f}×)"
        elif r["group"] == "true-power" and "forward+backward" in ref:
            rel = f"{100 * r['median'] / ref['forward+backward']:.2f}% of fwd+bwd at batch 128"
        elif r["group"] == "penalty" and "training step" in ref:
            rel = f"{100 * r['median'] / ref['training step']:.2f}% of a training step at batch 128"
        elif r["group"] == "gram":
            q = sorted(r["ratio_bound_over_true"].values())
            rel = f"bound/true per layer: min {q[0]:.3f}, median {q[len(q) // 2]:.3f}, max {q[-1]:.3f}"
        lines.append(f"| {r['group']} | {r['impl']} | {1e3 * r['median']:.2f} | {1e3 * r['min']:.2f} | {rel} |")
    first = out[0] if out else {}
    head = f"Device: {first.get('device', '?')}, {first.get('threads', '?')} CPU threads, {first.get('layers', '?')} layers; "
    head += f"machine: {data.get('machine_info', {}).get('cpu', {}).get('brand_raw', '?')}"
    return head + "\n\n" + "\n".join(lines)


def table(data: dict) -> str:
    if any(b.get("extra_info", {}).get("suite") == "power_iteration" for b in data["benchmarks"]):
        return power_iteration_table(data)
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
