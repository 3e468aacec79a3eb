import contextlib
import math

import pytest
import torch

import svd_fast

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every kernel target this machine can run: each CPU ISA path (AVX-512, AVX2, baseline) that the CPU
# supports, and CUDA when there is a GPU. Tests take it as `device` through the fixture below
# (parametrize with indirect=True), which forces the ISA for the test's duration.
CPU_TARGETS = [f"cpu-{isa}" for isa in svd_fast.supported_cpu_isas()] or ["cpu"]
DEVICES = [
    *CPU_TARGETS,
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
U32 = 2.0**-24  # float32 unit roundoff


@pytest.fixture
def device(request):
    """"cpu" with the kernel ISA of the parameter forced ("cpu-avx2" -> avx2), or "cuda"."""
    target = getattr(request, "param", "cpu")
    if not target.startswith("cpu-"):
        yield target
        return
    with svd_fast.forced_cpu_isa(target.removeprefix("cpu-")):
        yield "cpu"


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


def oracle(fn, *logits, **kwargs):
    """The reference evaluated in float64 on the same (already rounded) inputs: the test oracle."""
    return fn(*(z.double() if torch.is_tensor(z) and z.is_floating_point() else z for z in logits), **kwargs)


def f32_tolerance(vocab):
    """The relative error of a float32 sum over a row of V logits, as the kernels accumulate it.

    Every output depends on three such sums (sum exp(z_a - max_a), sum exp(z_b - max_b) and the KL
    numerator), added in an order that depends on the vector width, the blocks and the threads. Their
    worst-case bound, V * u (u = 2^-24), is too loose to catch anything; probabilistic rounding-error
    analysis (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019) bounds them by about sqrt(V) * u with
    overwhelming probability. On top come a few ulp per output from exp (~2 ulp on the CPU, __expf on
    CUDA), the logs of the sums and the final multiply-adds, which 32 u covers.
    """
    return U32 * (32 + math.sqrt(vocab))


def delta_error_scale(z_adapted, z_base):
    """Per row (shape [..., 1]), what the float32 error of delta scales with: max_y p_a(y) (1 + |KL| + |r(y)|),
    r(y) = log p_a(y) - log p_b(y). delta(y) = p_a(y) (KL - r(y)) is a difference of two terms computed to
    relative accuracy f32_tolerance (their logs of sums add an absolute error of the same size, the 1), times
    p_a(y), itself that accurate; when KL and r(y) nearly cancel, delta is small but its error is not."""
    za, zb = z_adapted.double(), z_base.double()
    log_pa, log_pb = za.log_softmax(-1), zb.log_softmax(-1)
    pa = log_pa.exp()
    r = torch.where(za > -math.inf, log_pa - log_pb, 0.0)
    kl = (pa * r).sum(-1, keepdim=True)
    terms = (pa * (1 + kl.abs() + r.abs())).nan_to_num(0.0, posinf=0.0, neginf=0.0)  # NaN / unsteerable rows
    return terms.amax(-1, keepdim=True) if terms.shape[-1] else terms[..., :1]


def assert_close_rows(actual, expected, atol, msg="", skip=None):
    """float32 `actual` against float64 `expected`: NaN, inf and -inf in the same places, finite entries
    within `atol` (per row, broadcast); entries where `skip` is True are not compared."""
    assert actual.dtype == torch.float32 and expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    got = actual.detach().cpu().double()
    expected = expected.cpu()
    atol = atol.cpu() if torch.is_tensor(atol) else atol
    compared = torch.ones_like(expected, dtype=torch.bool) if skip is None else ~skip.cpu()
    assert torch.equal(torch.isnan(got)[compared], torch.isnan(expected)[compared]), f"{msg} NaN in different places"
    infinite = torch.isinf(expected) & compared
    assert torch.equal(got[infinite], expected[infinite]) and not bool(torch.isinf(got[compared & ~infinite]).any()), \
        f"{msg} infinities differ"
    excess = torch.where(compared & torch.isfinite(expected), (got - expected).abs() - atol, -1.0)
    bad = excess > 0
    assert not bool(bad.any()), (f"{msg} {int(bad.sum())} of {bad.numel()} entries beyond the bound; worst "
                                 f"excess {float(excess.max()):.3g} at {tuple(int(i) for i in bad.nonzero()[0])}")


def delta_oracle(z_adapted, z_base):
    """(expected, atol) for steering_vector: the float64 reference, and 2 * f32_tolerance(V) * delta_error_scale."""
    from svd_fast import reference

    expected = oracle(reference.steering_vector, z_adapted, z_base)
    return expected, 2 * f32_tolerance(z_adapted.shape[-1]) * delta_error_scale(z_adapted, z_base)


def undecidable_keep(z_adapted, alpha):
    """Tokens within float32 rounding of the keep threshold max z_a + log(alpha): the kernels compare
    against a threshold rounded to float32, so these may fall either side. Shaped like z_adapted."""
    za = z_adapted.double()
    top = za.amax(-1, keepdim=True) if za.shape[-1] else za[..., :0]
    threshold = top + math.log(alpha)
    return (za - threshold).abs() <= 4 * U32 * (top.abs() + abs(math.log(alpha)))


def steered_oracle(z_adapted, z_base, mu, alpha=0.1, fill=-math.inf):
    """(expected, atol, skip) for steer_logits: z_hat = z_a + mu delta rounds to the size of the row's
    largest |z_hat| and carries |mu| times delta's error; tokens on the keep threshold are not compared."""
    from svd_fast import reference

    expected = oracle(reference.steer_logits, z_adapted, z_base, mu, alpha, fill)
    mu_rows = mu.double().reshape(*expected.shape[:-1], 1).abs().cpu() if torch.is_tensor(mu) else abs(mu)
    finite = torch.where(torch.isfinite(expected), expected.abs(), 0.0)
    row_size = finite.amax(-1, keepdim=True) if finite.shape[-1] else finite[..., :1]
    tol = f32_tolerance(z_adapted.shape[-1])
    atol = tol * (row_size.cpu() + 2 * mu_rows * delta_error_scale(z_adapted, z_base).cpu())
    return expected, atol, undecidable_keep(z_adapted, alpha)


def token_mu_oracle(z_adapted, z_base, labels, alpha, eps=1e-12):
    """(expected (mu_star, valid, numerator, norm_sq), bounds of the three float outputs, rows to skip).

    Each delta_K(y) may be off by e = 2 tol S (S = delta_error_scale of the row), and p_a(y) by tol p_a(y),
    so the numerator <onehot - p_a, delta_K> by at most 2 e + tol sum_K p_a |delta| <= 4 tol S, and
    ||delta_K||^2 by 2 e sum_K |delta|; mu* = num / den then by (|d num| + |mu*| |d den|) / den. Rows with
    a token on the keep threshold are skipped (see undecidable_keep)."""
    from svd_fast import reference

    want = oracle(reference.token_mu, z_adapted, z_base, labels, alpha=alpha, eps=eps)
    want_mu, want_valid, _, want_sq = (t.cpu() for t in want)
    vocab = z_adapted.shape[-1]
    za, zb = z_adapted.double().reshape(-1, vocab), z_base.double().reshape(-1, vocab)
    delta_k = torch.where(reference.keep_mask(za, alpha), reference.steering_vector(za, zb), 0.0).abs()
    delta_k = delta_k.nan_to_num(0.0).cpu()  # NaN rows: compared for NaN outputs
    e = 2 * f32_tolerance(vocab) * delta_error_scale(za, zb).reshape(want_sq.shape).cpu()
    d_num, d_sq = 2 * e, 2 * e * delta_k.sum(-1).reshape(want_sq.shape)
    d_mu = torch.where(want_valid, (d_num + want_mu.abs() * d_sq) / (want_sq + eps), 0.0)
    skip = undecidable_keep(za, alpha).any(-1).reshape(want_sq.shape).cpu()
    return want, (d_mu, d_num, d_sq), skip


def assert_delta_matches_oracle(actual, z_adapted, z_base):
    assert_close_rows(actual, *delta_oracle(z_adapted, z_base), "steering_vector:")


def assert_steered_matches_oracle(actual, z_adapted, z_base, mu, alpha=0.1, fill=-math.inf):
    expected, atol, skip = steered_oracle(z_adapted, z_base, mu, alpha, fill)
    assert_close_rows(actual, expected, atol, "steer_logits:", skip)


def assert_token_mu_matches_oracle(got, z_adapted, z_base, labels, alpha, eps=1e-12, expected=None):
    """token_mu's (mu_star, valid, numerator, norm_sq) against token_mu_oracle (or a precomputed one)."""
    want, bounds, skip = expected or token_mu_oracle(z_adapted, z_base, labels, alpha, eps)
    assert torch.equal(got[1].cpu()[~skip], want[1].cpu()[~skip]), "token_mu valid"
    for name, got_t, want_t, bound in zip(("mu_star", "numerator", "norm_sq"), (got[0], *got[2:]),
                                         (want[0], *want[2:]), bounds):
        assert_close_rows(got_t, want_t, bound, f"token_mu {name}:", skip)


@pytest.fixture(autouse=True)
def _native_by_default():
    """Tests run the compiled kernels (and fail if they were not built) unless they switch backend;
    the global RNG is seeded so every test sees the same inputs on every run."""
    torch.manual_seed(0)
    with backend("native"):
        yield


def steered_nll_oracle(z_adapted, z_base, labels, mus, alpha=0.1, fill="keep"):
    """(expected (loss, d_loss, d2_loss), their bounds, rows to skip) for steered_nll.

    Per row and strength: x = z_a + mu * slope is rounded to the size of the row's largest |x| and carries
    |mu| times the slope's error (delta's, 2 tol S); the weights exp(x - max) and the log of their sum are
    then off by w = tol (4 + 2 max|x|) + 2 |mu| e_slope. loss is off by w + tol; d_loss = E[t] (t = slope -
    slope[label], |t| <= T = 2 max|slope|) by w T + tol T + 2 e_slope; d2_loss = E[t^2] - E[t]^2 by
    2 T^2 (w + tol) + 4 T e_slope. Rows with a token on the keep threshold are skipped."""
    from svd_fast import reference

    want = oracle(reference.steered_nll, z_adapted, z_base, labels, mus, alpha=alpha, fill=fill)
    vocab = z_adapted.shape[-1]
    za, zb = z_adapted.double().reshape(-1, vocab).cpu(), z_base.double().reshape(-1, vocab).cpu()
    mus = torch.as_tensor(mus, dtype=torch.float64).reshape(1, -1)
    tol = f32_tolerance(vocab)
    kept = reference.keep_mask(za, alpha)
    masked_slope = 0.0 if fill in ("keep", -math.inf) else fill
    slope = torch.where(kept, reference.steering_vector(za, zb), masked_slope).nan_to_num(0.0)
    in_softmax = kept if fill == -math.inf else za > -math.inf
    max_slope = torch.where(in_softmax, slope.abs(), 0.0).amax(-1, keepdim=True)
    max_za = torch.where(za > -math.inf, za.abs(), 0.0).nan_to_num(0.0, posinf=0.0).amax(-1, keepdim=True)
    e_slope = 2 * tol * delta_error_scale(za, zb)
    w = tol * (4 + 2 * (max_za + mus.abs() * max_slope)) + 2 * mus.abs() * e_slope
    t = 2 * max_slope
    bounds = (w + tol, w * t + tol * t + 2 * e_slope, 2 * t**2 * (w + tol) + 4 * t * e_slope)
    shape = want[0].shape
    skip = undecidable_keep(za, alpha).any(-1, keepdim=True).expand(-1, mus.shape[1])
    return want, tuple(b.reshape(shape) for b in bounds), skip.reshape(shape)


def assert_steered_nll_matches_oracle(got, z_adapted, z_base, labels, mus, alpha=0.1, fill="keep", expected=None):
    want, bounds, skip = expected or steered_nll_oracle(z_adapted, z_base, labels, mus, alpha, fill)
    for name, got_t, want_t, bound in zip(("loss", "d_loss", "d2_loss"), got, want, bounds):
        assert_close_rows(got_t, want_t.cpu(), bound, f"steered_nll {name}:", skip)
