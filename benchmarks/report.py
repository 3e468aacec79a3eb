"""Markdown tables of a bench_ops.py run: `python benchmarks/report.py results.json`; and
`python benchmarks/report.py --compact results.json ...` to drop the raw samples of any pytest-benchmark
JSON before it is committed (a summary per benchmark stays).

The first table: median latency of each implementation, ratios from the same run. The second, from
test_interleaved_rounds: per contender the median over rounds, and the median of each round's own
ratio (the steadier figure on a machine whose speed drifts).
"""
import json
import statistics
import sys
from collections import defaultdict


def fmt(x):
    return "" if x is None else f"{x:.3f}"


def ratio(a, b):
    return "" if a is None or b is None else f"{a / b:.2f}x"


def main(path):
    with open(path) as f:
        data = json.load(f)
    cells, rounds = defaultdict(dict), {}
    machine = None
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        machine = machine or f"{info['machine']} ({info['device']})"
        key = (info["op"], info["rows"], info["vocab"], info["dtype"])
        if info["impl"] == "rounds":
            rounds[key] = info["rounds_ms"]
        else:
            cells[key][info["impl"]] = bench["stats"]["median"] * 1e3
    isas = sorted({impl.split("-", 1)[1] for t in cells.values() for impl in t if impl.startswith("native-")},
                  reverse=True)
    natives = [f"native-{isa}" for isa in isas] or ["native"]
    print(f"Median latency in ms, {machine}; every figure of a row from one run, side by side.\n")
    head = [n.replace("native-", "native ") for n in natives] + ["reference", "ref. compiled", "copy floor"] + [
        f"exp bound {isa}" for isa in isas]
    ratios = ["compiled / native"] + [f"native / exp bound ({isa})" for isa in isas] + ["native / copy floor"]
    print("| op | rows x V | dtype | " + " | ".join(head + ratios) + " |")
    print("|---|---|---|" + "---:|" * (len(head) + len(ratios)))
    for (op, rows, vocab, dtype), t in sorted(cells.items()):
        if "native" in t:  # ops timed on the default ISA only
            t.setdefault(natives[0], t["native"])
        best = t.get(natives[0])
        values = [t.get(n) for n in natives] + [t.get("reference"), t.get("reference_compiled"), t.get("floor")] + [
            t.get(f"exp_bound-{isa}") for isa in isas]
        row_ratios = [ratio(t.get("reference_compiled"), best)] + [
            ratio(t.get(f"native-{isa}"), t.get(f"exp_bound-{isa}")) for isa in isas] + [ratio(best, t.get("floor"))]
        print(f"| {op} | {rows} x {vocab} | {dtype} | " + " | ".join(map(fmt, values)) + " | "
              + " | ".join(row_ratios) + " |")
    for (op, rows, vocab, dtype), times in sorted(rounds.items()):
        n_rounds = len(next(iter(times.values())))
        print(f"\n{op}, {rows} x {vocab} {dtype}: {n_rounds} rounds, each contender once per round in a rotating "
              f"order; ms (median of the round medians) and the median of the per-round ratios.\n")
        print("| contender | ms | min | max | / compiled reference | / copy floor | / exp bound (same ISA) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, values in times.items():
            isa = name.split("-", 1)[1] if "-" in name else None
            per_round = {}
            for other, key in (("reference_compiled", "compiled"), ("floor", "floor"), (f"exp_bound-{isa}", "exp")):
                if other in times and other != name:
                    per_round[key] = f"{statistics.median(a / b for a, b in zip(values, times[other])):.2f}x"
            print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} | "
                  f"{per_round.get('compiled', '')} | {per_round.get('floor', '')} | "
                  f"{per_round.get('exp', '') if name.startswith('native') else ''} |")
    if rounds:
        print("\nnative: a fresh output tensor each call (as steer_logits without out=); native_out: out= a reused "
              "buffer.")


def compact(path):
    """Rewrites a pytest-benchmark JSON without the raw per-call samples (stats.data), which make up nearly
    all of it; every summary statistic and extra_info stays."""
    with open(path) as f:
        data = json.load(f)
    for bench in data["benchmarks"]:
        bench["stats"].pop("data", None)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 2:
        main(sys.argv[1])
    elif len(sys.argv) > 2 and sys.argv[1] == "--compact":
        for results in sys.argv[2:]:
            compact(results)
    else:
        sys.exit("usage: python benchmarks/report.py RESULTS.json        (the tables)\n"
                 "       python benchmarks/report.py --compact RESULTS.json ...   (drop the raw samples, any "
                 "pytest-benchmark JSON, before committing it)")