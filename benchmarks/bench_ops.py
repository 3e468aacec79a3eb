"""Op latency, side by side in one run: the compiled kernels (on every CPU ISA path this CPU supports)
vs the PyTorch reference (eager and under torch.compile), with two yardsticks on the same shapes: the
copy floor, torch.add(a, b, out=c) (read two rows, write one), and the exp bound, pass 1's two exps per
element alone, vectorized and threaded as the kernel is (torch.ops.svd_fast.exp_throughput_bound). With
two exps per element the CPU op is compute-bound on few cores, so the exp bound is its yardstick there.

    python -m pytest benchmarks/bench_ops.py --benchmark-json=benchmarks/results/ops-cpu.json
    python benchmarks/report.py benchmarks/results/ops-cpu.json

test_interleaved_rounds times the target cell's contenders in turn within each round (the order rotates
from round to round), so a drifting machine hits them alike; report.py prints its medians and the
median of the per-round ratios.
"""
import os
import time

import pytest
import torch

import svd_fast
from svd_fast import reference

from machine import describe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHAPES = [(rows, vocab) for rows in (1, 8, 64) for vocab in (32000, 151936, 262144)]
# The vector paths this CPU has (baseline is a fallback), or the one SVD_FAST_CPU_ISA forces: run as
#   ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 SVD_FAST_CPU_ISA=avx2 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-avx2
# it shows an AVX-512 CPU as an AVX2-only one would run everything, torch.compile's code included (a cache
# of its own: inductor's cache does not tell the two apart).
ISAS = ([svd_fast.cpu_isa()] if os.environ.get("SVD_FAST_CPU_ISA") else svd_fast.supported_cpu_isas()[:2]) \
    if DEVICE == "cpu" else []
IMPLS = ([f"native-{isa}" for isa in ISAS] or ["native"]) + ["reference", "reference_compiled", "floor"] + [
    f"exp_bound-{isa}" for isa in ISAS]
ROUNDS, CALLS = 15, 21

_dynamo_config = torch._dynamo.config
if hasattr(_dynamo_config, "recompile_limit"):
    _dynamo_config.recompile_limit = 256
else:
    _dynamo_config.cache_size_limit = 256


def logits(rows, vocab, dtype):
    g = torch.Generator().manual_seed(rows + vocab)
    z_base = torch.randn(rows, vocab, generator=g) * 3
    z_adapted = z_base + torch.randn(rows, vocab, generator=g)
    return z_adapted.to(DEVICE, dtype), z_base.to(DEVICE, dtype)


def synced(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def with_isa(isa, fn):
    """fn run with the CPU kernels' ISA forced to isa (None: as they are)."""
    if isa is None:
        return fn

    def run():
        with svd_fast.forced_cpu_isa(isa):
            return fn()

    return run


def steer_contender(impl, za, zb, out):
    """The call timed for one implementation of steer_logits (every one writes a fresh or given buffer)."""
    kind, _, isa = impl.partition("-")
    if kind == "native":
        svd_fast.set_backend("native")
        return with_isa(isa or None, lambda: svd_fast.steer_logits(za, zb, 0.5))
    if kind == "native_out":  # into a reused buffer, as a decode loop would: no fresh pages to fault in
        return with_isa(isa or None, lambda: svd_fast.steer_logits(za, zb, 0.5, out=out))
    if kind == "reference":
        return lambda: reference.steer_logits(za, zb, 0.5)
    if kind == "reference_compiled":
        compiled = torch.compile(reference.steer_logits, dynamic=False)
        compiled(za, zb, 0.5)
        return lambda: compiled(za, zb, 0.5)
    if kind == "exp_bound":
        return with_isa(isa, lambda: torch.ops.svd_fast.exp_throughput_bound(za, zb))
    return lambda: torch.add(za, zb, out=out)


def record(benchmark, op, rows, vocab, dtype, impl):
    benchmark.group = f"{op} {rows}x{vocab} {dtype}"
    benchmark.extra_info.update(op=op, rows=rows, vocab=vocab, dtype=dtype, impl=impl, device=DEVICE,
                                machine=describe(DEVICE), torch=torch.__version__)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_steer_logits(benchmark, rows, vocab, dtype, impl):
    za, zb = logits(rows, vocab, DTYPES[dtype])
    out = torch.empty(za.shape, dtype=torch.float32, device=DEVICE)
    fn = steer_contender(impl, za, zb, out)
    record(benchmark, "steer_logits", rows, vocab, dtype, impl)
    benchmark(synced(fn))


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


@pytest.mark.skipif(DEVICE != "cpu", reason="the rounds compare CPU ISA paths")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_interleaved_rounds(benchmark, dtype):
    """The target cell, B = 8, V = 151936: every contender once per round, the order rotating."""
    rows, vocab = 8, 151936
    za, zb = logits(rows, vocab, DTYPES[dtype])
    out = torch.empty(za.shape, dtype=torch.float32)
    names = [impl for impl in IMPLS if impl != "reference"] + [f"native_out-{isa}" for isa in ISAS]
    contenders = {impl: steer_contender(impl, za, zb, out) for impl in names}
    times = {name: [] for name in names}
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = contenders[name]
            fn()
            samples = []
            for _ in range(CALLS):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            times[name].append(_median(samples) * 1e3)
    record(benchmark, "steer_logits (interleaved rounds)", rows, vocab, dtype, "rounds")
    benchmark.extra_info["rounds_ms"] = times
    benchmark.pedantic(contenders[names[0]], rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("rows,vocab", [(512, 49152), (64, 151936)])
def test_token_mu(benchmark, rows, vocab, impl):
    za, zb = logits(rows, vocab, torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    if impl == "native":
        svd_fast.set_backend("native")
        fn = lambda: svd_fast.token_mu(za, zb, labels)  # noqa: E731
    else:
        fn = lambda: reference.token_mu(za, zb, labels)  # noqa: E731
    record(benchmark, "token_mu", rows, vocab, "bfloat16", impl)
    benchmark(synced(fn))


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_steering_vector(benchmark, impl):
    za, zb = logits(8, 151936, torch.float32)
    fn = (lambda: torch.ops.svd_fast.steering_vector(za, zb)) if impl == "native" else (
        lambda: reference.steering_vector(za, zb))
    record(benchmark, "steering_vector", 8, 151936, "float32", impl)
    benchmark(synced(fn))


@pytest.mark.parametrize("impl", ["native", "reference", "token_mu"])
@pytest.mark.parametrize("rows,vocab", [(512, 49152), (64, 151936)])
def test_steered_nll(benchmark, rows, vocab, impl):
    """steered_nll at calibration's 21 grid strengths (bf16 logits, fill "keep"); token_mu on the same
    inputs is the yardstick: the same statistics pass, one strength-free pass over the kept blocks."""
    from svd_fast.adaptation.calibration import NLL_GRID

    za, zb = logits(rows, vocab, torch.bfloat16)
    g = torch.Generator().manual_seed(rows)
    labels = za.float().topk(3, -1).indices.gather(-1, torch.randint(0, 3, (rows, 1), generator=g).to(DEVICE))[:, 0]
    mus = torch.tensor(NLL_GRID, device=DEVICE)
    svd_fast.set_backend("native")
    fn = {"native": lambda: svd_fast.steered_nll(za, zb, labels, mus),
          "reference": lambda: reference.steered_nll(za, zb, labels, mus, fill="keep"),
          "token_mu": lambda: svd_fast.token_mu(za, zb, labels)}[impl]
    record(benchmark, f"steered_nll K={len(NLL_GRID)}", rows, vocab, "bfloat16", impl)
    benchmark(synced(fn))
