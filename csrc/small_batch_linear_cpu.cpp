// y = x @ W^T + b on CPU for the few rows of a decode step (M <= 16: base and adapted rows of a small
// batch). A GEMM library runs such an x as one matrix-vector product per row or two, streaming the
// weights (the whole cost at this size) each time; here every tile of kTileRows weight rows is read
// once and multiplied into all M rows of x while it sits in L1, the dot products living in vector
// registers. fp32 or bf16 weights, x and y in the weight's dtype (as F.linear), fp32 accumulation.
// The vector code is compiled for AVX2+FMA and for AVX-512 through target attributes and runs the one
// cpu_isa() names (cpu_isa.h); anything else (more rows, bf16 with more than 4 rows on AMX CPUs, other
// dtypes or devices, strided weights, the baseline ISA) runs at::linear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_isa.h"

namespace svd_fast {
namespace {

constexpr int64_t kMaxRows = 16;
constexpr int kTileRows = 4;                  // weight rows per tile, shared by every group of x rows
constexpr int64_t kBlockK = 1024;             // inputs per pass, so a tile's block stays in L1 across groups
constexpr int64_t kMinTaskWeights = 1 << 15;  // weight elements worth a parallel task of their own
// Software prefetch distance in each weight row. Rows of a few KiB are too short for the hardware
// prefetcher to ramp up before the next tile starts; 8 KiB ahead reaches into it (measured best of
// 0-16 KiB for 576 inputs, neutral for 1536).
constexpr int64_t kPrefetchBytes = 8192;

struct Problem {
  const float* x;      // [rows, in], contiguous
  const void* weight;  // [out, in], contiguous, float or BFloat16
  const float* bias;   // [out] or nullptr
  void* y;             // [rows, out], the weight's dtype
  int64_t rows, in, out;
  bool bf16;
};

#ifdef SVD_X86_TARGETS
#define SVD_INLINE inline __attribute__((always_inline))
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors passed by value: always inlined, so no ABI to change
#endif

// GCC/Clang vector types. Every helper below is always inlined into the target("...") entry points,
// where the compiler lowers the same source to AVX2 (8 lanes) or AVX-512 (16 lanes) instructions.
template <int kLanes>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * kLanes)));
  typedef uint32_t U32 __attribute__((vector_size(4 * kLanes)));
};

template <int kLanes>
SVD_INLINE typename Lanes<kLanes>::F load(const float* p) {
  typename Lanes<kLanes>::F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// A step of the input dimension as kParts float vectors: kLanes fp32 weights, or 2 * kLanes bf16
// weights split into the even and the odd elements. A bf16 is the top half of a float32, so that split
// is a shift and a mask of 32-bit words (widening in order would take cross-lane shuffles); the
// kernel lays out x to match (interleave_x).
template <int kLanes, typename W>
struct WeightStep;

template <int kLanes>
struct WeightStep<kLanes, float> {
  static constexpr int kParts = 1;
  static SVD_INLINE void load_parts(const float* p, typename Lanes<kLanes>::F (&parts)[1]) {
    parts[0] = load<kLanes>(p);
  }
};

template <int kLanes>
struct WeightStep<kLanes, c10::BFloat16> {
  static constexpr int kParts = 2;
  static SVD_INLINE void load_parts(const c10::BFloat16* p, typename Lanes<kLanes>::F (&parts)[2]) {
    using F = typename Lanes<kLanes>::F;
    typename Lanes<kLanes>::U32 words;
    std::memcpy(&words, p, sizeof words);
    parts[0] = (F)(words << 16);
    parts[1] = (F)(words & 0xFFFF0000u);
  }
};

template <int kLanes>
SVD_INLINE float sum_lanes(typename Lanes<kLanes>::F v) {
  if constexpr (kLanes == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    typename Lanes<kLanes / 2>::F lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return sum_lanes<kLanes / 2>(lo + hi);
  }
}

// acc[m][t] += x[m, k_begin:k_end] . row_t[k_begin:k_end] for kGroup rows of x (row stride ldx) and
// the tile's rows; k_end - k_begin is a multiple of the step.
template <int kLanes, int kGroup, typename W>
SVD_INLINE void accumulate(const float* x, int64_t ldx, const W* const* tile, int64_t k_begin, int64_t k_end,
                           typename Lanes<kLanes>::F (*acc)[kTileRows]) {
  using F = typename Lanes<kLanes>::F;
  using Step = WeightStep<kLanes, W>;
  constexpr int kParts = Step::kParts;
  F sum[kGroup][kTileRows];
  for (int m = 0; m < kGroup; ++m)
    for (int t = 0; t < kTileRows; ++t) sum[m][t] = acc[m][t];
  for (int64_t k = k_begin; k < k_end; k += kParts * kLanes) {
    F xv[kGroup][kParts];
    for (int m = 0; m < kGroup; ++m)
      for (int part = 0; part < kParts; ++part) xv[m][part] = load<kLanes>(x + m * ldx + k + part * kLanes);
    for (int t = 0; t < kTileRows; ++t) {
      F wv[kParts];
      // Integer arithmetic: the address may lie past the weights (a prefetch never faults).
      __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(tile[t] + k) + kPrefetchBytes));
      Step::load_parts(tile[t] + k, wv);
      if constexpr (kGroup > 1) {
        // Pins the weights in registers: GCC would fold the load into each of the kGroup FMAs,
        // multiplying the L1 loads of a loop that is bound by them.
        for (int part = 0; part < kParts; ++part) asm("" : "+v"(wv[part]));
      }
      for (int m = 0; m < kGroup; ++m)
        for (int part = 0; part < kParts; ++part) sum[m][t] += xv[m][part] * wv[part];
    }
  }
  for (int m = 0; m < kGroup; ++m)
    for (int t = 0; t < kTileRows; ++t) acc[m][t] = sum[m][t];
}

