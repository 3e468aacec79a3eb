// CPU kernels: rows (and, when rows are few, vocabulary chunks) run in parallel with at::parallel_for;
// the inner loops work on float blocks that fit in L1 and are written as fixed-width lane loops that
// GCC vectorizes, compiled twice (x86-64-v3 = AVX2/FMA, and baseline) and picked at load time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "steering_host.h"
#include "steering_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SVD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SVD_CPU_CLONES
#endif

namespace svd_fast {
namespace {

constexpr int64_t kBlock = 1024;      // elements handled at a time, as float32 (8 KiB for two rows)
constexpr int kLanes = 16;            // independent accumulators: vectorizable without reassociation
constexpr int64_t kMinChunk = 16384;  // smallest vocabulary chunk worth a task of its own

SVD_CPU_CLONES
RowStats block_stats(const float* __restrict a, const float* __restrict b, int64_t n) {
  float ma[kLanes], mb[kLanes];
  uint32_t flags[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    ma[j] = -kInf;
    mb[j] = -kInf;
    flags[j] = 0;
  }
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      ma[j] = max_ignoring_nan(ma[j], a[i + j]);
      mb[j] = max_ignoring_nan(mb[j], b[i + j]);
      flags[j] |= element_flags(a[i + j], b[i + j]);
    }
  }
  RowStats s = empty_stats();
  for (int j = 0; j < kLanes; ++j) {
    s.max_a = max_ignoring_nan(s.max_a, ma[j]);
    s.max_b = max_ignoring_nan(s.max_b, mb[j]);
    s.flags |= flags[j];
  }
  for (int64_t i = body; i < n; ++i) {
    s.max_a = max_ignoring_nan(s.max_a, a[i]);
    s.max_b = max_ignoring_nan(s.max_b, b[i]);
    s.flags |= element_flags(a[i], b[i]);
  }

  float sa[kLanes], sb[kLanes], cross[kLanes];
  for (int j = 0; j < kLanes; ++j) sa[j] = sb[j] = cross[j] = 0.0f;
  const float max_a = s.max_a, max_b = s.max_b;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const ElementTerms t = element_terms(a[i + j], b[i + j], max_a, max_b);
      sa[j] += t.exp_a;
      sb[j] += t.exp_b;
      cross[j] += t.cross;
    }
  }
  for (int64_t i = body; i < n; ++i) {
    const ElementTerms t = element_terms(a[i], b[i], max_a, max_b);
    s.sum_a += t.exp_a;
    s.sum_b += t.exp_b;
    s.cross += t.cross;
  }
  for (int j = 0; j < kLanes; ++j) {
    s.sum_a += sa[j];
    s.sum_b += sb[j];
    s.cross += cross[j];
  }
  return s;
}

SVD_CPU_CLONES
void block_delta(const float* __restrict a, const float* __restrict b, int64_t n, RowSummary r,
                 float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    float p_a;
    out[i] = steering_delta(a[i], b[i], r, p_a);
  }
}

// Kept tokens are few (alpha = 0.1 keeps those within log(10) of the top logit), so groups of lanes
// with none kept skip the exp and write the fill directly.
SVD_CPU_CLONES
void block_steer(const float* __restrict a, const float* __restrict b, int64_t n, RowSummary r, float mu,
                 int64_t fill_mode, float fill_value, float* __restrict out) {
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    bool any_kept = false;
    for (int j = 0; j < kLanes; ++j) any_kept |= is_kept(a[i + j], r);
    if (!any_kept) {
      for (int j = 0; j < kLanes; ++j)
        out[i + j] = steered_logit(a[i + j], 0.0f, false, mu, fill_mode, fill_value);
      continue;
    }
    for (int j = 0; j < kLanes; ++j) {
      float p_a;
      const float d = steering_delta(a[i + j], b[i + j], r, p_a);
      out[i + j] = steered_logit(a[i + j], d, is_kept(a[i + j], r), mu, fill_mode, fill_value);
    }
  }
  for (int64_t i = body; i < n; ++i) {
    float p_a;
    const float d = steering_delta(a[i], b[i], r, p_a);
    out[i] = steered_logit(a[i], d, is_kept(a[i], r), mu, fill_mode, fill_value);
  }
}

