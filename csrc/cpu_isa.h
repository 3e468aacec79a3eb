// Which x86 vector ISA the CPU kernels run. Picked at first use as the widest the CPU supports, or
// forced (SVD_FAST_CPU_ISA, or the op svd_fast::set_cpu_isa) so that every path can be run and tested
// on any CPU that supports it. Every CPU kernel compiles its vector code once per ISA through the
// target attributes below and looks up cpu_isa() on each call.
#pragma once

#include <string>
#include <vector>

namespace svd_fast {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa best_cpu_isa();   // the widest ISA this CPU supports
CpuIsa cpu_isa();        // the ISA the kernels use now
bool cpu_isa_forced();   // true when forced rather than picked automatically
const char* cpu_isa_name(CpuIsa isa);  // "avx512", "avx2", "baseline"

// Registered as ops in steering_ops.cpp.
std::string current_cpu_isa();
// "auto" or a name this CPU supports; returns the previous setting ("auto" or the forced name).
std::string set_cpu_isa(const std::string& name);
std::vector<std::string> supported_cpu_isas();  // widest first

}  // namespace svd_fast

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SVD_X86_TARGETS 1
// AVX-512 (x86-64-v4 without the rarely useful CD), and AVX2 + FMA (x86-64-v3); baseline is what the
// whole library is compiled for (x86-64: SSE2).
#define SVD_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2")))
#define SVD_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2")))
#endif
