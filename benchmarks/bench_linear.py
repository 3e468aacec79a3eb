"""Few-row linear layers on CPU, side by side in one run: stock F.linear vs svd_fast's small_batch_linear
kernel (called as small_batch_linears() calls it) at M = 1, 2 and 8 rows, 2 threads.

    python -m pytest benchmarks/bench_linear.py --benchmark-json=benchmarks/results/linear-cpu.json
    python benchmarks/bench_linear.py benchmarks/results/linear-cpu.json     # the ratio table

On a CPU with AVX-512 the kernel's AVX2 path runs too ("kernel-avx2"). What an AVX2-only CPU would see
of the stock path too: run the benchmark under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
SVD_FAST_CPU_ISA=avx2 (torch's own kernels and oneDNN's limited to AVX2).
"""
import contextlib
import json
import sys
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

import svd_fast

from machine import describe

THREADS = 2
# [out, in]: SmolLM2-135M's MLP up, down and LM head; Gemma 3 270M's LM head (-k 262144 for it alone)
SHAPES = [(1536, 576), (576, 1536), (49152, 576), (262144, 640)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# "kernel": as small_batch_linears() calls it (the widest ISA); "kernel-avx2": the AVX2 path forced, on a
# CPU that has a wider one (a forced ISA runs the kernel for every row count, bf16 included)
IMPLS = ["stock", "kernel"] + (["kernel-avx2"] if svd_fast.cpu_isa() == "avx512" else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_linear(benchmark, out_features, in_features, dtype, rows, impl):
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(out_features + rows)
    w = torch.randn(out_features, in_features, generator=g).to(DTYPES[dtype])
    x = torch.randn(rows, in_features, generator=g).to(DTYPES[dtype])
    op = torch.ops.svd_fast.small_batch_linear
    fn = (lambda: F.linear(x, w)) if impl == "stock" else (lambda: op(x, w, None))  # noqa: E731
    benchmark.group = f"linear {out_features}x{in_features} {dtype}"
    benchmark.extra_info.update(out=out_features, inp=in_features, dtype=dtype, rows=rows, impl=impl,
                                isa=svd_fast.cpu_isa(), threads=torch.get_num_threads(), machine=describe(),
                                torch=torch.__version__)
    with svd_fast.forced_cpu_isa("avx2") if impl == "kernel-avx2" else contextlib.nullcontext():
        benchmark(fn)


def report(path):
    with open(path) as f:
        data = json.load(f)
    cells = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        cells[(info["out"], info["inp"], info["dtype"])][(info["impl"], info["rows"])] = bench["stats"]["median"] * 1e6
    info = data["benchmarks"][0]["extra_info"]
    print(f"Median latency in us, {info['machine']}; one run, side by side.\n")
    print("| weight [out, in] | dtype | kernel | stock M=1 | stock M=2 | stock M=8 | kernel M=1 | kernel M=2 | kernel M=8 "
          "| kernel M=2 / stock M=1 | kernel M=1 / stock M=1 | kernel M=8 / stock M=8 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    kernels = sorted({impl for t in cells.values() for impl, _ in t if impl != "stock"})
    for (out_features, in_features, dtype), t in cells.items():
        for kernel in kernels:
            times = " | ".join(f"{t[(impl, rows)]:.1f}" for impl in ("stock", kernel) for rows in (1, 2, 8))
            ratios = " | ".join(f"{t[(kernel, a)] / t[('stock', b)]:.2f}" for a, b in ((2, 1), (1, 1), (8, 8)))
            name = "avx2 (forced)" if kernel == "kernel-avx2" else info["isa"]
            print(f"| {out_features} x {in_features} | {dtype} | {name} | {times} | {ratios} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/bench_linear.py RESULTS.json")
    report(sys.argv[1])
