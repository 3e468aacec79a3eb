// CPU kernels: rows (and, when rows are few, vocabulary chunks) run in parallel with at::parallel_for;
// the inner loops work on float blocks that fit in L1 and are `omp simd` loops (vectorized reductions).
// Each block loop is compiled for AVX-512, AVX2/FMA and baseline x86-64 (cpu_isa.h); every call runs
// the set of the ISA that cpu_isa() names, so a forced ISA can be tested on any CPU that has it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "steering_host.h"
#include "steering_math.h"

namespace svd_fast {
namespace {

constexpr int64_t kBlock = 1024;      // elements handled at a time, as float32 (8 KiB for two rows)
constexpr int64_t kMinChunk = 16384;  // smallest vocabulary chunk worth a task of its own
constexpr int64_t kAlign = 16;        // chunk boundaries, in elements (one AVX-512 vector)

SVD_HD
float block_max(const float* __restrict a, int64_t n) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = max_ignoring_nan(m, a[i]);
  return m;
}

SVD_HD
RowStats block_stats(const float* __restrict a, const float* __restrict b, int64_t n) {
  float max_a = -kInf, max_b = -kInf;
  uint32_t flags = 0;
#pragma omp simd reduction(max : max_a, max_b) reduction(| : flags)
  for (int64_t i = 0; i < n; ++i) {
    max_a = max_ignoring_nan(max_a, a[i]);
    max_b = max_ignoring_nan(max_b, b[i]);
    flags |= element_flags(a[i], b[i]);
  }
  float sum_a = 0.0f, sum_b = 0.0f, cross = 0.0f;
#pragma omp simd reduction(+ : sum_a, sum_b, cross)
  for (int64_t i = 0; i < n; ++i) {
    const ElementTerms t = element_terms(a[i], b[i], max_a, max_b);
    sum_a += t.exp_a;
    sum_b += t.exp_b;
    cross += t.cross;
  }
  return RowStats{max_a, sum_a, max_b, sum_b, cross, flags};
}

SVD_HD
void block_delta(const float* __restrict a, const float* __restrict b, int64_t n, RowSummary r,
                 float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float p_a;
    out[i] = steering_delta(a[i], b[i], r, p_a);
  }
}

// Kept tokens are few (alpha = 0.1 keeps those within log(10) of the top logit), so a block whose
// largest logit is below the keep threshold skips the exp and is written as fill directly.
SVD_HD
void block_steer(const float* __restrict a, const float* __restrict b, int64_t n, RowSummary r, float mu,
                 FillRule fill, float* __restrict out) {
  if (!is_kept(block_max(a, n), r)) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = steered_logit(a[i], 0.0f, false, mu, fill);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float p_a;
    const float d = steering_delta(a[i], b[i], r, p_a);
    out[i] = steered_logit(a[i], d, is_kept(a[i], r), mu, fill);
  }
}

struct KeptSums {
  float pa_dot_delta, delta_sq;  // sums over the keep set K of p_a * delta and delta^2
};

SVD_HD
KeptSums block_kept_sums(const float* __restrict a, const float* __restrict b, int64_t n, RowSummary r) {
  float pa_dot_delta = 0.0f, delta_sq = 0.0f;
  if (!is_kept(block_max(a, n), r)) return KeptSums{0.0f, 0.0f};
#pragma omp simd reduction(+ : pa_dot_delta, delta_sq)
  for (int64_t i = 0; i < n; ++i) {
    float p_a;
    const float d = steering_delta(a[i], b[i], r, p_a);
    const bool kept = is_kept(a[i], r);
    pa_dot_delta += kept ? p_a * d : 0.0f;
    delta_sq += kept ? d * d : 0.0f;
  }
  return KeptSums{pa_dot_delta, delta_sq};
}

SVD_HD
void widen(const c10::BFloat16* __restrict in, int64_t n, float* __restrict out) {
  const auto* bits = reinterpret_cast<const uint16_t*>(in);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;  // bf16 is the top half of a float32
    std::memcpy(&out[i], &word, sizeof(float));
  }
}

