#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace svd_fast {
namespace {

CpuIsa detect_best() {
#ifdef SVD_X86_TARGETS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return avx512 ? CpuIsa::kAvx512 : (avx2 ? CpuIsa::kAvx2 : CpuIsa::kBaseline);
#else
  return CpuIsa::kBaseline;
#endif
}

std::string supported_list() {
  std::string names;
  for (const auto& name : supported_cpu_isas()) names += (names.empty() ? "" : ", ") + name;
  return names;
}

// The ISA a name asks for; "auto" is the widest supported. Errors name what this CPU supports.
CpuIsa parse(const std::string& name, const char* source) {
  if (name == "auto") return best_cpu_isa();
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2, CpuIsa::kBaseline}) {
    if (name != cpu_isa_name(isa)) continue;
    TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(best_cpu_isa()), "svd_fast: ", source, " asks for ", name,
                " but this CPU supports only ", supported_list());
    return isa;
  }
  TORCH_CHECK(false, "svd_fast: ", source, " must be auto, avx512, avx2 or baseline, got '", name, "'");
}

struct IsaState {
  std::atomic<int> isa;
  std::atomic<bool> forced;
};

IsaState& state() {
  static IsaState s = [] {
    const char* env = std::getenv("SVD_FAST_CPU_ISA");
    const std::string name = env == nullptr || *env == '\0' ? "auto" : env;
    return IsaState{static_cast<int>(parse(name, "SVD_FAST_CPU_ISA")), name != "auto"};
  }();
  return s;
}

}  // namespace

CpuIsa best_cpu_isa() {
  static const CpuIsa best = detect_best();
  return best;
}

CpuIsa cpu_isa() { return static_cast<CpuIsa>(state().isa.load(std::memory_order_relaxed)); }

bool cpu_isa_forced() { return state().forced.load(std::memory_order_relaxed); }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

std::string current_cpu_isa() { return cpu_isa_name(cpu_isa()); }

std::string set_cpu_isa(const std::string& name) {
  const CpuIsa isa = parse(name, "set_cpu_isa");
  const std::string previous = cpu_isa_forced() ? current_cpu_isa() : "auto";
  state().isa.store(static_cast<int>(isa));
  state().forced.store(name != "auto");
  return previous;
}

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> names;
  for (int isa = static_cast<int>(best_cpu_isa()); isa >= 0; --isa) names.push_back(cpu_isa_name(static_cast<CpuIsa>(isa)));
  return names;
}

}  // namespace svd_fast
