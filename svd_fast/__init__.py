"""svd_fast: Steering Vector Decoding (arXiv 2509.15888) with fused CUDA and CPU kernels.

    import svd_fast
    delta = svd_fast.steering_vector(z_adapted, z_base)
    z_hat = svd_fast.steer_logits(z_adapted, z_base, mu=0.5, alpha=0.1)
    mu_star, valid = svd_fast.token_mu(z_adapted, z_base, labels)

    peft_model = svd_fast.warm_start(model, tokenizer, train_examples, method="lora")
    cal = svd_fast.calibrate(peft_model, tokenizer, calib_examples, alpha=0.1)
    steered = svd_fast.SteeredModel(peft_model, mu=cal.mu_bar, alpha=0.1)
    out = steered.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=32)

The HuggingFace/PEFT names load on first use, so the ops alone need only torch.
"""
from . import ops, reference
from .ops import (
    cpu_isa,
    forced_cpu_isa,
    get_backend,
    has_cuda_kernels,
    native_available,
    set_backend,
    set_cpu_isa,
    small_batch_linear,
    steer_logits,
    steering_vector,
    supported_cpu_isas,
    token_mu,
)

from ._version import __version__

# name -> module, imported on first access (they pull in transformers and peft)
_HF_NAMES = {
    "SteeredModel": "steering",
    "SteeringLogitsProcessor": "steering",
    "calibrate": "calibration",
    "calibrate_sweep": "calibration",
    "CalibrationResult": "calibration",
    "warm_start": "training",
}

__all__ = ["reference", *ops.__all__, *_HF_NAMES, "__version__"]


def __getattr__(name):
    if name in _HF_NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_HF_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'svd_fast' has no attribute {name!r}")