SVD_HD
void widen(const c10::Half* __restrict in, int64_t n, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

// The benchmarks' compute yardstick: the two exps per element of pass 1 (one per distribution) and
// nothing else, on the same blocks, vectorized as the kernels are.
SVD_HD
float block_exp_sum(const float* __restrict a, const float* __restrict b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += exp_nonpositive(-std::fabs(a[i])) + exp_nonpositive(-std::fabs(b[i]));
  return sum;
}

// The block loops of one ISA.
struct BlockKernels {
  RowStats (*stats)(const float*, const float*, int64_t);
  void (*delta)(const float*, const float*, int64_t, RowSummary, float*);
  void (*steer)(const float*, const float*, int64_t, RowSummary, float, FillRule, float*);
  KeptSums (*kept_sums)(const float*, const float*, int64_t, RowSummary);
  void (*widen_bf16)(const c10::BFloat16*, int64_t, float*);
  void (*widen_half)(const c10::Half*, int64_t, float*);
  float (*exp_sum)(const float*, const float*, int64_t);
};

// Entry points that inline the loops above, compiled with the given target attribute.
#define SVD_BLOCK_KERNELS(NAME, TARGET)                                                                          \
  TARGET RowStats NAME##_stats(const float* a, const float* b, int64_t n) { return block_stats(a, b, n); }        \
  TARGET void NAME##_delta(const float* a, const float* b, int64_t n, RowSummary r, float* o) {                  \
    block_delta(a, b, n, r, o);                                                                                   \
  }                                                                                                               \
  TARGET void NAME##_steer(const float* a, const float* b, int64_t n, RowSummary r, float mu, FillRule f,        \
                           float* o) {                                                                            \
    block_steer(a, b, n, r, mu, f, o);                                                                            \
  }                                                                                                               \
  TARGET KeptSums NAME##_kept_sums(const float* a, const float* b, int64_t n, RowSummary r) {                    \
    return block_kept_sums(a, b, n, r);                                                                           \
  }                                                                                                               \
  TARGET void NAME##_widen_bf16(const c10::BFloat16* in, int64_t n, float* o) { widen(in, n, o); }                \
  TARGET void NAME##_widen_half(const c10::Half* in, int64_t n, float* o) { widen(in, n, o); }                    \
  TARGET float NAME##_exp_sum(const float* a, const float* b, int64_t n) { return block_exp_sum(a, b, n); }       \
  const BlockKernels NAME##_kernels{&NAME##_stats,      &NAME##_delta,      &NAME##_steer, &NAME##_kept_sums,     \
                                    &NAME##_widen_bf16, &NAME##_widen_half, &NAME##_exp_sum};

SVD_BLOCK_KERNELS(baseline, )
#ifdef SVD_X86_TARGETS
SVD_BLOCK_KERNELS(avx2, SVD_TARGET_AVX2)
SVD_BLOCK_KERNELS(avx512, SVD_TARGET_AVX512)
#endif
#undef SVD_BLOCK_KERNELS

const BlockKernels& block_kernels() {
#ifdef SVD_X86_TARGETS
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return avx512_kernels;
    case CpuIsa::kAvx2: return avx2_kernels;
    default: break;
  }
#endif
  return baseline_kernels;
}

// A float view of n logits: the input itself for float32, else converted into buf. `copy` forces a
// copy for float32 too (when the output overwrites the input).
template <typename T>
const float* load_block(const BlockKernels& k, const T* p, int64_t n, float* buf, bool copy = false) {
  if constexpr (std::is_same_v<T, float>) {
    if (!copy) return p;
    std::memcpy(buf, p, n * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    k.widen_bf16(p, n, buf);
  } else {
    k.widen_half(p, n, buf);
  }
  return buf;
}

// Runs fn(row, lo, hi) for every chunk of the plan, in parallel.
template <typename Fn>
void for_each_chunk(int64_t rows, int64_t vocab, const SplitPlan& plan, Fn&& fn) {
  at::parallel_for(0, rows * plan.splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / plan.splits;
      const int64_t lo = (task % plan.splits) * plan.chunk;
      fn(task, row, lo, std::min(vocab, lo + plan.chunk));
    }
  });
}

