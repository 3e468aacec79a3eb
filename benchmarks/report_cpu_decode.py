"""Markdown table of a bench_cpu_decode.py run: `python benchmarks/report_cpu_decode.py results.json`."""
import json
import statistics
import sys

from bench_cpu_decode import MODES


def main(path):
    with open(path) as f:
        data = json.load(f)
    runs = sorted(data["benchmarks"], key=lambda b: b["extra_info"]["batch"])
    info = runs[0]["extra_info"]
    rounds = len(info["seconds"][MODES[0]])
    print(f"{info.get('model', 'smollm2-135m-instruct')} + LoRA, {info['new_tokens']} new tokens, greedy; {info['machine']}; "
          f"tokens/s from the median of {rounds} rounds, the four modes interleaved in each round, one run; "
          "the last column is the median over rounds of each round's ratio (modes run side by side in time).\n")
    print("| batch | plain, stock | plain + kernel | steered, stock | steered + kernel | steered + kernel / plain stock "
          "| steered stock / plain stock | steered + kernel / plain stock, per round |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        batch, seconds = run["extra_info"]["batch"], run["extra_info"]["seconds"]
        tps = {m: batch * info["new_tokens"] / statistics.median(seconds[m]) for m in MODES}
        print(f"| {batch} | {tps['plain_stock']:.1f} | {tps['plain_kernel']:.1f} | {tps['steered_stock']:.1f} | "
              f"{tps['steered_kernel']:.1f} | {tps['steered_kernel'] / tps['plain_stock']:.2f}x | "
              f"{tps['steered_stock'] / tps['plain_stock']:.2f}x | "
              f"{statistics.median(p / s for p, s in zip(seconds['plain_stock'], seconds['steered_kernel'])):.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report_cpu_decode.py RESULTS.json")
    main(sys.argv[1])
