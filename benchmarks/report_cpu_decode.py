"""Markdown table of a bench_cpu_decode.py run: `python benchmarks/report_cpu_decode.py results.json`."""
import json
import sys

MODES = ("plain_stock", "plain_kernel", "steered_stock", "steered_kernel")


def main(path):
    with open(path) as f:
        data = json.load(f)
    cells = {(b["extra_info"]["batch"], b["extra_info"]["mode"]): b for b in data["benchmarks"]}
    info = data["benchmarks"][0]["extra_info"]
    print(f"SmolLM2-135M + LoRA, {info['new_tokens']} new tokens, greedy; {info['machine']}, torch {info['torch']}; "
          "tokens/s from the median of 3 rounds, all cells from one run.\n")
    print("| batch | plain, stock | plain + kernel | steered, stock | steered + kernel | steered + kernel / plain stock "
          "| steered stock / plain stock |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in sorted({b for b, _ in cells}):
        tps = {m: batch * info["new_tokens"] / cells[(batch, m)]["stats"]["median"] for m in MODES}
        print(f"| {batch} | {tps['plain_stock']:.1f} | {tps['plain_kernel']:.1f} | {tps['steered_stock']:.1f} | "
              f"{tps['steered_kernel']:.1f} | {tps['steered_kernel'] / tps['plain_stock']:.2f}x | "
              f"{tps['steered_stock'] / tps['plain_stock']:.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report_cpu_decode.py RESULTS.json")
    main(sys.argv[1])
