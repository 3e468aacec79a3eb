"""small_batch_linear (the few-row CPU linear kernel) against F.linear, and the cpu_decode context
manager that routes a model's frozen linears to it."""
import math

import pytest
import torch
import torch.nn.functional as F

import svd_fast
from svd_fast.decoding.cpu_linear import small_batch_linears

from conftest import CPU_TARGETS, backend
from hf_models import tiny_model

OP = torch.ops.svd_fast.small_batch_linear.default
INS = [1, 7, 16, 33, 577]
OUTS = [1, 13, 1537]
ROWS = [0, 1, 2, 3, 5, 8, 13, 16, 17]


def random_linear(rows_shape, in_features, out_features, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows_shape, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    b = torch.randn(out_features, generator=g) if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


# bf16 with more than 4 rows runs at::linear on AMX CPUs, where oneDNN's AMX GEMM is faster.
AMX = "amx_bf16" in cpu_flags()


def kernel_runs(x, w, forced=False):
    """Whether the kernel (not at::linear) computes this call. A forced ISA runs bf16 with more than 4 rows
    too; the baseline ISA never runs the kernel."""
    rows = math.prod(x.shape[:-1])
    return svd_fast.cpu_isa() != "baseline" and 1 <= rows <= (4 if w.dtype == torch.bfloat16 and AMX and not forced
                                                              else 16)


def assert_matches_linear(y, x, w, b, forced=False):
    """The kernel: F.linear in float32, rounded once to the weights' dtype (bf16 too); elsewhere
    at::linear itself, bit for bit."""
    if not kernel_runs(x, w, forced):
        assert torch.equal(y, F.linear(x, w, b))
        return
    expected = F.linear(x.float(), w.float(), None if b is None else b.float()).to(w.dtype)
    assert y.dtype == w.dtype and y.shape == expected.shape
    # Sums of `in` products in another order: the error grows like sqrt(in) float32 roundings of
    # O(1) terms. bf16 outputs may land one bf16 ulp (2^-8 relative) apart after the final rounding.
    rtol = 1e-5 if w.dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(y, expected, rtol=rtol, atol=1e-5 * max(1.0, w.shape[1] ** 0.5))


@pytest.mark.parametrize("device", CPU_TARGETS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", INS)
def test_matches_linear_for_every_row_count(in_features, dtype, device):
    """On every ISA path this CPU supports (forced), and once more with the automatic choice."""
    for out_features in OUTS:
        for rows in ROWS:
            for bias in (True, False):
                x, w, b = random_linear((rows,), in_features, out_features, dtype, bias,
                                        seed=in_features * 1000 + out_features * 20 + rows)
                assert_matches_linear(OP(x, w, b), x, w, b, forced=True)
                with svd_fast.forced_cpu_isa("auto"):
                    assert_matches_linear(svd_fast.small_batch_linear(x, w, b), x, w, b)


@pytest.mark.parametrize("device", CPU_TARGETS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_and_non_contiguous_x(dtype, device):
    _, w, b = random_linear((1,), 577, 1537, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    big = torch.randn(4, 2, 3, 1200, generator=g).to(dtype)
    cases = [
        big[0, :, :, :577],                                  # 3-D, rows strided
        big[0, :, :, :577].transpose(0, 1),                  # [3, 2, 577], not contiguous
        big[:, 0, 0, ::2][:, :577],                          # elements strided
        torch.randn(577, 5, generator=g).to(dtype).t(),      # transposed
        big[0, 0, 0, :577],                                  # 1-D x: one row, 1-D output
    ]
    for x in cases:
        y = OP(x, w, b)
        assert y.shape == (*x.shape[:-1], 1537)
        assert_matches_linear(y, x, w, b, forced=True)


def test_bf16_runs_the_kernel_up_to_4_rows_on_amx_cpus():
    x, w, b = random_linear((5,), 577, 13, torch.bfloat16)
    assert kernel_runs(x[:4], w) and kernel_runs(x, w) == (not AMX)
    assert_matches_linear(OP(x[:4], w, b), x[:4], w, b)
    assert_matches_linear(OP(x, w, b), x, w, b)


def test_more_rows_and_other_dtypes_run_at_linear():
    for dtype, rows in ((torch.float32, 17), (torch.float32, 64), (torch.float16, 2), (torch.float64, 2)):
        x, w, b = random_linear((rows,), 33, 13, dtype, seed=rows)
        assert torch.equal(OP(x, w, b), F.linear(x, w, b))
    x, w, b = random_linear((0,), 33, 13, torch.float32)
    assert OP(x, w, b).shape == (0, 13)
    x, w, b = random_linear((2,), 33, 13, torch.float32)
    w_strided = torch.randn(33, 13).t()  # a transposed weight: at::linear, not a copy per call
    torch.testing.assert_close(OP(x, w_strided, b), F.linear(x, w_strided, b))
    with pytest.raises(RuntimeError):  # F.linear's own error for mixed dtypes
        OP(x.double(), w, b)


def test_opcheck():
    x, w, b = random_linear((2,), 577, 13, torch.float32, seed=3)
    xb, wb, _ = random_linear((2, 3), 33, 1537, torch.bfloat16, bias=False, seed=4)
    x17, w17, b17 = random_linear((17,), 33, 13, torch.float32, seed=5)
    for args in ((x, w, b), (x.t().contiguous().t(), w, None), (xb, wb, None), (x17, w17, b17)):
        torch.library.opcheck(OP, args)


def test_inside_torch_compile():
    x, w, b = random_linear((2,), 33, 13, torch.float32, seed=6)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: svd_fast.small_batch_linear(x * 2.0, w, b).relu(), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x * 2.0, w, b).relu())


def test_python_face_checks_and_backends():
    x, w, b = random_linear((2,), 33, 13, torch.float32, seed=7)
    bad_calls = [
        (lambda: svd_fast.small_batch_linear(x.numpy(), w), TypeError, "x must be a torch.Tensor"),
        (lambda: svd_fast.small_batch_linear(x, w.bfloat16()), TypeError, "must share dtype"),
        (lambda: svd_fast.small_batch_linear(x, w, b.double()), TypeError, "bias is torch.float64"),
        (lambda: svd_fast.small_batch_linear(x.long(), w.long()), TypeError, "weight must be a floating-point"),
        (lambda: svd_fast.small_batch_linear(x[:, :5], w), ValueError, r"x must be \[..., in\] with in = "),
        (lambda: svd_fast.small_batch_linear(x, w[0]), ValueError, r"weight must be \[out, in\]"),
        (lambda: svd_fast.small_batch_linear(x, w, b[:3]), ValueError, r"bias must be \[out\] = \[13\]"),
        (lambda: svd_fast.small_batch_linear(x, w.to("meta")), TypeError, "on meta"),
    ]
    for call, error, message in bad_calls:
        with pytest.raises(error, match=message):
            call()
    with backend("torch"):
        assert torch.equal(svd_fast.small_batch_linear(x, w, b), F.linear(x, w, b))
    x_grad = x.clone().requires_grad_()
    y = svd_fast.small_batch_linear(x_grad, w, b)  # the op has no backward: F.linear runs
    y.sum().backward()
    torch.testing.assert_close(x_grad.grad, w.sum(0).expand(2, 33))


# ---------------------------------------------------------------------------------------------------
# The context manager on a tiny HF Llama.


def kernel_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    calls = sum(e.count for e in prof.key_averages() if e.key == "svd_fast::small_batch_linear")
    return result, calls


def linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_context_manager_matches_stock_model_and_restores(dtype):
    model = tiny_model("llama", seed=3).to(dtype).requires_grad_(False)
    layers = linears(model)
    assert len(layers) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    few_rows = torch.cat([ids, ids.flip(-1)])  # 2 x 6 = 12 rows
    many_rows = torch.randint(4, 90, (2, 20))
    stock_few, stock_many = model(few_rows).logits, model(many_rows).logits
    with torch.no_grad(), small_batch_linears(model) as routed:
        assert routed == len(layers)
        few, calls = kernel_calls(lambda: model(few_rows).logits)
        assert calls == len(layers)
        many, calls = kernel_calls(lambda: model(many_rows).logits)
        assert calls == 0
    assert torch.equal(many, stock_many)
    if dtype == torch.float32:
        torch.testing.assert_close(few, stock_few, rtol=1e-4, atol=1e-4)
    else:  # bf16 activations: one rounding apart per layer, compounded over two layers
        torch.testing.assert_close(few, stock_few, rtol=0.05, atol=0.1)
    assert all("forward" not in layer.__dict__ for layer in layers)
    _, calls = kernel_calls(lambda: model(few_rows))
    assert calls == 0


def test_context_manager_greedy_generate_and_restore_on_error():
    model = tiny_model("llama", seed=4, tie=True).requires_grad_(False)
    prompt = torch.tensor([[1, 12, 13, 14]])
    stock = model.generate(prompt, max_new_tokens=6, do_sample=False)
    with pytest.raises(KeyError), small_batch_linears(model, max_rows=4):
        steered = model.generate(prompt, max_new_tokens=6, do_sample=False)
        raise KeyError("boom")
    assert torch.equal(steered, stock)
    assert all("forward" not in layer.__dict__ for layer in linears(model))


def test_context_manager_skips_trainable_layers_and_grad():
    model = tiny_model("llama", seed=5).requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    hook_forward = model.model.layers[0].mlp.down_proj.forward
    model.model.layers[0].mlp.down_proj.forward = hook_forward  # an instance-level forward, as hooks set
    ids = torch.tensor([[1, 10, 20]])
    with small_batch_linears(model) as routed:
        assert routed == 2 * 7
        _, calls = kernel_calls(lambda: model(ids))  # grad enabled, but no input needs it
        assert calls == 2 * 7
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        _, calls = kernel_calls(lambda: model(inputs_embeds=embeds).logits.sum().backward())
        assert calls == 0 and embeds.grad is not None
    assert model.model.layers[0].mlp.down_proj.__dict__["forward"] is hook_forward
    assert "forward" not in model.lm_head.__dict__
    with pytest.raises(ValueError, match="max_rows"):
        with small_batch_linears(model, max_rows=17):
            pass
    with backend("torch"), small_batch_linears(model) as routed:
        assert routed == 0
