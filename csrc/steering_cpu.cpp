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
constexpr int64_t kMinChunk = 16384;  // smallest vocabulary chunk worth a task of its own; chunks are whole blocks

SVD_HD
RowStats block_stats_two_loops(const float* __restrict a, const float* __restrict b, int64_t n) {
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

// A block's statistics, merged into those of the blocks before it (`running`), the block's own largest
// z_a (for pass 2), and its own sum of exp(z_a - frame_a) (for steered_nll's blocks without kept tokens).
struct BlockStats {
  RowStats merged;
  float max_a, frame_a, sum_a;
};

// Larger leads of a block's maximum over the running one are measured again from the block's own: exp of
// up to 60 stays far from float32 overflow, also summed over a block. So is a block whose KL term
// e^lead * (z_a - z_b) overflowed (|z_a - z_b| beyond ~1e9 at a token that leads) without a flag that
// explains it.
constexpr float kMaxLead = 60.0f;

// One loop per block: the maxima, the flags and the sums together, the exps measured from the running
// maxima of the blocks before (so the block is read once, its loads overlapping the exps), then rescaled
// to the new maxima. A block with no running maxima yet takes two loops (maxima first).
SVD_HD
BlockStats block_stats(const float* __restrict a, const float* __restrict b, int64_t n, RowStats running) {
  const float ref_a = running.max_a, ref_b = running.max_b;
  if (ref_a == -kInf || ref_b == -kInf) {
    const RowStats s = block_stats_two_loops(a, b, n);
    return BlockStats{merge(running, s), s.max_a, s.max_a, s.sum_a};
  }
  float max_a = -kInf, max_b = -kInf, sum_a = 0.0f, sum_b = 0.0f, cross = 0.0f;
  uint32_t flags = 0;
#pragma omp simd reduction(max : max_a, max_b) reduction(| : flags) reduction(+ : sum_a, sum_b, cross)
  for (int64_t i = 0; i < n; ++i) {
    max_a = max_ignoring_nan(max_a, a[i]);
    max_b = max_ignoring_nan(max_b, b[i]);
    flags |= element_flags(a[i], b[i]);
    const ElementTerms t = element_terms(a[i], b[i], ref_a, ref_b);
    sum_a += t.exp_a;
    sum_b += t.exp_b;
    cross += t.cross;
  }
  const bool cross_finite = cross - cross == 0.0f;  // false for inf and NaN
  if (!(max_a <= ref_a + kMaxLead && max_b <= ref_b + kMaxLead) || (!cross_finite && flags == 0u)) {
    const RowStats s = block_stats_two_loops(a, b, n);
    return BlockStats{merge(running, s), s.max_a, s.max_a, s.sum_a};
  }
  const RowStats s = rescale(RowStats{ref_a, sum_a, ref_b, sum_b, cross, flags}, ref_a > max_a ? ref_a : max_a,
                             ref_b > max_b ? ref_b : max_b);
  return BlockStats{merge(running, s), max_a, s.max_a, s.sum_a};
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

// Only blocks holding a kept token come here (see write_rows); the others are written as fill.
SVD_HD
void block_steer(const float* __restrict a, const float* __restrict b, int64_t n, RowSummary r, float mu,
                 FillRule fill, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float p_a;
    const float d = steering_delta(a[i], b[i], r, p_a);
    out[i] = steered_logit(a[i], d, is_kept(a[i], r), mu, fill);
  }
}

// A block with no kept token under a finite fill: z_a + add ("keep": add = 0).
SVD_HD
void block_fill(const float* __restrict a, int64_t n, float add, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + add;
}

struct KeptSums {
  float pa_dot_delta, delta_sq;  // sums over the keep set K of p_a * delta and delta^2
};

SVD_HD
KeptSums block_kept_sums(const float* __restrict a, const float* __restrict b, int64_t n, RowSummary r) {
  float pa_dot_delta = 0.0f, delta_sq = 0.0f;
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

// steered_nll's statistics of a block holding kept tokens, for each of the K strengths. Its masked tokens
// all lie on z_a + mu * fill.slope: one sum of exp(z_a) serves every strength. The kept tokens (few: within
// log(1/alpha) of the top logit) are gathered with their delta, and only they are visited per strength.
SVD_HD
void block_nll(const float* __restrict a, const float* __restrict b, int64_t n, RowSummary r, NllFill fill,
               float label_slope, const float* __restrict mus, int64_t strengths, NllStats* __restrict acc) {
  float masked_max = -kInf;
#pragma omp simd reduction(max : masked_max)
  for (int64_t i = 0; i < n; ++i) masked_max = max_ignoring_nan(masked_max, is_kept(a[i], r) ? -kInf : a[i]);
  const float masked_ref = masked_max == -kInf ? 0.0f : masked_max;
  float masked_sum = 0.0f;
#pragma omp simd reduction(+ : masked_sum)
  for (int64_t i = 0; i < n; ++i) masked_sum += is_kept(a[i], r) ? 0.0f : fast_exp(a[i] - masked_ref);
  float kept_a[kBlock], kept_delta[kBlock];
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!is_kept(a[i], r)) continue;
    float p_a;
    kept_a[kept] = a[i];
    kept_delta[kept++] = steering_delta(a[i], b[i], r, p_a);
  }
  const float t_masked = fill.slope - label_slope;
  const bool masked_in = !fill.neg_inf && masked_sum > 0.0f;
  for (int64_t k = 0; k < strengths; ++k) {
    const float mu = mus[k];
    float max = -kInf;
#pragma omp simd reduction(max : max)
    for (int64_t j = 0; j < kept; ++j) max = max_ignoring_nan(max, kept_a[j] + mu * kept_delta[j]);
    const float ref = max == -kInf ? 0.0f : max;  // no kept token: nothing to add
    float sum = 0.0f, s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : sum, s1, s2)
    for (int64_t j = 0; j < kept; ++j) {
      const float e = fast_exp(kept_a[j] + mu * kept_delta[j] - ref);
      const float t = kept_delta[j] - label_slope;
      sum += e;
      s1 += e * t;
      s2 += e * t * t;
    }
    acc[k] = merge(acc[k], NllStats{max, sum, s1, s2});
    if (masked_in)
      acc[k] = merge(acc[k], NllStats{masked_max + mu * fill.slope, masked_sum, t_masked * masked_sum,
                                      t_masked * t_masked * masked_sum});
  }
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
  for (int64_t i = 0; i < n; ++i) sum += fast_exp(-std::fabs(a[i])) + fast_exp(-std::fabs(b[i]));
  return sum;
}