// Pass 1 of every op: one RowStats per (row, chunk), and each row's summary from them.
template <typename T>
std::vector<RowSummary> row_summaries(const BlockKernels& k, const T* za, const T* zb, int64_t rows, int64_t vocab,
                                      const SplitPlan& plan, float log_alpha) {
  std::vector<RowStats> partial(rows * plan.splits);
  for_each_chunk(rows, vocab, plan, [&](int64_t task, int64_t row, int64_t lo, int64_t hi) {
    float buf_a[kBlock], buf_b[kBlock];
    RowStats s = empty_stats();
    for (int64_t off = row * vocab + lo; off < row * vocab + hi; off += kBlock) {
      const int64_t n = std::min(kBlock, row * vocab + hi - off);
      s = merge(s, k.stats(load_block(k, za + off, n, buf_a), load_block(k, zb + off, n, buf_b), n));
    }
    partial[task] = s;
  });
  std::vector<RowSummary> summary(rows);
  for (int64_t row = 0; row < rows; ++row) {
    RowStats s = empty_stats();
    for (int64_t split = 0; split < plan.splits; ++split) s = merge(s, partial[row * plan.splits + split]);
    summary[row] = finalize(s, log_alpha);
  }
  return summary;
}

SplitPlan cpu_plan(int64_t rows, int64_t vocab) {
  return plan_splits(rows, vocab, 2 * at::get_num_threads(), kMinChunk, kAlign);
}

// Pass 2 for the ops with a [rows, V] float output: block_fn(kernels, a, b, n, summary, row, out).
template <typename BlockFn>
void write_rows(const LogitRows& x, float log_alpha, float* out, BlockFn&& block_fn) {
  if (x.rows == 0) return;
  const BlockKernels& k = block_kernels();
  const SplitPlan plan = cpu_plan(x.rows, x.vocab);
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* za = x.z_a.const_data_ptr<T>();
    const T* zb = x.z_b.const_data_ptr<T>();
    const auto summary = row_summaries(k, za, zb, x.rows, x.vocab, plan, log_alpha);
    const bool out_aliases_input = static_cast<const void*>(out) == static_cast<const void*>(za) ||
                                   static_cast<const void*>(out) == static_cast<const void*>(zb);
    for_each_chunk(x.rows, x.vocab, plan, [&](int64_t, int64_t row, int64_t lo, int64_t hi) {
      float buf_a[kBlock], buf_b[kBlock];
      const RowSummary& r = summary[row];
      for (int64_t off = row * x.vocab + lo; off < row * x.vocab + hi; off += kBlock) {
        const int64_t n = std::min(kBlock, row * x.vocab + hi - off);
        if (r.bad) {
          std::fill(out + off, out + off + n, kNaN);
          continue;
        }
        block_fn(k, load_block(k, za + off, n, buf_a, out_aliases_input),
                 load_block(k, zb + off, n, buf_b, out_aliases_input), n, r, row, out + off);
      }
    });
  });
}

at::Tensor steering_vector_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  at::Tensor out = at::empty(z_adapted.sizes(), z_adapted.options().dtype(at::kFloat));
  write_rows(x, 0.0f, out.data_ptr<float>(),
             [](const BlockKernels& k, const float* a, const float* b, int64_t n, const RowSummary& r, int64_t,
                float* o) { k.delta(a, b, n, r, o); });
  return out;
}

