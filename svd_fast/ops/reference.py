"""Pure-PyTorch reference of the steering math (SPEC.md sections 1-4 and 8).

Written for reading, not speed: it builds [B, V] temporaries freely. The same code serves twice:
handed float32, bfloat16 or float16 logits it computes in float32 (the fallback when the compiled
extension is missing, what svd_fast.ops runs with backend "torch"); handed float64 logits it computes
in float64, and that is the oracle the fused kernels are tested against (float32 rounding of sums over
V terms depends on the order of the additions, so a float32 oracle is no more exact than the kernels).
Inputs are already validated by svd_fast.ops.
"""
import math

import torch

INF = float("inf")


def _upcast(z):
    """The computation dtype: float64 for float64 logits (the oracle), float32 for everything else."""
    return z if z.dtype == torch.float64 else z.float()


def _bad_rows(za, zb):
    """Rows whose outputs are NaN: a NaN or +inf in either input, or z_a entirely -inf."""
    finite_or_neg_inf = (za < INF) & (zb < INF)  # False for NaN and +inf
    return ~finite_or_neg_inf.all(-1, keepdim=True) | (za == -INF).all(-1, keepdim=True)


def steering_vector(z_adapted, z_base):
    """delta = J g = p_a * (KL(p_a || p_b) - log(p_a / p_b))   (SPEC 1); float32 (float64 for float64 input)."""
    za, zb = _upcast(z_adapted), _upcast(z_base)
    log_pa, log_pb = za.log_softmax(-1), zb.log_softmax(-1)
    pa = log_pa.exp()
    live = za > -INF  # p_a > 0
    log_ratio = torch.where(live, log_pa - log_pb, 0.0)
    kl = (pa * log_ratio).sum(-1, keepdim=True)
    delta = pa * (kl - log_ratio)
    # SPEC 8: z_b = -inf where z_a is finite makes the KL infinite; such a row is left unsteered.
    steerable = ~(live & (zb == -INF)).any(-1, keepdim=True)
    delta = torch.where(steerable, delta, 0.0)
    return torch.where(_bad_rows(za, zb), float("nan"), delta)


def keep_mask(z_adapted, alpha):
    """K = {y : p_a(y) >= alpha * max p_a} = {y : z_a(y) >= max z_a + log(alpha)}   (SPEC 2)."""
    za = _upcast(z_adapted)
    return za >= za.max(-1, keepdim=True).values + math.log(alpha)


def steer_logits(z_adapted, z_base, mu, alpha=0.1, fill=-INF):
    """z_hat = z_a + mu * delta on the keep set, `fill` elsewhere   (SPEC 3).

    mu: float, or a tensor with one value per row (za.shape[:-1]); fill: -inf, "keep" or a finite float.
    """
    za = _upcast(z_adapted)
    delta = steering_vector(z_adapted, z_base)
    if torch.is_tensor(mu):
        mu = mu.to(za.device, za.dtype).reshape(*za.shape[:-1], 1)
    if fill == "keep":
        masked = za
    elif fill == -INF:
        masked = torch.full_like(za, -INF)
    else:
        masked = za + mu * fill
    z_hat = torch.where(keep_mask(za, alpha), za + mu * delta, masked)
    return torch.where(_bad_rows(za, _upcast(z_base)), float("nan"), z_hat)


def token_mu(z_adapted, z_base, labels, alpha=0.1, eps=1e-12, ignore_index=-100):
    """Per-position mu* = <onehot(label) - p_a, delta_K> / (||delta_K||^2 + eps)   (SPEC 4).

    Returns (mu_star, valid, numerator, norm_sq) shaped like labels. Skipped positions (label ==
    ignore_index, or ||delta_K||^2 < eps) give mu_star = 0 and valid = False; rows with NaN give NaN and
    False. numerator and norm_sq are mu*'s two terms: 0 on ignored rows, NaN on NaN rows.
    """
    vocab = z_adapted.shape[-1]
    za = _upcast(z_adapted).reshape(-1, vocab)
    zb = _upcast(z_base).reshape(-1, vocab)
    labels = labels.reshape(-1)
    delta_k = torch.where(keep_mask(za, alpha), steering_vector(za, zb), 0.0)
    target = labels != ignore_index
    onehot = torch.nn.functional.one_hot(torch.where(target, labels, 0), vocab).to(za.dtype)
    numerator = ((onehot - za.softmax(-1)) * delta_k).sum(-1)
    norm_sq = (delta_k**2).sum(-1)
    bad = _bad_rows(za, zb).squeeze(-1)
    valid = target & ~bad & (norm_sq >= eps)
    mu_star = torch.where(valid, numerator / (norm_sq + eps), 0.0)
    mu_star = torch.where(target & bad, float("nan"), mu_star)
    numerator = torch.where(target, torch.where(bad, float("nan"), numerator), 0.0)
    norm_sq = torch.where(target, torch.where(bad, float("nan"), norm_sq), 0.0)
    shape = z_adapted.shape[:-1]
    return tuple(t.reshape(shape) for t in (mu_star, valid, numerator, norm_sq))


def steered_nll(z_adapted, z_base, labels, mus, alpha=0.1, fill="keep", ignore_index=-100):
    """NLL of each label under z_hat(mu) and its first two derivatives in mu, for every strength mu_k.

    z_hat(mu) = z_a + mu * s with slope s = delta on the keep set, fill's slope elsewhere (0 for "keep",
    lambda for a finite fill; under -inf the masked tokens are out of the softmax). Per row and strength:
        loss = logsumexp z_hat - z_hat[label]
        d_loss = E_{p_hat}[s] - s[label],   d2_loss = Var_{p_hat}[s]   (p_hat = softmax z_hat)
    Returns three [..., K] tensors (the rows of the logits, one column per strength). Ignored rows give 0; a label that z_hat rules out
    (masked under fill=-inf, or z_a = -inf) gives loss = +inf and derivatives 0; NaN rows give NaN.
    """
    vocab = z_adapted.shape[-1]
    za = _upcast(z_adapted).reshape(-1, vocab)
    zb = _upcast(z_base).reshape(-1, vocab)
    labels = labels.reshape(-1)
    mus = torch.as_tensor(mus, dtype=za.dtype, device=za.device).reshape(-1)
    kept = keep_mask(za, alpha)
    masked_slope = 0.0 if fill in ("keep", -INF) else fill
    slope = torch.where(kept, steering_vector(za, zb), masked_slope)
    target = labels != ignore_index
    label = torch.where(target, labels, 0).unsqueeze(-1)
    columns = []
    for mu in mus.tolist():
        z_hat = steer_logits(za, zb, mu, alpha, fill)
        log_p = z_hat.log_softmax(-1)
        p = log_p.exp()
        mean = (p * slope).sum(-1)
        loss = -log_p.gather(-1, label).squeeze(-1)
        d_loss = mean - slope.gather(-1, label).squeeze(-1)
        d2_loss = (p * (slope - mean.unsqueeze(-1)) ** 2).sum(-1)
        ruled_out = loss == INF
        columns.append((loss, torch.where(ruled_out, 0.0, d_loss), torch.where(ruled_out, 0.0, d2_loss)))
    outs = [torch.stack([c[i] for c in columns], -1) if columns else za.new_zeros(za.shape[0], 0) for i in range(3)]
    bad = _bad_rows(za, zb)
    shape = (*z_adapted.shape[:-1], mus.numel())
    return tuple(torch.where(target.unsqueeze(-1), torch.where(bad, float("nan"), o), 0.0).reshape(shape) for o in outs)
