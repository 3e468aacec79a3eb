"""svd_fast: Steering Vector Decoding (arXiv 2509.15888) with fused CUDA and CPU kernels.

    import svd_fast
    delta = svd_fast.steering_vector(z_adapted, z_base)
    z_hat = svd_fast.steer_logits(z_adapted, z_base, mu=0.5, alpha=0.1)
    mu_star, valid = svd_fast.token_mu(z_adapted, z_base, labels)
    loss, d_loss, d2_loss = svd_fast.steered_nll(z_adapted, z_base, labels, mus=[-1.0, 0.0, 1.0])

    peft_model = svd_fast.warm_start(model, tokenizer, train_examples, method="lora")
    cal = svd_fast.calibrate(peft_model, tokenizer, calib_examples, alpha=0.1)
    steered = svd_fast.SteeredModel(peft_model, mu=cal.mu_bar, alpha=0.1)
    out = steered.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=32)

Four parts: `ops` (the kernels' Python face and the reference), `decoding` (SteeredModel and its routes,
the logits processor, the CPU decode linears), `adaptation` (warm start, calibration), `evaluation` (the
default model, the benchmarks, the harness). The HuggingFace/PEFT names load on first use, so the ops alone
need only torch.
"""
from . import ops  # noqa: F401  (svd_fast.ops, the first of the four parts)
from ._version import __version__
from .ops import (
    cpu_isa,
    forced_cpu_isa,
    get_backend,
    has_cuda_kernels,
    native_available,
    reference,
    set_backend,
    set_cpu_isa,
    small_batch_linear,
    steer_logits,
    steered_nll,
    steering_vector,
    supported_cpu_isas,
    token_mu,
)

# name -> (module, attribute or None for the module itself), imported on first access
_LAZY = {
    "SteeredModel": ("decoding", "SteeredModel"),
    "SteeringLogitsProcessor": ("decoding", "SteeringLogitsProcessor"),
    "calibrate": ("adaptation.calibration", "calibrate"),
    "calibrate_sweep": ("adaptation.calibration", "calibrate_sweep"),
    "CalibrationResult": ("adaptation.calibration", "CalibrationResult"),
    "warm_start": ("adaptation.training", "warm_start"),
    "decoding": ("decoding", None),
    "adaptation": ("adaptation", None),
    "evaluation": ("evaluation", None),
    # where these lived before the four parts, as the README documents them
    "cpu_decode": ("decoding.cpu_linear", None),
    "models": ("evaluation.models", None),
    "data": ("evaluation.data", None),
}

__all__ = ["reference", "cpu_isa", "forced_cpu_isa", "get_backend", "has_cuda_kernels", "native_available",
           "set_backend", "set_cpu_isa", "small_batch_linear", "steer_logits", "steered_nll", "steering_vector", "supported_cpu_isas",
           "token_mu", "__version__"]
__all__ += list(_LAZY)

# `import svd_fast.reference`, `from svd_fast.models import load`, ...: the dotted paths of before the four parts
# (cheap modules only; `svd_fast.cpu_decode` stays an attribute, since its package pulls in transformers).
import sys as _sys  # noqa: E402

_sys.modules.setdefault(f"{__name__}.reference", reference)


def _alias_light_modules():
    import importlib

    for alias in ("models", "data"):
        _sys.modules.setdefault(f"{__name__}.{alias}", importlib.import_module(f".{_LAZY[alias][0]}", __name__))


_alias_light_modules()


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        loaded = importlib.import_module(f".{module}", __name__)
        return loaded if attribute is None else getattr(loaded, attribute)
    raise AttributeError(f"module 'svd_fast' has no attribute {name!r}")
