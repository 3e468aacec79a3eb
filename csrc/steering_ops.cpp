// Operator schemas of the svd_fast library. The CPU and CUDA implementations register themselves in
// steering_cpu.cpp and steering_cuda.cu; the fake (shape) implementations live in svd_fast/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(svd_fast, m) {
  m.def("steering_vector(Tensor z_adapted, Tensor z_base) -> Tensor");
  m.def(
      "steer_logits(Tensor z_adapted, Tensor z_base, Tensor? mu_rows, float mu, float log_alpha, "
      "int fill_mode, float fill_value) -> Tensor");
  m.def(
      "steer_logits_out(Tensor z_adapted, Tensor z_base, Tensor? mu_rows, float mu, float log_alpha, "
      "int fill_mode, float fill_value, Tensor(a!) out) -> ()");
  m.def(
      "token_mu(Tensor z_adapted, Tensor z_base, Tensor labels, float log_alpha, float eps, "
      "int ignore_index) -> (Tensor, Tensor)");
  m.def("has_cuda_kernels() -> bool", [] {
#ifdef SVD_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
