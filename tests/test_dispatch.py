"""Dispatcher registration, torch.compile, backend selection, the build, and CUDA-only behaviour."""
import os
import subprocess
import sys

import pytest
import torch

import svd_fast
from svd_fast import reference

from conftest import DEVICES, random_logits

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def op_samples(device):
    za, zb = random_logits((3,), 4000, torch.float32, device, seed=21)
    labels = torch.tensor([1, -100, 2500], device=device)
    mu_rows = torch.tensor([0.5, -1.0, 2.0], device=device)
    out = torch.empty_like(za)
    return [
        (torch.ops.svd_fast.steering_vector.default, (za, zb)),
        (torch.ops.svd_fast.steer_logits.default, (za, zb, None, 0.7, -2.3, 0, 0.0)),
        (torch.ops.svd_fast.steer_logits.default, (za.bfloat16(), zb.bfloat16(), mu_rows, 0.0, -1.0, 2, -4.0)),
        (torch.ops.svd_fast.steer_logits_out.default, (za, zb, None, 0.7, -2.3, 1, 0.0, out)),
        (torch.ops.svd_fast.token_mu.default, (za, zb, labels, -2.3, 1e-12, -100)),
    ]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_opcheck(device):
    for op, args in op_samples(device):
        torch.library.opcheck(op, args)


def test_native_extension_is_loaded():
    assert svd_fast.native_available(), "svd_fast._C did not load: the build failed or was skipped"
    for op in ("steering_vector", "steer_logits_out", "token_mu", "steered_nll"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"svd_fast::{op}", "CPU"), op


def test_cuda_kernels_compiled_when_the_build_had_nvcc():
    # .ci/run builds with the CUDA toolkit and sets this, so a .cu file that silently dropped out of
    # the build fails CI even though no GPU is there to run it.
    if os.environ.get("SVD_FAST_REQUIRE_CUDA_KERNELS") != "1":
        pytest.skip("set SVD_FAST_REQUIRE_CUDA_KERNELS=1 after a build with nvcc (CI does)")
    assert svd_fast.has_cuda_kernels()
    for op in ("steering_vector", "steer_logits_out", "token_mu", "steered_nll"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"svd_fast::{op}", "CUDA"), op


@pytest.mark.parametrize("backend_name", ["inductor", "aot_eager"])
def test_ops_inside_torch_compile(backend_name):
    za, zb = random_logits((2, 3), 3000, torch.float32, seed=22)
    labels = torch.randint(0, 3000, (2, 3))
    mus = torch.tensor([-1.0, 0.0, 2.0])

    def step(za, zb, labels):
        z_hat = svd_fast.steer_logits(za * 1.0, zb, 0.9, alpha=0.2, fill="keep")
        mu_star, valid = svd_fast.token_mu(za, zb, labels)
        loss, d_loss, d2_loss = svd_fast.steered_nll(za, zb, labels, mus)
        return z_hat.log_softmax(-1), svd_fast.steering_vector(za, zb), mu_star, valid, loss, d_loss, d2_loss

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend_name, fullgraph=True)
    for got, expected in zip(compiled(za, zb, labels), step(za, zb, labels)):
        torch.testing.assert_close(got, expected)


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_cpu_isa_choice():
    supported = svd_fast.supported_cpu_isas()
    assert supported[-1] == "baseline" and set(supported) <= {"avx512", "avx2", "baseline"}
    default = os.environ.get("SVD_FAST_CPU_ISA", "auto").replace("auto", "") or supported[0]
    assert svd_fast.cpu_isa() == default  # the widest, unless SVD_FAST_CPU_ISA forces one
    for isa in supported:
        with svd_fast.forced_cpu_isa(isa):
            assert svd_fast.cpu_isa() == isa
            with svd_fast.forced_cpu_isa("auto"):
                assert svd_fast.cpu_isa() == supported[0]
            assert svd_fast.cpu_isa() == isa
    assert svd_fast.cpu_isa() == default
    with pytest.raises(ValueError, match="cpu isa must be 'auto' or one of"):
        svd_fast.set_cpu_isa("sse9")
    for isa in {"avx512", "avx2"} - set(supported):
        with pytest.raises(ValueError, match=f"this CPU cannot run the {isa} kernels"):
            svd_fast.set_cpu_isa(isa)


def test_cpu_isa_from_environment():
    code = "import svd_fast; print(svd_fast.cpu_isa())"
    for isa in svd_fast.supported_cpu_isas():
        result = run_python(code, SVD_FAST_CPU_ISA=isa)
        assert result.returncode == 0 and result.stdout.strip() == isa, result.stderr
    bad = run_python(code, SVD_FAST_CPU_ISA="sse9")
    assert bad.returncode != 0 and "SVD_FAST_CPU_ISA must be auto, avx512, avx2 or baseline, got 'sse9'" in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("ValueError")


