"""steered_nll (the strength's objective): the kernels against the float64 reference on every ISA path
and CUDA, the reference's derivatives against autograd, and the op's contract on edge cases."""
import math

import pytest
import torch
import torch.nn.functional as F

import svd_fast
from svd_fast import reference

from conftest import (CPU_TARGETS, DEVICES, DTYPES, assert_steered_nll_matches_oracle, backend, random_logits)

INF = float("inf")
MUS = [-64.0, -8.0, -1.0, -0.25, 0.0, 0.5, 2.0, 16.0]
FILLS = ["keep", -INF, -3.0]


def labels_for(za, seed=0):
    """Labels as in calibration: mostly among the adapted model's likely tokens, one ignored, one arbitrary."""
    rows_shape, vocab = za.shape[:-1], za.shape[-1]
    g = torch.Generator().manual_seed(seed)
    top = za.float().cpu().topk(min(3, vocab), -1).indices
    pick = torch.randint(0, top.shape[-1], (*rows_shape, 1), generator=g)
    labels = top.gather(-1, pick).squeeze(-1)
    flat = labels.view(-1)
    if flat.numel() > 1:
        flat[0] = -100
        flat[-1] = int(torch.randint(0, vocab, (1,), generator=g))
    return labels.to(za.device)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("rows,vocab", [(1, 7), (6, 1000), (4, 32000), (3, 151936)])
def test_matches_float64_reference(rows, vocab, fill, dtype, device):
    za, zb = random_logits((rows,), vocab, dtype, device, seed=rows + vocab)
    labels = labels_for(za, seed=vocab)
    got = svd_fast.steered_nll(za, zb, labels, MUS, 0.1, fill)
    assert all(t.dtype == torch.float32 and t.shape == (rows, len(MUS)) for t in got)
    assert_steered_nll_matches_oracle(got, za, zb, labels, MUS, 0.1, fill)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("alpha", [1e-4, 0.5, 1.0])