template <int kLanes, typename W>
constexpr int64_t step_elements() {
  return WeightStep<kLanes, W>::kParts * kLanes;
}

template <int kLanes, typename W>
SVD_INLINE void linear_tiles(const Problem& p, int64_t tile_begin, int64_t tile_end) {
  using F = typename Lanes<kLanes>::F;
  // Rows of x per pass over a tile: kMaxGroup * kTileRows accumulators plus the loads fit in the
  // 32 (AVX-512) or 16 (AVX2) vector registers.
  constexpr int kMaxGroup = kLanes == 16 ? 4 : 2;
  const W* weight = static_cast<const W*>(p.weight);
  W* y = static_cast<W*>(p.y);
  const int64_t in_steps = p.in - p.in % step_elements<kLanes, W>();
  F acc[kMaxRows][kTileRows];
  for (int64_t tile_index = tile_begin; tile_index < tile_end; ++tile_index) {
    const int64_t n0 = tile_index * kTileRows;
    const int64_t tile_rows = std::min<int64_t>(kTileRows, p.out - n0);
    const W* tile[kTileRows];
    for (int t = 0; t < kTileRows; ++t) {
      tile[t] = weight + std::min(n0 + t, p.out - 1) * p.in;  // a short last tile repeats its last row
    }
    for (int64_t m = 0; m < p.rows; ++m)
      for (int t = 0; t < kTileRows; ++t) acc[m][t] = F{};
    for (int64_t k0 = 0; k0 < in_steps; k0 += kBlockK) {
      const int64_t k1 = std::min(in_steps, k0 + kBlockK);
      for (int64_t m = 0; m < p.rows;) {
        const float* xm = p.x + m * p.in;
        if (p.rows - m >= kMaxGroup) {
          accumulate<kLanes, kMaxGroup>(xm, p.in, tile, k0, k1, acc + m);
          m += kMaxGroup;
        } else if (kMaxGroup > 2 && p.rows - m >= 2) {
          accumulate<kLanes, 2>(xm, p.in, tile, k0, k1, acc + m);
          m += 2;
        } else {
          accumulate<kLanes, 1>(xm, p.in, tile, k0, k1, acc + m);
          m += 1;
        }
      }
    }
    for (int64_t m = 0; m < p.rows; ++m) {
      const float* xm = p.x + m * p.in;
      for (int64_t t = 0; t < tile_rows; ++t) {
        float dot = sum_lanes<kLanes>(acc[m][t]);
        for (int64_t k = in_steps; k < p.in; ++k) dot += xm[k] * static_cast<float>(tile[t][k]);
        if (p.bias) dot += p.bias[n0 + t];
        y[m * p.out + n0 + t] = static_cast<W>(dot);
      }
    }
  }
}