struct KeptSums {
  float pa_dot_delta, delta_sq;  // sums over the keep set K of p_a * delta and delta^2
};

SVD_CPU_CLONES
KeptSums block_kept_sums(const float* __restrict a, const float* __restrict b, int64_t n, RowSummary r) {
  KeptSums s{0.0f, 0.0f};
  for (int64_t i = 0; i < n; ++i) {
    if (!is_kept(a[i], r)) continue;
    float p_a;
    const float d = steering_delta(a[i], b[i], r, p_a);
    s.pa_dot_delta += p_a * d;
    s.delta_sq += d * d;
  }
  return s;
}

// A float view of n logits: the input itself for float32, else converted into buf. `copy` forces a
// copy for float32 too (when the output overwrites the input).
template <typename T>
const float* load_block(const T* p, int64_t n, float* buf, bool copy = false) {
  if constexpr (std::is_same_v<T, float>) {
    if (!copy) return p;
  }
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
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
  return plan_splits(rows, vocab, 2 * at::get_num_threads(), kMinChunk, kLanes);
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
               block_steer(a, b, n, r, row_mu, fill_mode, static_cast<float>(fill_value), o);
             });
}

at::Tensor steer_logits_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base,
                            const c10::optional<at::Tensor>& mu_rows, double mu, double log_alpha,
                            int64_t fill_mode, double fill_value) {
  at::Tensor out = at::empty(z_adapted.sizes(), z_adapted.options().dtype(at::kFloat));
  steer_logits_out_cpu(z_adapted, z_base, mu_rows, mu, log_alpha, fill_mode, fill_value, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> token_mu_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base,
                                                const at::Tensor& labels, double log_alpha, double eps,
                                                int64_t ignore_index) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  check_labels(x, labels);
  const auto row_shape = z_adapted.sizes().slice(0, z_adapted.dim() - 1);
  at::Tensor mu_star = at::empty(row_shape, z_adapted.options().dtype(at::kFloat));
  at::Tensor valid = at::empty(row_shape, z_adapted.options().dtype(at::kBool));
  if (x.rows == 0) return {mu_star, valid};
  const at::Tensor labels_c = labels.contiguous();
  const int64_t* label = labels_c.const_data_ptr<int64_t>();
  float* mu_out = mu_star.data_ptr<float>();
  bool* valid_out = valid.data_ptr<bool>();
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
      float label_delta_k = 0.0f;
      if (target) {
        const float a = static_cast<float>(za[row * x.vocab + y]);
        const float b = static_cast<float>(zb[row * x.vocab + y]);
        float p_a;
        const float d = steering_delta(a, b, r, p_a);
        label_delta_k = is_kept(a, r) ? d : 0.0f;
      }
      KeptSums s{0.0f, 0.0f};
      for (int64_t k = 0; k < plan.splits; ++k) {
        s.pa_dot_delta += partial[row * plan.splits + k].pa_dot_delta;
        s.delta_sq += partial[row * plan.splits + k].delta_sq;
      }
      token_mu_from_sums(target, r.bad, label_delta_k, s.pa_dot_delta, s.delta_sq, static_cast<float>(eps),
                         mu_out[row], valid_out[row]);
    }
  });
  return {mu_star, valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(svd_fast, CPU, m) {
  m.impl("steering_vector", &steering_vector_cpu);
  m.impl("steer_logits", &steer_logits_cpu);
  m.impl("steer_logits_out", &steer_logits_out_cpu);
  m.impl("token_mu", &token_mu_cpu);
}

}  // namespace svd_fast