def test_alphas_and_leading_dims(alpha, device):
    za, zb = random_logits((2, 5), 3001, torch.float32, device, seed=4, scale=1.0)
    labels = labels_for(za, seed=1)
    got = svd_fast.steered_nll(za, zb, labels, torch.tensor(MUS, device=device), alpha)
    assert got[0].shape == (2, 5, len(MUS))
    assert_steered_nll_matches_oracle(got, za, zb, labels, MUS, alpha)
    transposed = svd_fast.steered_nll(za.transpose(0, 1), zb.transpose(0, 1), labels.t(), MUS, alpha)
    for a, b in zip(transposed, got):
        torch.testing.assert_close(a, b.transpose(0, 1), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_magnitudes_and_shaped_rows(dtype, device):
    za, zb = random_logits((6,), 5000, torch.float32, seed=23)
    za[0, :2100] = zb[0, :2100] = -INF           # leading blocks all -inf
    za[1, 3000:3010] += 90.0                     # a later block leads by 90
    za[2, 1024:2048] = zb[2, 1024:2048] = -INF   # a whole block ruled out
    za[3] *= 3000.0                              # huge logits
    za[4] = torch.linspace(-40, 40, 5000) + za[4] * 0.1
    za, zb = za.to(device, dtype), zb.to(device, dtype)
    labels = labels_for(za, seed=3)
    for fill in FILLS:
        got = svd_fast.steered_nll(za, zb, labels, MUS, 0.1, fill)
        assert_steered_nll_matches_oracle(got, za, zb, labels, MUS, 0.1, fill)


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("vocab", [2, 9, 60])
def test_reference_derivatives_are_autograd_of_its_loss(vocab, fill):
    """d_loss and d2_loss of the reference are the first and second derivatives (autograd) of loss(mu) =
    -log softmax(steer_logits(z_a, z_b, mu))[label], the reference's steered logits of SPEC 3."""
    za, zb = (z.double() for z in random_logits((5,), vocab, seed=vocab, scale=1.5))
    labels = za.argsort(-1, descending=True)[:, min(1, vocab - 1)]  # kept under alpha = 0.5 mostly
    for mu_value in (-3.0, -0.5, 0.0, 0.7, 4.0):
        mu = torch.tensor(mu_value, dtype=torch.float64, requires_grad=True)
        z_hat = reference.steer_logits(za, zb, mu.expand(5), alpha=0.5, fill=fill)
        loss = -z_hat.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        finite = torch.isfinite(loss)
        first = torch.stack([torch.autograd.grad(l, mu, create_graph=True)[0] if f else mu.new_zeros(())
                             for l, f in zip(loss, finite)])
        second = torch.stack([torch.autograd.grad(g, mu, retain_graph=True)[0] if f and g.requires_grad
                              else mu.new_zeros(()) for g, f in zip(first, finite)])
        got_loss, got_d, got_d2 = reference.steered_nll(za, zb, labels, [mu_value], alpha=0.5, fill=fill)
        torch.testing.assert_close(got_loss[:, 0], loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_d[:, 0], first.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_d2[:, 0], second.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("device", CPU_TARGETS, indirect=True)
def test_spec_identities(impl, device):
    """At mu = 0 with fill "keep" the loss is the adapted model's cross-entropy; under -inf it is the
    cross-entropy of z_a renormalised over the keep set; the loss is convex in mu (d2 >= 0) and d_loss is
    its slope (finite differences)."""
    za, zb = random_logits((16,), 500, seed=9, scale=1.0)
    labels = labels_for(za, seed=2)
    labels[0] = 3
    with backend(impl):
        loss, d_loss, d2_loss = svd_fast.steered_nll(za, zb, labels, [0.0, 1.0, 1.0 + 1e-2], 0.1, "keep")
        masked_loss = svd_fast.steered_nll(za, zb, labels, [0.0], 0.1, -INF)[0][:, 0]
    target = labels != -100
    ce = F.cross_entropy(za, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(loss[:, 0], ce, rtol=1e-5, atol=1e-5)
    kept = reference.keep_mask(za, 0.1)
    masked_ce = -torch.where(kept, za, -INF).log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    torch.testing.assert_close(masked_loss[target], masked_ce[target], rtol=1e-5, atol=1e-5)
    assert bool((d2_loss >= 0).all())
    slope = (loss[:, 2] - loss[:, 1]) / 1e-2
    torch.testing.assert_close(slope, (d_loss[:, 1] + d_loss[:, 2]) / 2, rtol=2e-2, atol=2e-3)
    assert not bool(loss[~target].any() or d_loss[~target].any() or d2_loss[~target].any())


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_edge_cases(impl, device):
    za, zb = random_logits((7,), 50, seed=5, scale=2.0)
    top = za.argmax(-1)
    za[0, 4] = -INF                       # label on a token z_a rules out
    za[1, 7], zb[1, 7] = 2.0, -INF        # z_b rules out a token z_a allows: unsteered row
    za[2, 3] = float("nan")               # NaN row
    labels = top.clone()
    labels[0], labels[3] = 4, -100        # ruled-out label, ignored row
    labels[4] = za[4].argmin()            # a token the mask drops
    za, zb, labels = za.to(device), zb.to(device), labels.to(device)
    mus = [-2.0, 0.0, 3.0]
    with backend(impl):
        loss, d_loss, d2_loss = (t.cpu() for t in svd_fast.steered_nll(za, zb, labels, mus))
        masked = [t.cpu() for t in svd_fast.steered_nll(za, zb, labels, mus, fill=-INF)]
    assert torch.equal(loss[0], torch.full((3,), INF)) and not d_loss[0].any() and not d2_loss[0].any()
    assert torch.allclose(loss[1], loss[1, :1].expand(3)) and d2_loss[1].abs().max() < 1e-6  # slope 0 on K
    assert all(bool(t[2].isnan().all()) for t in (loss, d_loss, d2_loss))
    assert not (loss[3].any() or d_loss[3].any() or d2_loss[3].any())
    assert bool(torch.isfinite(loss[4]).all())
    assert torch.equal(masked[0][4], torch.full((3,), INF)) and not masked[1][4].any()  # dropped label, fill -inf
    assert all(bool(torch.isfinite(t[[1, 5, 6]]).all()) for t in (loss, d_loss, d2_loss))  # other rows unaffected


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_empty_shapes_and_vocab_of_one(impl, device):
    za, zb = random_logits((4,), 1, device=device)
    with backend(impl):
        one = svd_fast.steered_nll(za, zb, torch.zeros(4, dtype=torch.long, device=device), [-1.0, 5.0])
        none = svd_fast.steered_nll(za[:0], zb[:0], torch.zeros(0, dtype=torch.long, device=device), [1.0])
        no_mu = svd_fast.steered_nll(za, zb, torch.zeros(4, dtype=torch.long, device=device), [])
    assert all(t.shape == (4, 2) and not t.any() for t in one)
    assert all(t.shape == (0, 1) for t in none) and all(t.shape == (4, 0) for t in no_mu)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_opcheck(device):
    if not svd_fast.native_available():
        pytest.skip("needs the compiled kernels")
    za, zb = random_logits((3,), 700, device=device, seed=1)
    labels = labels_for(za)
    mus = torch.tensor([-1.0, 0.5], device=device)
    torch.library.opcheck(torch.ops.svd_fast.steered_nll.default,
                          (za, zb, labels, mus, math.log(0.1), 1, 0.0, -100),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


BAD_CALLS = [
    (dict(mus=[1.0, float("nan")]), ValueError, "mu must be finite"),
    (dict(mus=torch.tensor([INF])), ValueError, "mus must be finite"),
    (dict(mus=torch.ones(2, 2)), TypeError, "mus must be a 1-D"),
    (dict(mus=torch.ones(2, dtype=torch.long)), TypeError, "mus must be a 1-D floating"),
    (dict(mus="1,2"), TypeError, "mus must be a 1-D tensor or a list"),
    (dict(mus=torch.ones(2, device="meta")), ValueError, "mus is on meta"),
    (dict(fill="drop"), ValueError, "fill must be"),
    (dict(alpha=0.0), ValueError, "alpha must lie in"),
    (dict(labels=torch.tensor([0, 10])), ValueError, "labels must be token ids"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, "one token id per row"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
]


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("kwargs,error,message", BAD_CALLS)
def test_bad_input_raises_clear_error(kwargs, error, message, impl):
    za, zb = random_logits((2,), 10)
    args = {"labels": torch.tensor([0, 1]), "mus": [0.0, 1.0], **kwargs}
    with backend(impl), pytest.raises(error, match=message):
        svd_fast.steered_nll(za, zb, **args)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_masked_blocks_far_below_the_running_maximum(device):
    """A block without kept tokens lying ~100 nats below the blocks before it: its exps from their maximum
    underflow, yet under a finite fill and a large mu * lambda its tokens dominate the steered softmax."""
    za = torch.full((2, 2048), -INF)
    za[:, 0], za[:, 1] = 0.0, -1.0                 # block 0: the kept tokens
    za[:, 1024:] = -120.0                          # block 1: masked, far below
    za[0, 1500] = -95.0
    za[1, 1024:2048] = torch.linspace(-130.0, -100.0, 1024)
    zb = za.clone()
    zb[:, :2] = torch.tensor([-1.0, 0.0])
    labels = torch.tensor([1500, 2000])
    za, zb, labels = za.to(device), zb.to(device), labels.to(device)
    mus = [-300.0, -200.0, 0.0, 200.0, 300.0]
    for fill in (1.0, -1.0, "keep"):
        got = svd_fast.steered_nll(za, zb, labels, mus, 0.1, fill)
        assert_steered_nll_matches_oracle(got, za, zb, labels, mus, 0.1, fill)
        assert bool((got[0] >= 0).all())


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_out_of_range_labels_reaching_the_kernels_give_nan_rows(device):
    """The wrapper rejects bad ids on the CPU; on a GPU it leaves them to the kernels (a check would be a host
    sync), which give that row NaN, never a silently ignored row. Called here on the ops directly."""
    if not svd_fast.native_available():
        pytest.skip("needs the compiled kernels")
    za, zb = random_logits((4,), 300, device=device, seed=8)
    labels = torch.tensor([5, 300, -7, -100], device=device)
    mu_star, valid, numerator, norm_sq = (t.cpu() for t in torch.ops.svd_fast.token_mu(za, zb, labels, math.log(0.1),
                                                                                       1e-12, -100))
    assert not bool(valid[1:].any()) and all(bool(t[1:3].isnan().all()) for t in (mu_star, numerator, norm_sq))
    assert mu_star[3] == 0 and numerator[3] == 0 and bool(torch.isfinite(mu_star[0]))
    outputs = [t.cpu() for t in torch.ops.svd_fast.steered_nll(za, zb, labels, torch.tensor([0.0, 1.0], device=device),
                                                               math.log(0.1), 1, 0.0, -100)]
    assert all(bool(t[1:3].isnan().all()) and not t[3].any() and bool(torch.isfinite(t[0]).all()) for t in outputs)