void steer_logits_out_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base,
                          const c10::optional<at::Tensor>& mu_rows, double mu, double log_alpha,
                          int64_t fill_mode, double fill_value, at::Tensor& out) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  check_steer_args(x, mu_rows, out);
  const float* mu_of_row = mu_rows.has_value() ? mu_rows->const_data_ptr<float>() : nullptr;
  write_rows(x, static_cast<float>(log_alpha), out.data_ptr<float>(),
             [&](const BlockKernels& k, const float* a, const float* b, int64_t n, const RowSummary& r, int64_t row,
                 float* o) {
               const float row_mu = mu_of_row ? mu_of_row[row] : static_cast<float>(mu);
               k.steer(a, b, n, r, row_mu, fill_rule(fill_mode, row_mu, static_cast<float>(fill_value)), o);
             });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_mu_cpu(const at::Tensor& z_adapted,
                                                                        const at::Tensor& z_base,
                                                                        const at::Tensor& labels, double log_alpha,
                                                                        double eps, int64_t ignore_index) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  check_labels(x, labels);
  TokenMuTensors result(z_adapted);
  if (x.rows == 0) return result.tuple();
  const at::Tensor labels_c = labels.contiguous();
  const int64_t* label = labels_c.const_data_ptr<int64_t>();
  const TokenMuOutputs out = result.pointers();
  const BlockKernels& k = block_kernels();
  const SplitPlan plan = cpu_plan(x.rows, x.vocab);
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* za = x.z_a.const_data_ptr<T>();
    const T* zb = x.z_b.const_data_ptr<T>();
    const auto summary = row_summaries(k, za, zb, x.rows, x.vocab, plan, static_cast<float>(log_alpha));
    std::vector<KeptSums> partial(x.rows * plan.splits);
    for_each_chunk(x.rows, x.vocab, plan, [&](int64_t task, int64_t row, int64_t lo, int64_t hi) {
      float buf_a[kBlock], buf_b[kBlock];
      KeptSums s{0.0f, 0.0f};
      for (int64_t off = row * x.vocab + lo; off < row * x.vocab + hi; off += kBlock) {
        const int64_t n = std::min(kBlock, row * x.vocab + hi - off);
        const KeptSums block = k.kept_sums(load_block(k, za + off, n, buf_a), load_block(k, zb + off, n, buf_b), n,
                                           summary[row]);
        s.pa_dot_delta += block.pa_dot_delta;
        s.delta_sq += block.delta_sq;
      }
      partial[task] = s;
    });
    for (int64_t row = 0; row < x.rows; ++row) {
      const RowSummary& r = summary[row];
      const int64_t y = label[row];
      const bool target = y != ignore_index && y >= 0 && y < x.vocab;
      const float label_delta_k =
          target ? kept_delta(static_cast<float>(za[row * x.vocab + y]), static_cast<float>(zb[row * x.vocab + y]), r)
                 : 0.0f;
      KeptSums s{0.0f, 0.0f};
      for (int64_t split = 0; split < plan.splits; ++split) {
        s.pa_dot_delta += partial[row * plan.splits + split].pa_dot_delta;
        s.delta_sq += partial[row * plan.splits + split].delta_sq;
      }
      write_token_mu(out, row, target, r.bad, label_delta_k, s.pa_dot_delta, s.delta_sq, static_cast<float>(eps));
    }
  });
  return result.tuple();
}

// The benchmarks' exp-throughput bound: pass 1's exps alone, per row, over the same chunks and threads.
at::Tensor exp_throughput_bound_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  const BlockKernels& k = block_kernels();
  const SplitPlan plan = cpu_plan(x.rows, x.vocab);
  std::vector<float> partial(x.rows * plan.splits);
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* za = x.z_a.const_data_ptr<T>();
    const T* zb = x.z_b.const_data_ptr<T>();
    for_each_chunk(x.rows, x.vocab, plan, [&](int64_t task, int64_t row, int64_t lo, int64_t hi) {
      float buf_a[kBlock], buf_b[kBlock], sum = 0.0f;
      for (int64_t off = row * x.vocab + lo; off < row * x.vocab + hi; off += kBlock) {
        const int64_t n = std::min(kBlock, row * x.vocab + hi - off);
        sum += k.exp_sum(load_block(k, za + off, n, buf_a), load_block(k, zb + off, n, buf_b), n);
      }
      partial[task] = sum;
    });
  });
  at::Tensor sums = at::zeros({x.rows}, z_adapted.options().dtype(at::kFloat));
  float* out = sums.data_ptr<float>();
  for (int64_t task = 0; task < x.rows * plan.splits; ++task) out[task / plan.splits] += partial[task];
  return sums;
}

}  // namespace

TORCH_LIBRARY_IMPL(svd_fast, CPU, m) {
  m.impl("steering_vector", &steering_vector_cpu);
  m.impl("steer_logits_out", &steer_logits_out_cpu);
  m.impl("token_mu", &token_mu_cpu);
  m.impl("exp_throughput_bound", &exp_throughput_bound_cpu);
}

}  // namespace svd_fast