// The block loops of one ISA.
struct BlockKernels {
  BlockStats (*stats)(const float*, const float*, int64_t, RowStats);
  void (*delta)(const float*, const float*, int64_t, RowSummary, float*);
  void (*steer)(const float*, const float*, int64_t, RowSummary, float, FillRule, float*);
  void (*fill)(const float*, int64_t, float, float*);
  KeptSums (*kept_sums)(const float*, const float*, int64_t, RowSummary);
  void (*nll)(const float*, const float*, int64_t, RowSummary, NllFill, float, const float*, int64_t, NllStats*);
  void (*widen_bf16)(const c10::BFloat16*, int64_t, float*);
  void (*widen_half)(const c10::Half*, int64_t, float*);
  float (*exp_sum)(const float*, const float*, int64_t);
};

// Entry points that inline the loops above, compiled with the given target attribute.
#define SVD_BLOCK_KERNELS(NAME, TARGET)                                                                          \
  TARGET BlockStats NAME##_stats(const float* a, const float* b, int64_t n, RowStats s) {                        \
    return block_stats(a, b, n, s);                                                                               \
  }                                                                                                               \
  TARGET void NAME##_delta(const float* a, const float* b, int64_t n, RowSummary r, float* o) {                  \
    block_delta(a, b, n, r, o);                                                                                   \
  }                                                                                                               \
  TARGET void NAME##_steer(const float* a, const float* b, int64_t n, RowSummary r, float mu, FillRule f,        \
                           float* o) {                                                                            \
    block_steer(a, b, n, r, mu, f, o);                                                                            \
  }                                                                                                               \
  TARGET void NAME##_fill(const float* a, int64_t n, float add, float* o) { block_fill(a, n, add, o); }           \
  TARGET KeptSums NAME##_kept_sums(const float* a, const float* b, int64_t n, RowSummary r) {                    \
    return block_kept_sums(a, b, n, r);                                                                           \
  }                                                                                                               \
  TARGET void NAME##_nll(const float* a, const float* b, int64_t n, RowSummary r, NllFill f, float c,          \
                         const float* mus, int64_t k, NllStats* acc) {                                            \
    block_nll(a, b, n, r, f, c, mus, k, acc);                                                                     \
  }                                                                                                               \
  TARGET void NAME##_widen_bf16(const c10::BFloat16* in, int64_t n, float* o) { widen(in, n, o); }                \
  TARGET void NAME##_widen_half(const c10::Half* in, int64_t n, float* o) { widen(in, n, o); }                    \
  TARGET float NAME##_exp_sum(const float* a, const float* b, int64_t n) { return block_exp_sum(a, b, n); }       \
  const BlockKernels NAME##_kernels{&NAME##_stats,      &NAME##_delta,      &NAME##_steer,                         \
                                    &NAME##_fill,       &NAME##_kept_sums,  &NAME##_nll,                           \
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

