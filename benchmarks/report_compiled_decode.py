"""Markdown table of a bench_compiled_decode.py run: `python benchmarks/report_compiled_decode.py results.json`."""
import json
import statistics
import sys

from bench_compiled_decode import MODES


def per_round(seconds, numerator, denominator):
    """The median over rounds of each round's speed ratio (the modes of a round ran side by side in time)."""
    return statistics.median(d / n for n, d in zip(seconds[numerator], seconds[denominator]))


def main(path):
    with open(path) as f:
        data = json.load(f)
    runs = sorted(data["benchmarks"], key=lambda b: b["extra_info"]["batch"])
    info = runs[0]["extra_info"]
    rounds = len(info["seconds"][MODES[0]])
    print(f"{info.get('model', 'SmolLM2-135M')} + LoRA, {info['new_tokens']} new tokens, greedy; {info['machine']}, transformers "
          f"{info['transformers']}; tokens/s from the median of {rounds} rounds, the four modes interleaved in each "
          "round, one run; ratios are medians over rounds of each round's ratio. 'compiled' = "
          "cache_implementation='static' + HF's compile_config (first call, which compiles, not timed: its "
          "seconds in the last column).\n")
    print("| batch | plain eager | plain compiled | steered eager | steered compiled | steered compiled / plain "
          "compiled | steered compiled / steered eager | first call: plain / steered compiled (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        extra = run["extra_info"]
        batch, seconds = extra["batch"], extra["seconds"]
        tps = {m: batch * extra["new_tokens"] / statistics.median(seconds[m]) for m in MODES}
        first = extra["first_call_seconds"]
        print(f"| {batch} | {tps['plain_eager']:.1f} | {tps['plain_compiled']:.1f} | {tps['steered_eager']:.1f} | "
              f"{tps['steered_compiled']:.1f} | {per_round(seconds, 'steered_compiled', 'plain_compiled'):.2f}x | "
              f"{per_round(seconds, 'steered_compiled', 'steered_eager'):.2f}x | "
              f"{first['plain_compiled']:.0f} / {first['steered_compiled']:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report_compiled_decode.py RESULTS.json")
    main(sys.argv[1])
