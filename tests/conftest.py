import contextlib

import pytest
import torch

import svd_fast

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@contextlib.contextmanager
def backend(name):
    previous = svd_fast.get_backend()
    svd_fast.set_backend(name)
    try:
        yield
    finally:
        svd_fast.set_backend(previous)


def random_logits(rows_shape, vocab, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    """Adapted and base logits that differ by a moderate perturbation, as after a short warm start."""
    g = torch.Generator().manual_seed(seed)
    z_base = torch.randn(*rows_shape, vocab, generator=g) * scale
    z_adapted = z_base + torch.randn(*rows_shape, vocab, generator=g)
    return z_adapted.to(device, dtype), z_base.to(device, dtype)


@pytest.fixture(autouse=True)
def _native_by_default():
    """Tests run the compiled kernels (and fail if they were not built) unless they switch backend;
    the global RNG is seeded so every test sees the same inputs on every run."""
    torch.manual_seed(0)
    with backend("native"):
        yield
