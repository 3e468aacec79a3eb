"""The steering ops: argument checks, backend choice, and the dispatcher registration of the kernels.

Each op runs the compiled kernels (``torch.ops.svd_fast.*``, CPU and CUDA, from ``csrc/``) when the
extension is built and the PyTorch reference (``svd_fast.reference``) otherwise. ``SVD_FAST_BACKEND``
(``auto``, ``native`` or ``torch``) or :func:`set_backend` forces one. The CPU kernels run the widest
vector ISA the CPU supports; ``SVD_FAST_CPU_ISA`` (``auto``, ``avx512``, ``avx2``, ``baseline``) or
:func:`set_cpu_isa` forces one, so every path can be run and tested on a CPU that has it.
"""
import contextlib
import math
import numbers
import os
import warnings

import torch
import torch.nn.functional as F

from . import reference

__all__ = [
    "steering_vector",
    "steer_logits",
    "token_mu",
    "steered_nll",
    "small_batch_linear",
    "set_backend",
    "get_backend",
    "native_available",
    "has_cuda_kernels",
    "cpu_isa",
    "set_cpu_isa",
    "supported_cpu_isas",
    "forced_cpu_isa",
]

_BACKENDS = ("auto", "native", "torch")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMALL_BATCH_MAX_ROWS = 16  # kMaxRows in csrc/small_batch_linear_cpu.cpp
_FILL_NEG_INF, _FILL_KEEP, _FILL_VALUE = 0, 1, 2  # FillMode in csrc/steering_math.h
_REBUILD_HINT = "rebuild with `pip install --no-build-isolation .` (see README)"


def _load_extension():
    try:
        from .. import _C  # noqa: F401  (loading the library registers torch.ops.svd_fast)
    except ImportError as err:
        warnings.warn(
            f"svd_fast: compiled kernels not found ({err}); using the PyTorch reference, which is slower. "
            f"To get the kernels, {_REBUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


_NATIVE = _load_extension()
_CUDA_KERNELS = _NATIVE and torch.ops.svd_fast.has_cuda_kernels()
_backend = "auto"
_warned_cuda_fallback = False
_CPU_ISAS = ("avx512", "avx2", "baseline")


def native_available():
    """True when the compiled extension is loaded."""
    return _NATIVE


def has_cuda_kernels():
    """True when the extension was compiled with its CUDA kernels."""
    return _CUDA_KERNELS


def cpu_isa():
    """The vector ISA the CPU kernels (steering ops and small_batch_linear) run now: "avx512", "avx2" or
    "baseline" (SSE2; small_batch_linear then runs F.linear). None without the compiled kernels."""
    return str(torch.ops.svd_fast.cpu_isa()) if _NATIVE else None


def supported_cpu_isas():
    """The ISAs this CPU can run, widest first, e.g. ["avx512", "avx2", "baseline"] (empty without the kernels)."""
    return [str(name) for name in torch.ops.svd_fast.supported_cpu_isas()] if _NATIVE else []


def set_cpu_isa(name):
    """Force the CPU kernels' ISA for this process: "avx512", "avx2" or "baseline", or "auto" (the widest
    this CPU supports, the default). The environment variable SVD_FAST_CPU_ISA does the same at start-up.
    Returns the previous setting ("auto" or the forced name). Raises ValueError for an unknown name or an
    ISA this CPU lacks, RuntimeError without the compiled kernels."""
    if name != "auto" and name not in _CPU_ISAS:
        raise ValueError(f"cpu isa must be 'auto' or one of {_CPU_ISAS}, got {name!r}")
    if not _NATIVE:
        raise RuntimeError(f"set_cpu_isa needs the compiled kernels: {_REBUILD_HINT}")
    if name != "auto" and name not in supported_cpu_isas():
        raise ValueError(f"this CPU cannot run the {name} kernels; it supports {supported_cpu_isas()}")
    return str(torch.ops.svd_fast.set_cpu_isa(name))


@contextlib.contextmanager
def forced_cpu_isa(name):
    """set_cpu_isa(name) inside the block; the previous setting comes back on exit. The setting is
    process-wide: do not change it while another thread runs the kernels."""
    previous = set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)


