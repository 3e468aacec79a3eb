// Operator schemas of the svd_fast library. The CPU and CUDA implementations register themselves in
// steering_cpu.cpp, steering_cuda.cu and small_batch_linear_cpu.cpp; the fake (shape) implementations
// live in svd_fast/ops/__init__.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cpu_isa.h"

namespace {

// The functional op, for every backend: a fresh float32 output filled by steer_logits_out.
at::Tensor steer_logits(const at::Tensor& z_adapted, const at::Tensor& z_base,
                        const c10::optional<at::Tensor>& mu_rows, double mu, double log_alpha, int64_t fill_mode,
                        double fill_value) {
  static const auto out_op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("svd_fast::steer_logits_out", "")
                                 .typed<void(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                             double, double, int64_t, double, at::Tensor&)>();
  at::Tensor out = at::empty(z_adapted.sizes(), z_adapted.options().dtype(at::kFloat));
  out_op.call(z_adapted, z_base, mu_rows, mu, log_alpha, fill_mode, fill_value, out);
  return out;
}

}  // namespace

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
      "int ignore_index) -> (Tensor mu_star, Tensor valid, Tensor numerator, Tensor norm_sq)");
  m.def(
      "steered_nll(Tensor z_adapted, Tensor z_base, Tensor labels, Tensor mus, float log_alpha, int fill_mode, "
      "float fill_value, int ignore_index) -> (Tensor loss, Tensor d_loss, Tensor d2_loss)");
  m.impl("steer_logits", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(steer_logits));
  // x [..., in] @ weight[out, in]^T + bias: a CPU kernel for <= 16 rows, at::linear everywhere else.
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("small_batch_linear", c10::DispatchKey::CompositeExplicitAutograd,
         TORCH_FN(static_cast<at::Tensor (*)(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&)>(
             at::linear)));
  // The CPU kernels' vector ISA (cpu_isa.h): which one runs, force one ("auto" to undo), which exist here.
  m.def("cpu_isa() -> str", &svd_fast::current_cpu_isa);
  m.def("set_cpu_isa(str isa) -> str", &svd_fast::set_cpu_isa);
  m.def("supported_cpu_isas() -> str[]", &svd_fast::supported_cpu_isas);
  // Benchmark yardstick, CPU only: pass 1's two exps per element alone; per-row sums [rows] float32.
  m.def("exp_throughput_bound(Tensor z_adapted, Tensor z_base) -> Tensor");
  m.def("has_cuda_kernels() -> bool", [] {
#ifdef SVD_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