SVD_TARGET_AVX2 void linear_tiles_avx2(const Problem& p, int64_t begin, int64_t end) {
  if (p.bf16) {
    linear_tiles<8, c10::BFloat16>(p, begin, end);
  } else {
    linear_tiles<8, float>(p, begin, end);
  }
}

SVD_TARGET_AVX512 void linear_tiles_avx512(const Problem& p, int64_t begin,
                                                                      int64_t end) {
  if (p.bf16) {
    linear_tiles<16, c10::BFloat16>(p, begin, end);
  } else {
    linear_tiles<16, float>(p, begin, end);
  }
}
#endif

// bf16 with more rows than this runs at::linear: on CPUs with AMX, oneDNN's AMX GEMM beats the FMA
// kernel from 5-6 rows on (measured on Sapphire/Emerald Rapids). A forced ISA runs the kernel for every
// row count it takes, so that tests reach it on any CPU.
int64_t max_bf16_rows() {
  static const bool amx_bf16 = [] {
#if defined(SVD_X86_TARGETS) && !defined(__clang__)  // not a name every clang knows
    __builtin_cpu_init();
    return static_cast<bool>(__builtin_cpu_supports("amx-bf16"));
#else
    return false;
#endif
  }();
  return amx_bf16 && !cpu_isa_forced() ? 4 : kMaxRows;
}

// Matches WeightStep<lanes, BFloat16>: in every full step of 2 * lanes inputs of each row, the even
// elements first, then the odd ones.
void split_even_odd(float* x, int64_t rows, int64_t in, int lanes) {
  const int64_t step = 2 * lanes;
  float buf[32];
  for (int64_t m = 0; m < rows; ++m) {
    for (float* block = x + m * in; block + step <= x + (m + 1) * in; block += step) {
      std::memcpy(buf, block, step * sizeof(float));
      for (int j = 0; j < lanes; ++j) {
        block[j] = buf[2 * j];
        block[lanes + j] = buf[2 * j + 1];
      }
    }
  }
}

at::Tensor small_batch_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias) {
  const auto dtype = weight.scalar_type();
  const CpuIsa isa = cpu_isa();
  const bool kernel_fits =
      isa != CpuIsa::kBaseline && (dtype == at::kFloat || dtype == at::kBFloat16) && weight.dim() == 2 &&
      weight.is_contiguous() && weight.is_cpu() && x.is_cpu() && x.scalar_type() == dtype && x.dim() >= 1 &&
      x.size(-1) == weight.size(1) &&
      (!bias.has_value() || (bias->is_cpu() && bias->scalar_type() == dtype && bias->dim() == 1 &&
                             bias->size(0) == weight.size(0)));
  if (!kernel_fits) return at::linear(x, weight, bias);
  const auto leading = x.sizes().slice(0, x.dim() - 1);
  const int64_t rows = c10::multiply_integers(leading);
  const int64_t max_rows = dtype == at::kBFloat16 ? max_bf16_rows() : kMaxRows;
  if (rows < 1 || rows > max_rows) return at::linear(x, weight, bias);

  const int64_t in = weight.size(1), out = weight.size(0);
  at::Tensor x_f = x.reshape({rows, in}).to(at::kFloat).contiguous();
  const int lanes = isa == CpuIsa::kAvx512 ? 16 : 8;
  if (dtype == at::kBFloat16) split_even_odd(x_f.data_ptr<float>(), rows, in, lanes);  // x_f is a fresh copy
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  std::vector<int64_t> y_shape(leading.begin(), leading.end());
  y_shape.push_back(out);
  at::Tensor y = at::empty(y_shape, weight.options());
#ifdef SVD_X86_TARGETS
  const Problem p{x_f.const_data_ptr<float>(), weight.const_data_ptr(),
                  bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr, y.data_ptr(), rows, in, out,
                  dtype == at::kBFloat16};
  const auto run_tiles = isa == CpuIsa::kAvx512 ? &linear_tiles_avx512 : &linear_tiles_avx2;
  const int64_t tiles = (out + kTileRows - 1) / kTileRows;
  const int64_t grain = std::max<int64_t>(1, kMinTaskWeights / (kTileRows * std::max<int64_t>(in, 1)));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) { run_tiles(p, begin, end); });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(svd_fast, CPU, m) { m.impl("small_batch_linear", &small_batch_linear_cpu); }

}  // namespace svd_fast