// One block of a row: its raw logits, converted to float32 when first asked for.
template <typename T>
struct Block {
  const BlockKernels& k;
  const T *za, *zb;  // the block's first element in each input
  int64_t n;
  float *buf_a, *buf_b;
  bool copy;  // float32 too goes through the buffers (the output overwrites an input)
  const float* a() const { return load_block(k, za, n, buf_a, copy); }
  const float* b() const { return load_block(k, zb, n, buf_b, copy); }
};

// Runs fn(task, row, off, Block) over the blocks of every chunk of the plan, in parallel; off is the block's
// offset in a contiguous [rows, vocab] output (the inputs are read where their rows lie).
template <typename T, typename Fn>
void for_each_block(const BlockKernels& k, const RowPointers<T>& p, int64_t rows, int64_t vocab,
                    const SplitPlan& plan, bool copy, Fn&& fn) {
  for_each_chunk(rows, vocab, plan, [&](int64_t task, int64_t row, int64_t lo, int64_t hi) {
    float buf_a[kBlock], buf_b[kBlock];
    const T *a = p.a(row), *b = p.b(row);
    for (int64_t i = lo; i < hi; i += kBlock) {
      fn(task, row, row * vocab + i, Block<T>{k, a + i, b + i, std::min(kBlock, hi - i), buf_a, buf_b, copy});
    }
  });
}

// What pass 1 leaves for pass 2: each row's summary, the largest z_a of every block (so that pass 2 can
// tell a block without kept tokens, most of them: alpha = 0.1 keeps the tokens within log(10) of the top
// logit, without reading it again), and which blocks pass 1 has written already.
struct Pass1 {
  std::vector<RowSummary> summary;
  std::vector<float> block_max_a;  // [rows, blocks_per_row]
  std::vector<uint8_t> written;    // [rows, blocks_per_row]
  int64_t blocks_per_row;
  std::vector<float> block_frame_a, block_sum_a;  // [rows, blocks_per_row]: sum exp(z_a - frame_a) of a block
  int64_t block_index(int64_t row, int64_t off, int64_t vocab) const {
    return row * blocks_per_row + (off - row * vocab) / kBlock;
  }
  bool any_kept(int64_t row, int64_t off, int64_t vocab) const {
    return is_kept(block_max_a[block_index(row, off, vocab)], summary[row]);
  }
};

