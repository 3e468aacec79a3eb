"""Op latency, side by side in one run: compiled kernels vs the PyTorch reference (eager and under
torch.compile), with a read-two-write-one floor, torch.add(a, b, out=c), on the same shapes.

    python -m pytest benchmarks/bench_ops.py --benchmark-json=benchmarks/results/ops-cpu.json
    python benchmarks/report.py benchmarks/results/ops-cpu.json
"""
import platform

import pytest
import torch

import svd_fast
from svd_fast import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHAPES = [(rows, vocab) for rows in (1, 8, 64) for vocab in (32000, 151936, 262144)]
IMPLS = ["native", "reference", "reference_compiled", "floor"]

_dynamo_config = torch._dynamo.config
if hasattr(_dynamo_config, "recompile_limit"):
    _dynamo_config.recompile_limit = 256
else:
    _dynamo_config.cache_size_limit = 256


def machine():
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


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


def record(benchmark, op, rows, vocab, dtype, impl):
    benchmark.group = f"{op} {rows}x{vocab} {dtype}"
    benchmark.extra_info.update(op=op, rows=rows, vocab=vocab, dtype=dtype, impl=impl, device=DEVICE,
                                machine=machine(), torch=torch.__version__)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_steer_logits(benchmark, rows, vocab, dtype, impl):
    za, zb = logits(rows, vocab, DTYPES[dtype])
    out = torch.empty(za.shape, dtype=torch.float32, device=DEVICE)
    if impl == "native":
        svd_fast.set_backend("native")
        fn = lambda: svd_fast.steer_logits(za, zb, 0.5)  # noqa: E731
    elif impl == "reference":
        fn = lambda: reference.steer_logits(za, zb, 0.5)  # noqa: E731
    elif impl == "reference_compiled":
        compiled = torch.compile(reference.steer_logits, dynamic=False)
        fn = lambda: compiled(za, zb, 0.5)  # noqa: E731
        fn()
    else:
        fn = lambda: torch.add(za, zb, out=out)  # noqa: E731
    record(benchmark, "steer_logits", rows, vocab, dtype, impl)
    benchmark(synced(fn))


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
