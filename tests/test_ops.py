"""The compiled kernels against the PyTorch reference evaluated in float64 (the oracle), on every CPU
ISA path this machine supports and on CUDA; and the reference against SPEC.md itself."""
import functools
import math

import pytest
import torch

import svd_fast
from svd_fast import reference

from conftest import (CPU_TARGETS, DEVICES, DTYPES, assert_close_rows, assert_delta_matches_oracle,
                      assert_steered_matches_oracle, assert_token_mu_matches_oracle, backend, delta_oracle, random_logits,
                      steered_oracle, token_mu_oracle)

INF = float("inf")
VOCABS = [1, 7, 1000, 32000, 151936, 262144]
ROWS = [0, 1, 3, 64]


# ---------------------------------------------------------------------------------------------------
# Native vs reference on fresh random inputs, every op, dtype and size.


@functools.lru_cache(maxsize=1)
def oracle_case(rows, vocab, dtype):
    """Inputs of test_ops_match_reference and the float64 oracle's outputs on them, computed once and
    shared by every kernel target (the targets of one case run one after the other)."""
    za, zb = random_logits((rows,), vocab, dtype, seed=rows * 7 + vocab)
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(vocab))
    if rows:
        labels[0] = -100
    return (za, zb, labels, delta_oracle(za, zb), steered_oracle(za, zb, 1.7, 0.1),
            token_mu_oracle(za, zb, labels, alpha=0.1))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", ROWS)