// Pass 1 of every op: one RowStats per block, merged per (row, chunk), then per row. A block whose largest
// z_a lies below the running maximum + log(alpha) holds no kept token whatever the rest of the row holds:
// write_unkept(row, a, n, out_offset) may write its output now, while the block is in L1, and pass 2
// skips it (a no-op write_unkept returns false).
template <typename T, typename WriteUnkept>
Pass1 row_summaries(const BlockKernels& k, const RowPointers<T>& p, int64_t rows, int64_t vocab,
                    const SplitPlan& plan, float log_alpha, bool copy, WriteUnkept&& write_unkept) {
  Pass1 result{std::vector<RowSummary>(rows), {}, {}, ceil_div(vocab, kBlock)};
  result.block_max_a.resize(rows * result.blocks_per_row);
  result.written.assign(rows * result.blocks_per_row, 0);
  result.block_frame_a.resize(rows * result.blocks_per_row);
  result.block_sum_a.resize(rows * result.blocks_per_row);
  std::vector<RowStats> partial(rows * plan.splits, empty_stats());
  for_each_block(k, p, rows, vocab, plan, copy, [&](int64_t task, int64_t row, int64_t off, const Block<T>& blk) {
    const float* a = blk.a();
    const BlockStats s = k.stats(a, blk.b(), blk.n, partial[task]);
    const int64_t index = result.block_index(row, off, vocab);
    result.block_max_a[index] = s.max_a;
    result.block_frame_a[index] = s.frame_a;
    result.block_sum_a[index] = s.sum_a;
    partial[task] = s.merged;
    if (s.max_a < s.merged.max_a + log_alpha) result.written[index] = write_unkept(row, a, blk.n, off);
  });
  for (int64_t row = 0; row < rows; ++row) {
    RowStats s = empty_stats();
    for (int64_t split = 0; split < plan.splits; ++split) s = merge(s, partial[row * plan.splits + split]);
    result.summary[row] = finalize(s, log_alpha);
  }
  return result;
}

template <typename T>
Pass1 row_summaries(const BlockKernels& k, const RowPointers<T>& p, int64_t rows, int64_t vocab,
                    const SplitPlan& plan, float log_alpha) {
  return row_summaries(k, p, rows, vocab, plan, log_alpha, false,
                       [](int64_t, const float*, int64_t, int64_t) { return false; });
}

SplitPlan cpu_plan(int64_t rows, int64_t vocab) {
  return plan_splits(rows, vocab, 2 * at::get_num_threads(), kMinChunk, kBlock);
}

// Both passes for the ops with a [rows, V] float output: pass 1 may write blocks without kept tokens
// (write_unkept, see row_summaries); pass 2 calls block_fn(block, summary, any_kept, row, out) for every
// other block of a row, and writes NaN over a row found bad.
template <typename WriteUnkept, typename BlockFn>
void write_rows(const LogitRows& x, float log_alpha, float* out, WriteUnkept&& write_unkept, BlockFn&& block_fn) {
  if (x.rows == 0) return;
  const BlockKernels& k = block_kernels();
  const SplitPlan plan = cpu_plan(x.rows, x.vocab);
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const RowPointers<T> p = x.pointers<T>();
    const bool out_aliases_input = static_cast<const void*>(out) == static_cast<const void*>(p.za) ||
                                   static_cast<const void*>(out) == static_cast<const void*>(p.zb);
    const Pass1 pass1 = row_summaries(
        k, p, x.rows, x.vocab, plan, log_alpha, out_aliases_input,
        [&](int64_t row, const float* a, int64_t n, int64_t off) { return write_unkept(k, row, a, n, out + off); });
    for_each_block(k, p, x.rows, x.vocab, plan, out_aliases_input,
                   [&](int64_t, int64_t row, int64_t off, const Block<T>& blk) {
                     const RowSummary& r = pass1.summary[row];
                     if (r.bad) {
                       std::fill(out + off, out + off + blk.n, kNaN);
                     } else if (!pass1.written[pass1.block_index(row, off, x.vocab)]) {
                       block_fn(blk, r, pass1.any_kept(row, off, x.vocab), row, out + off);
                     }
                   });
  });
}

