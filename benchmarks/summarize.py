"""Summarize a pytest-benchmark JSON of this suite (or a ``pyadvk bench`` bench.json) as the
markdown table ``pyadvk bench`` prints.

    python benchmarks/summarize.py results.json
"""

from __future__ import annotations

import argparse
import json

from benchmarks.report import rows_from_pytest, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output, or bench.json")
    args = parser.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    rows = data["rows"] if "rows" in data else rows_from_pytest(data)
    machine = data.get("machine") or data.get("machine_info", {})
    print(f"Machine: {machine.get('gpu') or machine.get('cpu') or '?'}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