def set_backend(name):
    """Force the implementation: "native" (compiled kernels), "torch" (reference) or "auto"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "native" and not _NATIVE:
        raise RuntimeError(f"backend 'native' asked for, but the compiled kernels are missing: {_REBUILD_HINT}")
    _backend = name


def get_backend():
    """The forced backend name ("auto", "native" or "torch")."""
    return _backend


def _use_native(device):
    global _warned_cuda_fallback
    if _backend == "torch" or not _NATIVE:
        return False
    if device.type == "cpu" or (device.type == "cuda" and _CUDA_KERNELS):
        return True
    if _backend == "native":
        raise RuntimeError(f"svd_fast has no compiled kernels for {device.type} tensors: {_REBUILD_HINT} "
                           "on a machine with the CUDA toolkit, or use backend 'torch'")
    if not _warned_cuda_fallback:
        _warned_cuda_fallback = True
        warnings.warn(f"svd_fast: no compiled kernels for {device.type}; using the PyTorch reference", RuntimeWarning)
    return False


_env_backend = os.environ.get("SVD_FAST_BACKEND", "auto").strip().lower() or "auto"
if _env_backend not in _BACKENDS:
    raise ValueError(f"SVD_FAST_BACKEND must be one of {_BACKENDS}, got {_env_backend!r}")
set_backend(_env_backend)
if _NATIVE:
    try:
        cpu_isa()  # reads SVD_FAST_CPU_ISA: a bad value fails here, at import, in one line
    except RuntimeError as err:
        raise ValueError(str(err).splitlines()[0].removeprefix("svd_fast: ")) from None


# ---------------------------------------------------------------------------------------------------
# Argument checks: one clear error naming the argument.


def _check_logits(z_adapted, z_base):
    for name, z in (("z_adapted", z_adapted), ("z_base", z_base)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of logits, got {type(z).__name__}")
        if z.dtype not in _LOGIT_DTYPES:
            raise TypeError(f"{name} must hold float32, bfloat16 or float16 logits, got {z.dtype}")
    if z_adapted.dtype != z_base.dtype:
        raise TypeError(f"z_adapted is {z_adapted.dtype} but z_base is {z_base.dtype}: cast one so both match")
    if z_adapted.device != z_base.device:
        raise ValueError(f"z_adapted is on {z_adapted.device} but z_base is on {z_base.device}: "
                         "move both to one device")
    if z_adapted.shape != z_base.shape:
        raise ValueError(f"z_adapted has shape {tuple(z_adapted.shape)} but z_base has {tuple(z_base.shape)}: "
                         "both must be [..., V] with the same vocabulary size V")
    if z_adapted.dim() == 0 or z_adapted.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape "
                         f"{tuple(z_adapted.shape)}")


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def _check_alpha(alpha):
    _check_real("alpha", alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")


def _checking_values():
    return not torch.compiler.is_compiling()


def _mu_args(mu, z_adapted):
    """(mu_rows, mu): a float32 tensor with one value per row, or None and a float."""
    rows_shape = z_adapted.shape[:-1]
    if isinstance(mu, torch.Tensor):
        if not mu.is_floating_point():
            raise TypeError(f"mu must be a float or a floating-point tensor, got a {mu.dtype} tensor")
        if mu.device != z_adapted.device:
            raise ValueError(f"mu is on {mu.device} but the logits are on {z_adapted.device}")
        if mu.numel() == 1:
            mu = mu.reshape(1).expand(math.prod(rows_shape))
        elif mu.shape != rows_shape and mu.shape != (math.prod(rows_shape),):
            raise ValueError(f"mu must be a float or hold one value per row, shape {tuple(rows_shape)}; "
                             f"got shape {tuple(mu.shape)}")
        if mu.device.type == "cpu" and _checking_values() and not bool(torch.isfinite(mu).all()):
            raise ValueError("mu must be finite: the tensor holds NaN or inf")
        return mu.reshape(-1).to(torch.float32).contiguous(), 0.0
    return None, _check_mu_value(mu)


def _check_mu_value(mu):
    """A finite real mu, as a float."""
    _check_real("mu", mu)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu}")
    return float(mu)


def _fill_args(fill):
    """(fill_mode, fill_value) for the kernels."""
    if isinstance(fill, str):
        if fill != "keep":
            raise ValueError(f'fill must be -inf, "keep" or a finite float, got {fill!r}')
        return _FILL_KEEP, 0.0
    _check_real("fill", fill)
    if fill == -math.inf:
        return _FILL_NEG_INF, 0.0
    if not math.isfinite(fill):
        raise ValueError(f'fill must be -inf, "keep" or a finite float, got {fill}')
    return _FILL_VALUE, float(fill)


def _check_out(out, z_adapted):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.float32 or out.shape != z_adapted.shape or out.device != z_adapted.device:
        raise ValueError(f"out must be a float32 tensor of shape {tuple(z_adapted.shape)} on {z_adapted.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def _check_labels(labels, z_adapted, ignore_index, check_values=True):
    """check_values=False leaves the ids to the kernels (an out-of-range id gives its row NaN outputs): on a
    GPU, reading them on the host would be a sync."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of token ids, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    if labels.device != z_adapted.device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {z_adapted.device}")
    rows_shape = z_adapted.shape[:-1]
    if labels.shape != rows_shape and labels.shape != (math.prod(rows_shape),):
        raise ValueError(f"labels must have one token id per row of logits, shape {tuple(rows_shape)}; "
                         f"got {tuple(labels.shape)}")
    if check_values and _checking_values() and labels.numel():
        vocab = z_adapted.shape[-1]
        ok = (labels == ignore_index) | ((labels >= 0) & (labels < vocab))
        if not bool(ok.all()):
            bad = labels[~ok][0].item()
            raise ValueError(f"labels must be token ids in [0, {vocab}) or ignore_index={ignore_index}; "
                             f"found {bad}")


