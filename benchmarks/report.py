"""Markdown table of a bench_ops.py run: `python benchmarks/report.py results.json`."""
import json
import sys
from collections import defaultdict


def main(path):
    with open(path) as f:
        data = json.load(f)
    cells = defaultdict(dict)
    machine = None
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        machine = machine or f"{info['machine']} ({info['device']}, torch {info['torch']})"
        key = (info["op"], info["rows"], info["vocab"], info["dtype"])
        cells[key][info["impl"]] = bench["stats"]["median"] * 1e3
    print(f"Median latency in ms, {machine}; ratios measured side by side in one run.\n")
    print("| op | rows x V | dtype | native | reference | ref. compiled | floor | reference / native "
          "| compiled / native | native / floor |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def fmt(x):
        return "" if x is None else f"{x:.3f}"

    def ratio(a, b):
        return "" if a is None or b is None else f"{a / b:.1f}x"

    for (op, rows, vocab, dtype), t in sorted(cells.items()):
        native, eager = t.get("native"), t.get("reference")
        compiled, floor = t.get("reference_compiled"), t.get("floor")
        print(f"| {op} | {rows} x {vocab} | {dtype} | {fmt(native)} | {fmt(eager)} | {fmt(compiled)} | {fmt(floor)} "
              f"| {ratio(eager, native)} | {ratio(compiled, native)} | {ratio(native, floor)} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py RESULTS.json")
    main(sys.argv[1])
