"""Markdown table of a bench_decode.py run: `python benchmarks/report_decode.py results.json`."""
import json
import sys


def main(path):
    with open(path) as f:
        data = json.load(f)
    cells = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        cells[(info.get("method", "lora"), info["batch"], info["mode"])] = (bench["stats"]["median"], info)
    info = next(iter(cells.values()))[1]
    machine = info["machine"] if "torch" in info["machine"] else f"{info['machine']}, torch {info['torch']}"
    print(f"Decode throughput, {info['new_tokens']} new tokens, greedy; {machine} ({info['device']}); median of the "
          "timed rounds; the three modes of a row come from one run.")
    for note in data.get("notes", []):
        print(f"Note: {note}.")
    print()
    print("| method | batch | (a) plain adapter tok/s | (b) two forwards tok/s | (c) one forward tok/s | (c) / (b) "
          "| (c) / (a) | steer op share of a (c) step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    order = {m: i for i, m in enumerate(("lora", "ia3", "prompt", "ptuning_v2", "dora", "loha", "lokr", "vera", "oft",
                                        "adalora"))}
    for method, batch in sorted({(m, b) for m, b, _ in cells}, key=lambda k: (order.get(k[0], 9), k[1])):
        secs = {mode: cells[(method, batch, mode)][0] for mode in ("plain_adapter", "two_forward", "one_forward")}
        tps = {mode: batch * info["new_tokens"] / s for mode, s in secs.items()}
        step_ms = secs["one_forward"] / info["new_tokens"] * 1e3
        share = cells[(method, batch, "one_forward")][1]["steer_op_ms"] / step_ms
        print(f"| {method} | {batch} | {tps['plain_adapter']:.1f} | {tps['two_forward']:.1f} | {tps['one_forward']:.1f} "
              f"| {tps['one_forward'] / tps['two_forward']:.2f}x | {tps['one_forward'] / tps['plain_adapter']:.2f}x "
              f"| {share:.2%} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report_decode.py RESULTS.json")
    main(sys.argv[1])