def test_ops_match_reference(rows, vocab, dtype, device):
    za, zb, labels, want_delta, want_steered, want_token_mu = oracle_case(rows, vocab, dtype)
    za, zb, labels = za.to(device), zb.to(device), labels.to(device)

    delta = svd_fast.steering_vector(za, zb)
    assert delta.dtype == torch.float32 and delta.shape == za.shape
    assert_close_rows(delta, *want_delta, "steering_vector:")

    z_hat = svd_fast.steer_logits(za, zb, mu=1.7, alpha=0.1)
    assert z_hat.dtype == torch.float32 and z_hat.shape == za.shape
    expected, atol, skip = want_steered
    assert_close_rows(z_hat, expected, atol, "steer_logits:", skip)

    terms = svd_fast.token_mu(za, zb, labels, alpha=0.1, return_terms=True)
    assert all(t.shape == labels.shape for t in terms)
    assert_token_mu_matches_oracle(terms, za, zb, labels, 0.1, expected=want_token_mu)
    assert len(svd_fast.token_mu(za, zb, labels)) == 2


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1e-4, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("mu", [-3.0, 0.0, 0.25, 8.0])
@pytest.mark.parametrize("fill", [-INF, "keep", -5.0, 2.0])
def test_steer_logits_settings(fill, mu, alpha, dtype, device):
    za, zb = random_logits((2, 3), 5000, dtype, device, seed=11)
    assert_steered_matches_oracle(svd_fast.steer_logits(za, zb, mu, alpha, fill), za, zb, mu, alpha, fill)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_leading_dims_and_non_contiguous(device):
    za, zb = random_logits((4, 6), 3001, torch.float32, device, seed=3)
    za_t, zb_t = za.transpose(0, 1), zb.transpose(0, 1)  # [6, 4, V], not contiguous
    assert not za_t.is_contiguous()
    assert_delta_matches_oracle(svd_fast.steering_vector(za_t, zb_t), za_t, zb_t)
    out = svd_fast.steer_logits(za_t, zb_t, 0.5)
    assert out.shape == (6, 4, 3001)
    assert_steered_matches_oracle(out, za_t, zb_t, 0.5)
    labels = torch.randint(0, 3001, (6, 4), device=device)
    terms = svd_fast.token_mu(za_t, zb_t, labels, return_terms=True)
    assert terms[0].shape == (6, 4)
    assert_token_mu_matches_oracle(terms, za_t, zb_t, labels, alpha=0.1)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_per_row_mu_equals_row_by_row(device):
    za, zb = random_logits((5,), 4000, torch.bfloat16, device, seed=5)
    mu = torch.tensor([-2.0, 0.0, 0.5, 1.0, 6.0], device=device)
    batched = svd_fast.steer_logits(za, zb, mu, fill=-3.0)
    for i in range(5):
        row = svd_fast.steer_logits(za[i : i + 1], zb[i : i + 1], float(mu[i]), fill=-3.0)
        torch.testing.assert_close(batched[i : i + 1], row, rtol=0, atol=0)
    assert_steered_matches_oracle(batched, za, zb, mu, fill=-3.0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("rows,vocab", [(1, 151936), (3, 20000), (2, 5000)])  # the first is split across tasks
@pytest.mark.parametrize("fill", [-INF, "keep", 1.5])
def test_in_place_over_either_input(fill, rows, vocab, device):
    za, zb = random_logits((rows,), vocab, torch.float32, device, seed=vocab)
    expected = svd_fast.steer_logits(za, zb, 0.8, fill=fill)
    for target in ("adapted", "base"):
        a, b = za.clone(), zb.clone()
        out = a if target == "adapted" else b
        assert svd_fast.steer_logits(a, b, 0.8, fill=fill, out=out) is out
        torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=f"out = z_{target}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_out_buffer_and_in_place(device):
    za, zb = random_logits((3,), 20000, torch.float32, device, seed=8)
    expected = svd_fast.steer_logits(za, zb, 0.8)
    buffer = torch.empty_like(za)
    assert svd_fast.steer_logits(za, zb, 0.8, out=buffer) is buffer
    torch.testing.assert_close(buffer, expected, rtol=0, atol=0)
    in_place = za.clone()
    result = svd_fast.steer_logits(in_place, zb, 0.8, out=in_place)
    assert result is in_place
    torch.testing.assert_close(in_place, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# The math itself (SPEC 1-4), checked without trusting the reference.


def explicit_delta(za, zb):
    """J g with the full softmax Jacobian, in float64."""
    pa, pb = za.double().softmax(-1), zb.double().softmax(-1)
    g = -(torch.log(pa / pb) + 1)
    jacobian = torch.diag_embed(pa) - pa.unsqueeze(-1) * pa.unsqueeze(-2)
    return (jacobian @ g.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("vocab", [2, 7, 50])
@pytest.mark.parametrize("device", CPU_TARGETS, indirect=True)
def test_delta_is_jacobian_product(impl, device, vocab):
    za, zb = random_logits((4,), vocab, seed=vocab)
    with backend(impl):
        delta = svd_fast.steering_vector(za, zb)
    torch.testing.assert_close(delta.double(), explicit_delta(za, zb), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("vocab", [1000, 151936])
@pytest.mark.parametrize("device", CPU_TARGETS, indirect=True)
def test_delta_sums_to_zero(impl, device, vocab):
    za, zb = random_logits((3,), vocab, seed=1)
    with backend(impl):
        delta = svd_fast.steering_vector(za, zb)
    assert torch.all(delta.double().sum(-1).abs() < 1e-4 * delta.double().abs().sum(-1))


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("device", CPU_TARGETS, indirect=True)
def test_token_mu_matches_spec_formula(impl, device):
    vocab, alpha, eps = 40, 0.3, 1e-12
    za, zb = random_logits((6,), vocab, seed=2, scale=1.0)
    labels = torch.tensor([0, 5, 17, 39, -100, 3])
    with backend(impl):
        mu_star, valid = svd_fast.token_mu(za, zb, labels, alpha=alpha, eps=eps)
    delta = explicit_delta(za, zb)
    pa = za.double().softmax(-1)
    keep = pa >= alpha * pa.max(-1, keepdim=True).values
    delta_k = torch.where(keep, delta, 0.0)
    for i, y in enumerate(labels.tolist()):
        if y == -100:
            assert not valid[i] and mu_star[i] == 0
            continue
        onehot = torch.nn.functional.one_hot(torch.tensor(y), vocab).double()
        expected = ((onehot - pa[i]) * delta_k[i]).sum() / ((delta_k[i] ** 2).sum() + eps)
        assert valid[i]
        assert math.isclose(float(mu_star[i]), float(expected), rel_tol=1e-3, abs_tol=1e-5)


@pytest.mark.parametrize("device", CPU_TARGETS, indirect=True)
def test_steered_logits_follow_spec_on_a_small_case(device):
    za = torch.tensor([[2.0, 1.9, 0.0, -3.0, 1.0]])
    zb = torch.tensor([[1.0, 2.0, 0.5, -1.0, 0.0]])
    mu, alpha = 2.5, 0.5
    delta = explicit_delta(za, zb).float()
    keep = za >= za.max() + math.log(alpha)
    assert keep.tolist() == [[True, True, False, False, False]]
    expected = torch.where(keep, za + mu * delta, -INF)
    torch.testing.assert_close(svd_fast.steer_logits(za, zb, mu, alpha), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Edge cases (SPEC 8), each op on native and reference alike.

IMPLS = ["native", "torch"]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_neg_inf_tokens_stay_masked(dtype, impl, device):
    za, zb = random_logits((3,), 1000, dtype, device, seed=4)
    za[:, ::3] = -INF  # already ruled out, e.g. by top-k before steering
    with backend(impl):
        delta = svd_fast.steering_vector(za, zb)
        for fill in (-INF, "keep", 4.0):
            z_hat = svd_fast.steer_logits(za, zb, -2.0, fill=fill)
            if fill != 4.0:
                assert torch.all(z_hat[:, ::3] == -INF)
    assert torch.all(delta[:, ::3] == 0)
    assert torch.isfinite(delta).all()
    assert_delta_matches_oracle(delta, za, zb)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", IMPLS)
def test_base_ruling_out_an_adapted_token_leaves_row_unsteered(impl, device):
    za, zb = random_logits((3,), 500, torch.float32, device, seed=6)
    zb[1, 10] = -INF  # KL(p_a || p_b) is infinite in row 1
    labels = torch.tensor([1, 2, 3], device=device)
    with backend(impl):
        delta = svd_fast.steering_vector(za, zb)
        z_hat = svd_fast.steer_logits(za, zb, 3.0, fill="keep")
        mu_star, valid = svd_fast.token_mu(za, zb, labels, alpha=1e-3)
    assert torch.all(delta[1] == 0) and delta[0].abs().sum() > 0
    torch.testing.assert_close(z_hat[1], za[1], rtol=0, atol=0)
    assert valid.tolist() == [True, False, True] and mu_star[1] == 0


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("poison", [float("nan"), INF])
@pytest.mark.parametrize("where", ["adapted", "base"])
def test_nan_row_is_nan_and_other_rows_unaffected(where, poison, impl, device):
    za, zb = random_logits((4,), 3000, torch.float32, device, seed=9)
    clean = za.clone(), zb.clone()
    (za if where == "adapted" else zb)[2, 123] = poison
    labels = torch.tensor([5, 6, 7, -100], device=device)
    with backend(impl):
        delta = svd_fast.steering_vector(za, zb)
        z_hat = svd_fast.steer_logits(za, zb, 1.0)
        mu_star, valid = svd_fast.token_mu(za, zb, labels)
    assert torch.isnan(delta[2]).all() and torch.isnan(z_hat[2]).all()
    assert torch.isnan(mu_star[2]) and not valid[2]
    keep_rows = [0, 1, 3]
    assert_delta_matches_oracle(delta[keep_rows], clean[0][keep_rows], clean[1][keep_rows])
    assert_steered_matches_oracle(z_hat[keep_rows], clean[0][keep_rows], clean[1][keep_rows], 1.0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", IMPLS)
def test_single_finite_entry_and_vocab_of_one(impl, device):
    za = torch.full((2, 9), -INF, device=device)
    za[0, 4] = 1.5
    za[1, 0] = -7.0
    zb = torch.randn(2, 9, generator=torch.Generator().manual_seed(17)).to(device)
    with backend(impl):
        delta = svd_fast.steering_vector(za, zb)
        z_hat = svd_fast.steer_logits(za, zb, 5.0)
        one = svd_fast.steer_logits(torch.tensor([[3.0]], device=device), torch.tensor([[-1.0]], device=device), 9.0)
        one_delta = svd_fast.steering_vector(torch.tensor([[3.0]], device=device), torch.tensor([[-1.0]], device=device))
    assert torch.all(delta == 0)
    torch.testing.assert_close(z_hat, za, rtol=0, atol=0)
    assert one.tolist() == [[3.0]] and one_delta.tolist() == [[0.0]]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", IMPLS)
def test_all_equal_logits(impl, device):
    za = torch.full((2, 64), 0.25, device=device)
    zb = torch.linspace(-1, 1, 128, device=device).reshape(2, 64)
    with backend(impl):
        same = svd_fast.steering_vector(za, za)
        z_hat = svd_fast.steer_logits(za, zb, 2.0, alpha=1.0)
    assert torch.all(same.abs() < 1e-9)
    assert torch.isfinite(z_hat).all()  # all tied with the top: all kept even at alpha = 1
    assert_steered_matches_oracle(z_hat, za, zb, 2.0, alpha=1.0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_magnitudes(dtype, device):
    za, zb = random_logits((3,), 32000, dtype, device, seed=12, scale=1e4)
    assert_delta_matches_oracle(svd_fast.steering_vector(za, zb), za, zb)
    assert_steered_matches_oracle(svd_fast.steer_logits(za, zb, 0.7), za, zb, 0.7)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_shaped_against_the_kernels_blocks(dtype, device):
    """The CPU kernels read a row in blocks of 1024, each measured from the maximum of the blocks before
    it: rows whose leading blocks are all -inf, whose maximum jumps by far more than exp can take (or
    grows block after block), and whose base row is -inf over a whole block."""
    vocab = 5000
    za, zb = random_logits((8,), vocab, torch.float32, seed=23)
    za[0, :2100] = zb[0, :2100] = -INF                       # nothing but -inf in the first blocks
    za[1, 3000:3010] += 90.0                                 # a later block leads the running max by 90
    za[2] = torch.linspace(-40, 40, vocab) + za[2] * 0.1     # the maximum grows in every block
    zb[2] = torch.linspace(40, -40, vocab) + zb[2] * 0.1
    za[3, 1024:2048] = -INF                                  # a whole block ruled out in both rows
    zb[3, 1024:2048] = -INF
    za[4, :1024] = -INF                                      # z_a only in later blocks, z_b everywhere
    za[5] *= 3000.0                                          # huge logits
    za[6, 1500], zb[6, 1500] = 60.0, -1e20                  # a later block's KL term overflows from the running max
    zb[7, 4000] = torch.finfo(torch.float32).min
    za, zb = za.to(device, dtype), zb.to(device, dtype)
    # row 7's ||delta_K||^2 (~1e68) is beyond float32's range: token_mu is not compared there
    labels = torch.tensor([3000, 3005, 4999, 100, 2000, 7, 1500, -100], device=device)
    assert_delta_matches_oracle(svd_fast.steering_vector(za, zb), za, zb)
    for fill in (-INF, "keep", 1.5):
        assert_steered_matches_oracle(svd_fast.steer_logits(za, zb, 2.5, 0.3, fill), za, zb, 2.5, 0.3, fill)
    terms = svd_fast.token_mu(za, zb, labels, alpha=0.3, return_terms=True)
    assert_token_mu_matches_oracle(terms, za, zb, labels, 0.3)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", IMPLS)
def test_alpha_one_keeps_only_the_top_token(impl, device):
    za, zb = random_logits((5,), 10000, torch.float32, device, seed=13)
    with backend(impl):
        z_hat = svd_fast.steer_logits(za, zb, 0.3, alpha=1.0)
    finite = torch.isfinite(z_hat)
    assert finite.sum(-1).tolist() == [1] * 5
    assert torch.equal(finite.float().argmax(-1), za.argmax(-1))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mu_zero_keeps_kept_tokens_unchanged(dtype, impl, device):
    za, zb = random_logits((4,), 8000, dtype, device, seed=14)
    with backend(impl):
        z_hat = svd_fast.steer_logits(za, zb, 0.0, alpha=0.05)
        kept = svd_fast.steer_logits(za, zb, 0.0, alpha=0.05, fill="keep")
    keep = reference.keep_mask(za, 0.05)
    assert torch.equal(z_hat[keep], za.float()[keep]) and torch.all(z_hat[~keep] == -INF)
    assert torch.equal(kept, za.float())


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_negative_mu_moves_against_delta(device):
    za, zb = random_logits((2,), 2000, torch.float32, device, seed=15)
    delta = svd_fast.steering_vector(za, zb)
    z_hat = svd_fast.steer_logits(za, zb, -4.0, fill="keep")
    moved = z_hat - za
    keep = reference.keep_mask(za, 0.1)
    assert torch.all(torch.sign(moved[keep]) == -torch.sign(delta[keep]))
    assert torch.all(moved[~keep] == 0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_empty_batch(device):
    za, zb = random_logits((0,), 50, torch.float32, device)
    assert svd_fast.steering_vector(za, zb).shape == (0, 50)
    assert svd_fast.steer_logits(za, zb, 1.0).shape == (0, 50)
    mu_star, valid = svd_fast.token_mu(za, zb, torch.empty(0, dtype=torch.long, device=device))
    assert mu_star.shape == valid.shape == (0,)


def test_token_mu_skips_positions_with_tiny_delta():
    za, zb = random_logits((3,), 100, seed=16)
    zb[1] = za[1]  # identical distributions: delta = 0
    mu_star, valid = svd_fast.token_mu(za, zb, torch.tensor([4, 4, 4]))
    assert valid.tolist() == [True, False, True] and mu_star[1] == 0
    _, valid_strict = svd_fast.token_mu(za, zb, torch.tensor([4, 4, 4]), eps=1e6)
    assert not valid_strict.any()


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the argument.

BAD_CALLS = [
    (lambda za, zb: svd_fast.steer_logits(za, zb[:, :-1], 1.0), ValueError, "z_base has"),
    (lambda za, zb: svd_fast.steer_logits(za, zb[:1], 1.0), ValueError, "same vocabulary"),
    (lambda za, zb: svd_fast.steer_logits(za, zb.half(), 1.0), TypeError, "cast one"),
    (lambda za, zb: svd_fast.steer_logits(za.long(), zb.long(), 1.0), TypeError, "z_adapted must hold"),
    (lambda za, zb: svd_fast.steering_vector(za.double(), zb.double()), TypeError, "float32, bfloat16"),
    (lambda za, zb: svd_fast.steering_vector(za.numpy(), zb), TypeError, "z_adapted must be a torch.Tensor"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, 1.0, alpha=0.0), ValueError, "alpha must lie in"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, 1.0, alpha=1.5), ValueError, "alpha must lie in"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, 1.0, alpha=float("nan")), ValueError, "alpha"),
    (lambda za, zb: svd_fast.token_mu(za, zb, torch.zeros(2, dtype=torch.long), alpha=-1), ValueError, "alpha"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, float("nan")), ValueError, "mu must be finite"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, INF), ValueError, "mu must be finite"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, torch.tensor([1.0, float("nan")])), ValueError, "mu must be"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, torch.ones(3)), ValueError, "one value per row"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, "big"), TypeError, "mu must be a real number"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, 1.0, fill="drop"), ValueError, "fill must be"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, 1.0, fill=INF), ValueError, "fill must be"),
    (lambda za, zb: svd_fast.steer_logits(za, zb, 1.0, out=torch.empty(2, 10, dtype=torch.bfloat16)),
     ValueError, "out must be a float32"),
    (lambda za, zb: svd_fast.token_mu(za, zb, torch.tensor([0, 10])), ValueError, "labels must be token ids"),
    (lambda za, zb: svd_fast.token_mu(za, zb, torch.tensor([-5, 1])), ValueError, "found -5"),
    (lambda za, zb: svd_fast.token_mu(za, zb, torch.tensor([0.0, 1.0])), TypeError, "labels must be an integer"),
    (lambda za, zb: svd_fast.token_mu(za, zb, torch.tensor([0, 1, 2])), ValueError, "one token id per row"),
    (lambda za, zb: svd_fast.steer_logits(za, zb.to("meta"), 1.0), ValueError, "different|is on"),
    (lambda za, zb: svd_fast.token_mu(za, zb, torch.tensor([0, 1], device="meta")), ValueError, "labels are on"),
    (lambda za, zb: svd_fast.steering_vector(za[:, :0], zb[:, :0]), ValueError, "non-empty last"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("call,error,message", BAD_CALLS)
def test_bad_input_raises_clear_error(call, error, message, impl):
    za, zb = random_logits((2,), 10)
    with backend(impl), pytest.raises(error, match=message):
        call(za, zb)


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        svd_fast.set_backend("fastest")


def _strided_views(z):
    """Views of a [3, 5, V] tensor as the decode loop and calibration take them, and one that needs a copy."""
    return {
        "last position": z[:, -1],                     # one leading stride, T * V
        "all but the last": z[:, :-1],                 # two leading strides
        "transposed": z.transpose(0, 1),               # [5, 3, V], strides (V, 5 V)
        "every other row": z[::2, 1:4],                # strides (10 V, V)
        "three strides (copied)": z.unsqueeze(0).expand(2, -1, -1, -1)[:, ::2, ::2],
    }


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows_are_read_in_place(dtype, device):
    """Rows of non-contiguous inputs (a last dim of stride 1 and leading dims that merge into two strides) are
    read where they lie: the same results as on contiguous copies (bitwise on the CPU), and on the CPU no
    copy of the input is made."""
    za, zb = random_logits((3, 5), 3001, dtype, device, seed=31)
    exact = device == "cpu"
    for name, (a, b) in {k: (v, _strided_views(zb)[k]) for k, v in _strided_views(za).items()}.items():
        labels = torch.randint(0, 3001, a.shape[:-1], generator=torch.Generator().manual_seed(1)).to(device)
        calls = {
            "steering_vector": lambda a, b: (svd_fast.steering_vector(a, b),),
            "steer_logits": lambda a, b: (svd_fast.steer_logits(a, b, 0.8, fill="keep"),),
            "token_mu": lambda a, b: svd_fast.token_mu(a, b, labels, return_terms=True),
            "steered_nll": lambda a, b: svd_fast.steered_nll(a, b, labels, [-2.0, 0.5]),
        }
        for op, call in calls.items():
            got, want = call(a, b), call(a.contiguous(), b.contiguous())
            for g, w in zip(got, want):
                if exact:
                    assert torch.equal(g.nan_to_num(), w.nan_to_num()), (name, op)
                else:
                    torch.testing.assert_close(g, w, equal_nan=True, msg=f"{name} {op}")
    broadcast_base = zb[:1, 2].expand(3, -1)  # one base row for every adapted row: stride 0
    torch.testing.assert_close(svd_fast.steering_vector(za[:, 2], broadcast_base),
                               svd_fast.steering_vector(za[:, 2].contiguous(), broadcast_base.contiguous()),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", CPU_TARGETS, indirect=True)
def test_strided_inputs_are_not_copied(device):
    from torch.profiler import ProfilerActivity, profile

    za, zb = random_logits((4, 6), 20000, torch.bfloat16, seed=32)
    a, b = za[:, :-1], zb[:, :-1]                              # calibration's slice
    labels = torch.randint(0, 20000, a.shape[:-1])
    input_bytes = a.numel() * a.element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        svd_fast.token_mu(a, b, labels)
        svd_fast.steered_nll(a, b, labels, [-1.0, 1.0])
        svd_fast.steer_logits(za[:, -1], zb[:, -1], 0.5)      # the decode step's last position
    copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::contiguous")]  # what .contiguous() runs
    assert not copies, copies
    biggest = max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("svd_fast::token_mu") or
                  e.name.startswith("svd_fast::steered_nll"))
    assert biggest < input_bytes / 100  # outputs only: a few floats per row
