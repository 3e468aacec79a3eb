"""`python -m svd_fast`: check the compiled kernels against the reference on decode-shaped logits and
time one steered step of each, side by side. (The end-to-end demo on a real model is `svd-fast demo`.)"""
import argparse
import platform
import sys
import time

import torch

from . import ops
from .ops import reference


def _median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m svd_fast", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per cell (median reported)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device)
    print(f"svd_fast on {device} ({platform.processor() or platform.machine()}, CPU kernels: {ops.cpu_isa()}, "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads): compiled kernels {'loaded' if ops.native_available() else 'MISSING'}, "
          f"CUDA kernels {'built' if ops.has_cuda_kernels() else 'not built'}")
    if not ops.native_available():
        print("Only the reference is available; nothing to compare.", file=sys.stderr)
        return 1
    print(f"{'rows x vocab':>16} {'dtype':>9} {'rel. err':>10} {'native ms':>10} {'reference ms':>13} {'speed-up':>9}")
    failed = False
    cases = [(1, 49152), (8, 49152), (1, 151936), (8, 151936)]
    for rows, vocab in cases:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(rows * vocab)
            z_base = torch.randn(rows, vocab, generator=g) * 3
            z_adapted = (z_base + torch.randn(rows, vocab, generator=g)).to(device, dtype)
            z_base = z_base.to(device, dtype)
            native = ops.steer_logits(z_adapted, z_base, 0.5)
            expected = reference.steer_logits(z_adapted.double(), z_base.double(), 0.5, 0.1)  # the float64 oracle
            kept = torch.isfinite(expected)
            err = float((native[kept].double() - expected[kept]).abs().max() / expected[kept].abs().max())
            failed |= not (torch.equal(torch.isfinite(native), kept) and err < 1e-5)
            t_native = _median_ms(lambda: ops.steer_logits(z_adapted, z_base, 0.5), args.repeats)
            t_ref = _median_ms(lambda: reference.steer_logits(z_adapted, z_base, 0.5), args.repeats)
            print(f"{rows:>6} x {vocab:<7} {str(dtype).split('.')[-1]:>9} {err:>10.2e} {t_native:>10.3f} "
                  f"{t_ref:>13.3f} {t_ref / t_native:>8.1f}x")
    print("kernels agree with the reference" if not failed else "MISMATCH between kernels and reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
