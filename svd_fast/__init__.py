"""svd_fast: Steering Vector Decoding (arXiv 2509.15888) with fused CUDA and CPU kernels.

    import svd_fast
    delta = svd_fast.steering_vector(z_adapted, z_base)
    z_hat = svd_fast.steer_logits(z_adapted, z_base, mu=0.5, alpha=0.1)
    mu_star, valid = svd_fast.token_mu(z_adapted, z_base, labels)
"""
from . import ops, reference
from .ops import (
    get_backend,
    has_cuda_kernels,
    native_available,
    set_backend,
    steer_logits,
    steering_vector,
    token_mu,
)

__version__ = "0.1.0"

__all__ = ["reference", *ops.__all__, "__version__"]