at::Tensor steering_vector_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  at::Tensor out = at::empty(z_adapted.sizes(), z_adapted.options().dtype(at::kFloat));
  write_rows(
      x, 0.0f, out.data_ptr<float>(), [](const BlockKernels&, int64_t, const float*, int64_t, float*) { return false; },
      [](const auto& blk, const RowSummary& r, bool, int64_t, float* o) { blk.k.delta(blk.a(), blk.b(), blk.n, r, o); });
  return out;
}

void steer_logits_out_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base,
                          const c10::optional<at::Tensor>& mu_rows, double mu, double log_alpha,
                          int64_t fill_mode, double fill_value, at::Tensor& out) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  check_steer_args(x, mu_rows, out);
  const float* mu_of_row = mu_rows.has_value() ? mu_rows->const_data_ptr<float>() : nullptr;
  const auto row_mu = [&](int64_t row) { return mu_of_row ? mu_of_row[row] : static_cast<float>(mu); };
  const auto row_fill = [&](int64_t row) { return fill_rule(fill_mode, row_mu(row), static_cast<float>(fill_value)); };
  // A block without a kept token is all fill: -inf, or z_a + mu * lambda (lambda = 0 for "keep").
  const auto write_fill = [&](const BlockKernels& k, int64_t row, const float* a, int64_t n, float* o) {
    const FillRule fill = row_fill(row);
    if (fill.neg_inf) {
      std::fill(o, o + n, -kInf);
    } else {
      k.fill(a, n, fill.add, o);
    }
    return true;
  };
  write_rows(x, static_cast<float>(log_alpha), out.data_ptr<float>(), write_fill,
             [&](const auto& blk, const RowSummary& r, bool any_kept, int64_t row, float* o) {
               if (any_kept) {
                 blk.k.steer(blk.a(), blk.b(), blk.n, r, row_mu(row), row_fill(row), o);
               } else {
                 write_fill(blk.k, row, row_fill(row).neg_inf ? nullptr : blk.a(), blk.n, o);  // -inf reads nothing
               }
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
    const RowPointers<T> p = x.pointers<T>();
    const Pass1 pass1 = row_summaries(k, p, x.rows, x.vocab, plan, static_cast<float>(log_alpha));
    const auto& summary = pass1.summary;
    std::vector<KeptSums> partial(x.rows * plan.splits, KeptSums{0.0f, 0.0f});
    for_each_block(k, p, x.rows, x.vocab, plan, false, [&](int64_t task, int64_t row, int64_t off, const Block<T>& blk) {
      if (!pass1.any_kept(row, off, x.vocab)) return;
      const KeptSums block = k.kept_sums(blk.a(), blk.b(), blk.n, summary[row]);
      partial[task].pa_dot_delta += block.pa_dot_delta;
      partial[task].delta_sq += block.delta_sq;
    });
    for (int64_t row = 0; row < x.rows; ++row) {
      const RowSummary& r = summary[row];
      KeptSums s{0.0f, 0.0f};
      for (int64_t split = 0; split < plan.splits; ++split) {
        s.pa_dot_delta += partial[row * plan.splits + split].pa_dot_delta;
        s.delta_sq += partial[row * plan.splits + split].delta_sq;
      }
      write_token_mu(out, p, row, label[row], ignore_index, x.vocab, r, s.pa_dot_delta, s.delta_sq,
                     static_cast<float>(eps));
    }
  });
  return result.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> steered_nll_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base,
                                                               const at::Tensor& labels, const at::Tensor& mus,
                                                               double log_alpha, int64_t fill_mode, double fill_value,
                                                               int64_t ignore_index) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  check_labels(x, labels);
  check_strengths(x, mus);
  NllTensors result(z_adapted, mus.numel());
  const int64_t strengths = mus.numel();
  if (x.rows == 0 || strengths == 0) return result.tuple();
  const at::Tensor labels_c = labels.contiguous();
  const int64_t* label = labels_c.const_data_ptr<int64_t>();
  const float* mu = mus.const_data_ptr<float>();
  const NllFill fill = nll_fill(fill_mode, static_cast<float>(fill_value));
  const BlockKernels& k = block_kernels();
  const SplitPlan plan = cpu_plan(x.rows, x.vocab);
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const RowPointers<T> p = x.pointers<T>();
    const Pass1 pass1 = row_summaries(k, p, x.rows, x.vocab, plan, static_cast<float>(log_alpha));
    std::vector<NllLabel> labels_of(x.rows);
    for (int64_t row = 0; row < x.rows; ++row)
      labels_of[row] = nll_label(p, row, label[row], ignore_index, x.vocab, pass1.summary[row], fill);
    std::vector<NllStats> partial(x.rows * plan.splits * strengths, empty_nll_stats());
    for_each_block(k, p, x.rows, x.vocab, plan, false, [&](int64_t task, int64_t row, int64_t off, const Block<T>& blk) {
      const NllLabel& l = labels_of[row];
      if (pass1.summary[row].bad || !(l.x0 > -kInf)) return;  // the outputs need no sums (ignored rows: x0 = -inf)
      NllStats* acc = &partial[task * strengths];
      if (pass1.any_kept(row, off, x.vocab)) {
        k.nll(blk.a(), blk.b(), blk.n, pass1.summary[row], fill, l.slope, mu, strengths, acc);
        return;
      }
      // No kept token: every token lies on z_a + mu * fill.slope, so the block's sum from pass 1 serves,
      // unless pass 1 measured it from a maximum so far above the block's own that its terms underflowed:
      // at a large mu * lambda those tokens may still dominate, so block_nll measures it from its own.
      if (fill.neg_inf) return;
      const int64_t index = pass1.block_index(row, off, x.vocab);
      if (pass1.block_max_a[index] < pass1.block_frame_a[index] - kMaxLead) {
        k.nll(blk.a(), blk.b(), blk.n, pass1.summary[row], fill, l.slope, mu, strengths, acc);
        return;
      }
      const float sum = pass1.block_sum_a[index], t = fill.slope - l.slope;
      if (!(sum > 0.0f)) return;
      for (int64_t j = 0; j < strengths; ++j)
        acc[j] = merge(acc[j], NllStats{pass1.block_frame_a[index] + mu[j] * fill.slope, sum, t * sum, t * t * sum});
    });
    const NllOutputs out = result.pointers();
    for (int64_t row = 0; row < x.rows; ++row) {
      for (int64_t j = 0; j < strengths; ++j) {
        NllStats s = empty_nll_stats();
        for (int64_t split = 0; split < plan.splits; ++split) s = merge(s, partial[(row * plan.splits + split) * strengths + j]);
        write_nll(out, row * strengths + j, labels_of[row], pass1.summary[row].bad, mu[j], s);
      }
    }
  });
  return result.tuple();
}

// The benchmarks' exp-throughput bound: pass 1's exps alone, per row, over the same chunks and threads.
at::Tensor exp_throughput_bound_cpu(const at::Tensor& z_adapted, const at::Tensor& z_base) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  const BlockKernels& k = block_kernels();
  const SplitPlan plan = cpu_plan(x.rows, x.vocab);
  std::vector<float> partial(x.rows * plan.splits, 0.0f);
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_block(k, x.pointers<T>(), x.rows, x.vocab, plan, false,
                   [&](int64_t task, int64_t, int64_t, const Block<T>& blk) {
                     partial[task] += k.exp_sum(blk.a(), blk.b(), blk.n);
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
  m.impl("steered_nll", &steered_nll_cpu);
  m.impl("exp_throughput_bound", &exp_throughput_bound_cpu);
}

}  // namespace svd_fast
