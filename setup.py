"""Builds svd_fast._C: the CPU kernels always, the CUDA kernels whenever a CUDA toolkit is found.

Environment:
  SVD_FAST_CUDA=0         skip the CUDA kernels even when nvcc is present
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default "8.0;9.0")
  CUDA_HOME               the CUDA toolkit (default /usr/local/cuda when it exists)
  MAX_JOBS                parallel compile jobs (ninja)
"""
import os
import shutil

from setuptools import find_packages, setup

if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script elsewhere.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

want_cuda = os.environ.get("SVD_FAST_CUDA", "1") != "0"
nvcc = CUDA_HOME and (shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")))
with_cuda = bool(want_cuda and nvcc)

sources = ["csrc/python_module.cpp", "csrc/steering_ops.cpp", "csrc/cpu_isa.cpp", "csrc/steering_cpu.cpp",
           "csrc/small_batch_linear_cpu.cpp"]
# -fopenmp: at::parallel_for is header code that needs it, and the `omp simd` loops;
# -fno-trapping-math lets GCC turn the selects in steering_math.h into blends; fp-contract: FMAs.
cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=fast", "-fvisibility=hidden"]
extension = CppExtension
define_macros = []
extra = {"cxx": cxx_flags}
if with_cuda:
    sources.append("csrc/steering_cuda.cu")
    extension = CUDAExtension
    define_macros.append(("SVD_FAST_WITH_CUDA", None))
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]

print(f"svd_fast: building CPU kernels{' and CUDA kernels' if with_cuda else ''} "
      f"(CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")

setup(
    packages=find_packages(include=["svd_fast", "svd_fast.*"]),
    ext_modules=[
        extension(
            "svd_fast._C",
            sources,
            include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
