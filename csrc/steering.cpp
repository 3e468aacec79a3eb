// Operator schemas of the svd_fast library and the Python extension module. The CPU and CUDA
// implementations register themselves in steering_cpu.cpp and steering_cuda.cu.
#include <torch/library.h>

#include <Python.h>

// Importing svd_fast._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

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