# ---------------------------------------------------------------------------------------------------
# The ops.


def steering_vector(z_adapted, z_base):
    """delta = J g (SPEC 1) for logits [..., V] of the adapted and the base model; float32 [..., V].

    A row with NaN (or +inf) in either input comes back all NaN; a row where z_base is -inf at a
    token z_adapted allows has an infinite KL and comes back all zeros (left unsteered).
    """
    _check_logits(z_adapted, z_base)
    if _use_native(z_adapted.device):
        return torch.ops.svd_fast.steering_vector(z_adapted, z_base)
    return reference.steering_vector(z_adapted, z_base)


def steer_logits(z_adapted, z_base, mu, alpha=0.1, fill=float("-inf"), out=None):
    """Steered logits z_hat (SPEC 3): z_a + mu * delta on the confident tokens, `fill` elsewhere.

    mu: a float or a tensor with one value per row. alpha in (0, 1]: keep tokens with
    p_a >= alpha * max p_a. fill: -inf (default), "keep" (masked tokens keep z_a) or a finite
    float lambda (masked tokens get z_a + mu * lambda). out: an optional float32 buffer shaped like
    z_adapted (z_adapted itself when it is float32, for in-place). Returns float32 [..., V]; a row
    with NaN or +inf in either input comes back all NaN.
    """
    _check_logits(z_adapted, z_base)
    _check_alpha(alpha)
    mu_rows, mu_value = _mu_args(mu, z_adapted)
    fill_mode, fill_value = _fill_args(fill)
    if out is not None:
        _check_out(out, z_adapted)
    log_alpha = math.log(alpha)
    if _use_native(z_adapted.device):
        if out is None:
            return torch.ops.svd_fast.steer_logits(z_adapted, z_base, mu_rows, mu_value, log_alpha, fill_mode,
                                                   fill_value)
        torch.ops.svd_fast.steer_logits_out(z_adapted, z_base, mu_rows, mu_value, log_alpha, fill_mode,
                                            fill_value, out)
        return out
    mu_ref = mu_value if mu_rows is None else mu_rows.reshape(z_adapted.shape[:-1])
    result = reference.steer_logits(z_adapted, z_base, mu_ref, alpha, fill)
    return result if out is None else out.copy_(result)


