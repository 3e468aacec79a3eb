// CPU kernels: rows (and, when rows are few, vocabulary chunks) run in parallel with at::parallel_for;
// the inner loops work on float blocks that fit in L1 and are `omp simd` loops (vectorized reductions),
// compiled for AVX-512 (x86-64-v4), AVX2/FMA (x86-64-v3) and baseline x86-64, the best one picked at
// load time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "steering_host.h"
#include "steering_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SVD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SVD_CPU_CLONES
#endif

namespace svd_fast {
namespace {

constexpr int64_t kBlock = 1024;      // elements handled at a time, as float32 (8 KiB for two rows)
constexpr int64_t kMinChunk = 16384;  // smallest vocabulary chunk worth a task of its own
constexpr int64_t kAlign = 16;        // chunk boundaries, in elements (one AVX-512 vector)

SVD_CPU_CLONES
float block_max(const float* __restrict a, int64_t n) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = max_ignoring_nan(m, a[i]);
  return m;
}

SVD_CPU_CLONES
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

SVD_CPU_CLONES
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
SVD_CPU_CLONES
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

SVD_CPU_CLONES
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

SVD_CPU_CLONES
void widen(const c10::BFloat16* __restrict in, int64_t n, float* __restrict out) {
  const auto* bits = reinterpret_cast<const uint16_t*>(in);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;  // bf16 is the top half of a float32
    std::memcpy(&out[i], &word, sizeof(float));
  }
}

SVD_CPU_CLONES
void widen(const c10::Half* __restrict in, int64_t n, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

// A float view of n logits: the input itself for float32, else converted into buf. `copy` forces a
// copy for float32 too (when the output overwrites the input).
template <typename T>
const float* load_block(const T* p, int64_t n, float* buf, bool copy = false) {
  if constexpr (std::is_same_v<T, float>) {
    if (!copy) return p;
    std::memcpy(buf, p, n * sizeof(float));
  } else {
    widen(p, n, buf);
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
std::vector<RowSummary> row_summaries(const T* za, const T* zb, int64_t rows, int64_t vocab,
                                      const SplitPlan& plan, float log_alpha) {
  std::vector<RowStats> partial(rows * plan.splits);
  for_each_chunk(rows, vocab, plan, [&](int64_t task, int64_t row, int64_t lo, int64_t hi) {
    float buf_a[kBlock], buf_b[kBlock];
    RowStats s = empty_stats();
    for (int64_t off = row * vocab + lo; off < row * vocab + hi; off += kBlock) {
      const int64_t n = std::min(kBlock, row * vocab + hi - off);
      s = merge(s, block_stats(load_block(za + off, n, buf_a), load_block(zb + off, n, buf_b), n));
    }
    partial[task] = s;
  });
  std::vector<RowSummary> summary(rows);
  for (int64_t row = 0; row < rows; ++row) {
    RowStats s = empty_stats();
    for (int64_t k = 0; k < plan.splits; ++k) s = merge(s, partial[row * plan.splits + k]);
    summary[row] = finalize(s, log_alpha);
  }
  return summary;
}

SplitPlan cpu_plan(int64_t rows, int64_t vocab) {
  return plan_splits(rows, vocab, 2 * at::get_num_threads(), kMinChunk, kAlign);
}

// Pass 2 for the two ops with a [rows, V] float output: block_fn(a, b, n, summary, row, out).
template <typename BlockFn>
void write_rows(const LogitRows& x, float log_alpha, float* out, BlockFn&& block_fn) {
  if (x.rows == 0) return;
  const SplitPlan plan = cpu_plan(x.rows, x.vocab);
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* za = x.z_a.const_data_ptr<T>();
    const T* zb = x.z_b.const_data_ptr<T>();
    const auto summary = row_summaries(za, zb, x.rows, x.vocab, plan, log_alpha);
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
        block_fn(load_block(za + off, n, buf_a, out_aliases_input),
                 load_block(zb + off, n, buf_b, out_aliases_input), n, r, row, out + off);
      }
    });
  });
}

at::Tensor steering_vector_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  at::Tensor out = at::empty(z_adapted.sizes(), z_adapted.options().dtype(at::kFloat));
  write_rows(x, 0.0f, out.data_ptr<float>(),
             [](const float* a, const float* b, int64_t n, const RowSummary& r, int64_t, float* o) {
               block_delta(a, b, n, r, o);
             });
  return out;
}

void steer_logits_out_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base,
                          const c10::optional<at::Tensor>& mu_rows, double mu, double log_alpha,
                          int64_t fill_mode, double fill_value, at::Tensor& out) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  check_steer_args(x, mu_rows, out);
  const float* mu_of_row = mu_rows.has_value() ? mu_rows->const_data_ptr<float>() : nullptr;
  write_rows(x, static_cast<float>(log_alpha), out.data_ptr<float>(),
             [&](const float* a, const float* b, int64_t n, const RowSummary& r, int64_t row, float* o) {
               const float row_mu = mu_of_row ? mu_of_row[row] : static_cast<float>(mu);
               block_steer(a, b, n, r, row_mu, fill_rule(fill_mode, row_mu, static_cast<float>(fill_value)), o);
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
  const SplitPlan plan = cpu_plan(x.rows, x.vocab);
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* za = x.z_a.const_data_ptr<T>();
    const T* zb = x.z_b.const_data_ptr<T>();
    const auto summary = row_summaries(za, zb, x.rows, x.vocab, plan, static_cast<float>(log_alpha));
    std::vector<KeptSums> partial(x.rows * plan.splits);
    for_each_chunk(x.rows, x.vocab, plan, [&](int64_t task, int64_t row, int64_t lo, int64_t hi) {
      float buf_a[kBlock], buf_b[kBlock];
      KeptSums s{0.0f, 0.0f};
      for (int64_t off = row * x.vocab + lo; off < row * x.vocab + hi; off += kBlock) {
        const int64_t n = std::min(kBlock, row * x.vocab + hi - off);
        const KeptSums k = block_kept_sums(load_block(za + off, n, buf_a), load_block(zb + off, n, buf_b), n,
                                           summary[row]);
        s.pa_dot_delta += k.pa_dot_delta;
        s.delta_sq += k.delta_sq;
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
      for (int64_t k = 0; k < plan.splits; ++k) {
        s.pa_dot_delta += partial[row * plan.splits + k].pa_dot_delta;
        s.delta_sq += partial[row * plan.splits + k].delta_sq;
      }
      write_token_mu(out, row, target, r.bad, label_delta_k, s.pa_dot_delta, s.delta_sq, static_cast<float>(eps));
    }
  });
  return result.tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(svd_fast, CPU, m) {
  m.impl("steering_vector", &steering_vector_cpu);
  m.impl("steer_logits_out", &steer_logits_out_cpu);
  m.impl("token_mu", &token_mu_cpu);
}

}  // namespace svd_fast