def test_backend_from_environment():
    result = run_python("import svd_fast; print(svd_fast.get_backend())", SVD_FAST_BACKEND="torch")
    assert result.returncode == 0 and result.stdout.strip() == "torch"
    bad = run_python("import svd_fast", SVD_FAST_BACKEND="gpu")
    assert bad.returncode != 0 and "SVD_FAST_BACKEND must be one of" in bad.stderr


def test_set_backend_switches_to_reference():
    za, zb = random_logits((2,), 500, seed=23)
    svd_fast.set_backend("torch")
    assert torch.equal(svd_fast.steering_vector(za, zb), reference.steering_vector(za, zb))


def test_missing_extension_falls_back_with_one_warning():
    code = """
import sys, warnings
sys.modules["svd_fast._C"] = None  # as if the extension had not been built
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import svd_fast, torch
    za, zb = torch.randn(2, 50), torch.randn(2, 50)
    out = svd_fast.steer_logits(za, zb, 0.5)
    svd_fast.steering_vector(za, zb)
ours = [w for w in caught if "svd_fast" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in ours]
assert "compiled kernels not found" in str(ours[0].message)
assert torch.equal(out, svd_fast.reference.steer_logits(za, zb, 0.5))
assert not svd_fast.native_available()
print("ok")
"""
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------------------------------------------
# CUDA only: run where a GPU is present (benchmarks/gpu_check.sh), skipped elsewhere.


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_unaligned_rows_use_the_scalar_path_correctly(dtype):
    rows, vocab = 3, 50257  # GPT-2's odd vocabulary: no 16-byte vector loads
    za, zb = random_logits((rows,), vocab, dtype, "cuda", seed=24)
    buf_a = torch.empty(rows * vocab + 1, dtype=dtype, device="cuda")
    buf_a[1:] = za.reshape(-1)
    shifted = buf_a[1:].view(rows, vocab)  # contiguous but off 16-byte alignment
    for z in (za, shifted):
        torch.testing.assert_close(svd_fast.steer_logits(z, zb, 1.3), reference.steer_logits(z, zb, 1.3),
                                   rtol=1e-4, atol=1e-4, equal_nan=True)


@needs_cuda
def test_cuda_split_vocabulary_matches_cpu_kernels():
    for rows, vocab in [(1, 262144), (2, 151936), (8, 151936), (300, 32000)]:
        za, zb = random_logits((rows,), vocab, torch.bfloat16, "cuda", seed=rows)
        labels = torch.randint(0, vocab, (rows,), device="cuda")
        gpu = svd_fast.token_mu(za, zb, labels)
        cpu = svd_fast.token_mu(za.cpu(), zb.cpu(), labels.cpu())
        assert torch.equal(gpu[1].cpu(), cpu[1])
        torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(svd_fast.steering_vector(za, zb).cpu(), svd_fast.steering_vector(za.cpu(), zb.cpu()),
                                   rtol=1e-4, atol=1e-7)


@needs_cuda
def test_cuda_graph_capture_and_current_stream():
    za, zb = random_logits((4,), 151936, torch.bfloat16, "cuda", seed=25)
    mu = torch.tensor([0.5, 1.0, -1.0, 2.0], device="cuda")
    out = torch.empty(za.shape, dtype=torch.float32, device="cuda")
    expected = svd_fast.steer_logits(za, zb, mu)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        svd_fast.steer_logits(za, zb, mu, out=out)  # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        svd_fast.steer_logits(za, zb, mu, out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@needs_cuda
def test_the_label_ops_are_captured_in_a_cuda_graph():
    """token_mu and steered_nll read GPU labels without a host sync (a sync inside capture raises), so a
    compiled calibration or decode step can run in a CUDA graph; replay gives the eager results."""
    za, zb = random_logits((6,), 151936, torch.bfloat16, "cuda", seed=26)
    labels = torch.randint(0, 151936, (6,), device="cuda")
    labels[2] = -100
    mus = torch.tensor([-1.0, 0.0, 0.5], device="cuda")
    run = lambda: (*svd_fast.token_mu(za, zb, labels), *svd_fast.steered_nll(za, zb, labels, mus))  # noqa: E731
    expected = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up on a side stream, as CUDA graph capture wants
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_every_op_is_exported_at_top_level():
    import svd_fast.ops

    missing = set(svd_fast.ops.__all__) - set(svd_fast.__all__)
    assert not missing, f"svd_fast.__all__ lacks {sorted(missing)}"
    assert all(hasattr(svd_fast, name) for name in svd_fast.__all__)