def token_mu(z_adapted, z_base, labels, alpha=0.1, eps=1e-12, ignore_index=-100, return_terms=False):
    """Per-position calibration strength mu* (SPEC 4), fused: no [N, V] temporaries.

    z_adapted, z_base: [..., V] teacher-forced logits; labels: [...] target token ids, ignore_index
    where a position is not a target. Returns (mu_star float32, valid bool), both shaped like labels.
    valid is False for ignored positions and where ||delta_K||^2 < eps (mu_star = 0 there) and for
    rows with NaN (mu_star = NaN). return_terms=True also returns mu*'s numerator
    <onehot(label) - p_a, delta_K> and denominator ||delta_K||^2 (0 on ignored rows), for the
    ratio-of-sums reduction.
    """
    _check_logits(z_adapted, z_base)
    _check_alpha(alpha)
    _check_real("eps", eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    native = _use_native(z_adapted.device)
    _check_labels(labels, z_adapted, ignore_index, check_values=not native or z_adapted.device.type == "cpu")
    labels = labels.reshape(z_adapted.shape[:-1])
    if native:
        result = torch.ops.svd_fast.token_mu(z_adapted, z_base, labels.to(torch.int64), math.log(alpha), float(eps),
                                             int(ignore_index))
    else:
        result = reference.token_mu(z_adapted, z_base, labels, alpha, eps, ignore_index)
    return tuple(result) if return_terms else tuple(result[:2])


def _strengths(mus, z_adapted):
    """mus as a contiguous 1-D float32 tensor on the logits' device."""
    if isinstance(mus, torch.Tensor):
        if not mus.is_floating_point() or mus.dim() > 1:
            raise TypeError(f"mus must be a 1-D floating-point tensor or a list of floats, got a {mus.dtype} tensor "
                            f"of shape {tuple(mus.shape)}")
        if mus.device != z_adapted.device:
            raise ValueError(f"mus is on {mus.device} but the logits are on {z_adapted.device}")
        strengths = mus.reshape(-1).to(torch.float32).contiguous()
    elif isinstance(mus, (str, bytes)) or not hasattr(mus, "__iter__"):
        raise TypeError(f"mus must be a 1-D tensor or a list of floats, got {type(mus).__name__}")
    else:
        strengths = torch.tensor([_check_mu_value(mu) for mu in mus], dtype=torch.float32)
    # checked as float32 (1e39 is finite as a float64 only); not on a GPU, where it would need a host sync
    if strengths.device.type == "cpu" and _checking_values() and not bool(torch.isfinite(strengths).all()):
        raise ValueError("mus must be finite float32 values: NaN, inf or beyond +-3.4e38 found")
    return strengths.to(z_adapted.device)


def steered_nll(z_adapted, z_base, labels, mus, alpha=0.1, fill="keep", ignore_index=-100):
    """NLL of each label under the steered logits z_hat(mu), and its first two derivatives in mu, for K
    strengths at once; fused: no [N, V] temporaries (the strength's objective, svd_fast.adaptation.calibration).

    z_hat(mu) = z_a + mu * delta on the keep set, fill elsewhere (SPEC 3), is affine in mu at every token
    (slope delta on the keep set, 0 for fill="keep", lambda for a finite fill), so per row
        loss(mu)  = logsumexp z_hat(mu) - z_hat(mu)[label]       (convex in mu)
        d_loss    = E_{softmax z_hat}[slope] - slope[label]
        d2_loss   = Var_{softmax z_hat}[slope] >= 0

    z_adapted, z_base: [..., V] logits (float32, bfloat16 or float16); labels: [...] token ids, ignore_index
    where a position is not a target; mus: 1-D tensor or list of K finite strengths. alpha in (0, 1];
    fill: "keep" (default), -inf or a finite float. Returns (loss, d_loss, d2_loss), each float32
    [..., K] (nats). Ignored positions give 0; a label the steered distribution rules out (masked under
    fill=-inf, or z_adapted = -inf there) gives loss = +inf and derivatives 0; a row with NaN gives NaN.
    Raises TypeError / ValueError naming a bad argument.
    """
    _check_logits(z_adapted, z_base)
    _check_alpha(alpha)
    fill_mode, fill_value = _fill_args(fill)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    native = _use_native(z_adapted.device)
    _check_labels(labels, z_adapted, ignore_index, check_values=not native or z_adapted.device.type == "cpu")
    labels = labels.reshape(z_adapted.shape[:-1])
    mus = _strengths(mus, z_adapted)
    if native:
        return tuple(torch.ops.svd_fast.steered_nll(z_adapted, z_base, labels.to(torch.int64), mus, math.log(alpha),
                                                    fill_mode, fill_value, int(ignore_index)))
    shape = (*z_adapted.shape[:-1], mus.numel())
    result = reference.steered_nll(z_adapted, z_base, labels, mus, alpha, fill, ignore_index)
    return tuple(t.reshape(shape) for t in result)


def _check_linear_args(x, weight, bias):
    named = (("weight", weight), ("x", x)) if bias is None else (("weight", weight), ("x", x), ("bias", bias))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    dtype, device = weight.dtype, weight.device
    for name, t in named[1:]:
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but weight is {dtype} on {device}: "
                            "x, weight and bias must share dtype and device (as in F.linear)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., in] with in = weight.shape[1] = {weight.shape[1]}, got shape "
                         f"{tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [out] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")


def small_batch_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) for decode steps: a CPU kernel for x with at most 16 rows (x.numel() /
    in) that reads each weight once for all rows instead of once per row or two.

    x [..., in], weight [out, in], bias [out] or None, all the same dtype and device, as F.linear
    requires; returns [..., out] in that dtype. The kernel covers float32 and bfloat16 (accumulating
    in float32, rounding once) on CPUs with AVX2 and FMA; other cases, and calls that need a gradient
    (the op has no backward), run F.linear.
    """
    _check_linear_args(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                              (bias is not None and bias.requires_grad))
    if _backend == "torch" or not _NATIVE or needs_grad or not weight.is_cpu:
        return F.linear(x, weight, bias)
    return torch.ops.svd_fast.small_batch_linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------------
# Shapes for torch.compile / meta tensors.

if _NATIVE:

    @torch.library.register_fake("svd_fast::steering_vector")
    def _steering_vector_fake(z_adapted, z_base):
        return z_adapted.new_empty(z_adapted.shape, dtype=torch.float32)

    @torch.library.register_fake("svd_fast::steer_logits")
    def _steer_logits_fake(z_adapted, z_base, mu_rows, mu, log_alpha, fill_mode, fill_value):
        return z_adapted.new_empty(z_adapted.shape, dtype=torch.float32)

    @torch.library.register_fake("svd_fast::steer_logits_out")
    def _steer_logits_out_fake(z_adapted, z_base, mu_rows, mu, log_alpha, fill_mode, fill_value, out):
        return None

    @torch.library.register_fake("svd_fast::small_batch_linear")
    def _small_batch_linear_fake(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype)

    @torch.library.register_fake("svd_fast::steered_nll")
    def _steered_nll_fake(z_adapted, z_base, labels, mus, log_alpha, fill_mode, fill_value, ignore_index):
        shape = (*z_adapted.shape[:-1], mus.shape[0])
        return tuple(z_adapted.new_empty(shape, dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake("svd_fast::token_mu")
    def _token_mu_fake(z_adapted, z_base, labels, log_alpha, eps, ignore_index):
        rows_shape = z_adapted.shape[:-1]
        f32 = dict(dtype=torch.float32)
        return (z_adapted.new_empty(rows_shape, **f32), z_adapted.new_empty(rows_shape, dtype=torch.bool),
                z_adapted.new_empty(rows_shape, **f32), z_adapted.new_empty(rows_shape, **f32))
