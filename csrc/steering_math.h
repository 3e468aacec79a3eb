// Per-element and per-row math of Steering Vector Decoding (SPEC sections 1-4, 8), shared by the CPU
// and CUDA kernels. Everything here is float32; callers convert bf16/fp16 inputs on load.
//
// A row is summarised in one pass by RowStats (online max / sum-exp of both logit rows plus the KL
// numerator); RowStats of disjoint pieces of a row merge associatively, which is what lets a row be
// split across threads, blocks or CPU tasks. finalize() turns the merged stats into a RowSummary, and
// the second pass produces outputs element by element from it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define SVD_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: GCC will not otherwise inline these into the target_clones kernels, leaving calls per element.
#define SVD_HD inline __attribute__((always_inline))
#else
#define SVD_HD inline
#endif

namespace svd_fast {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Where row r of a [..., V] logits tensor starts, in elements, the rows numbered over its leading dims in
// order: leading dims that collapse into two strides (an outer and an inner one) are read in place, so
// that logits[:, -1] of [B, T, V] or calibration's z[:, :-1] need no copy.
struct RowLayout {
  int64_t inner, outer_stride, inner_stride;  // rows per outer step; the two strides in elements
  SVD_HD int64_t offset(int64_t row) const { return (row / inner) * outer_stride + (row % inner) * inner_stride; }
};

// Both inputs' rows: pointers and layouts (the two may differ).
template <typename T>
struct RowPointers {
  const T *za, *zb;
  RowLayout la, lb;
  SVD_HD const T* a(int64_t row) const { return za + la.offset(row); }
  SVD_HD const T* b(int64_t row) const { return zb + lb.offset(row); }
};

// How masked (not kept) tokens are written by steer_logits.
enum FillMode : int64_t {
  kFillNegInf = 0,  // -inf, whatever the sign of mu (svd_fast default)
  kFillKeep = 1,    // z_a unchanged (the paper's lambda = 0)
  kFillValue = 2,   // z_a + mu * fill_value (the paper's literal formula)
};

enum RowFlags : uint32_t {
  kBadValue = 1u,    // NaN or +inf in either row: the row's outputs are NaN
  kBaseRulesOut = 2u // z_b = -inf where z_a is finite: KL is infinite, the row is left unsteered
};

// exp(x) for the kernels' arguments: x - max <= 0, or on the CPU up to kMaxLead (pass 1 measures a block
// from the maxima of the blocks before it). On the CPU a branch-free polynomial that GCC vectorizes
// (Cephes expf, ~2 ulp) with x clamped to [-87.3, 88] (x < -87.3 and -inf give 0, NaN gives NaN; above 88
// the result is wrong but finite, and pass 1 measures such a block again); on CUDA the hardware
// approximation.
SVD_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const float xc = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  // Round to nearest integer with the 1.5 * 2^23 trick: vectorizes without SSE4.1.
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = y * scale;
  return x != x ? x : (x < -87.3f ? 0.0f : e);
#endif
}

SVD_HD uint32_t element_flags(float a, float b) {
  const uint32_t bad = (a < kInf && b < kInf) ? 0u : kBadValue;  // false for NaN and +inf
  const uint32_t rules_out = (a > -kInf && b == -kInf) ? kBaseRulesOut : 0u;
  return bad | rules_out;
}

// Online statistics of (part of) one row, relative to the running maxima max_a, max_b:
//   sum_a = sum exp(z_a - max_a),  sum_b = sum exp(z_b - max_b)
//   cross = sum exp(z_a - max_a) * ((z_a - max_a) - (z_b - max_b))
// Keeping cross relative to the maxima (rather than sum p_a * (z_a - z_b)) avoids cancelling two large
// numbers when both rows are big and shifted. When flags has kBadValue the sums are meaningless.
struct RowStats {
  float max_a, sum_a, max_b, sum_b, cross;
  uint32_t flags;
};

SVD_HD RowStats empty_stats() { return RowStats{-kInf, 0.0f, -kInf, 0.0f, 0.0f, 0u}; }

SVD_HD float max_ignoring_nan(float m, float x) { return x > m ? x : m; }

// Re-expresses s relative to new maxima new_a >= s.max_a, new_b >= s.max_b.
SVD_HD RowStats rescale(const RowStats& s, float new_a, float new_b) {
  RowStats r = s;
  r.max_a = new_a;
  r.max_b = new_b;
  if (s.sum_a > 0.0f) {
    const float shift_a = s.max_a - new_a, shift_b = s.max_b - new_b;
    const float fa = fast_exp(shift_a);
    r.sum_a = s.sum_a * fa;
    r.cross = fa * (s.cross + s.sum_a * (shift_a - shift_b));
  }
  if (s.sum_b > 0.0f) r.sum_b = s.sum_b * fast_exp(s.max_b - new_b);
  return r;
}

SVD_HD RowStats merge(const RowStats& x, const RowStats& y) {
  const float ma = max_ignoring_nan(x.max_a, y.max_a), mb = max_ignoring_nan(x.max_b, y.max_b);
  const RowStats xs = rescale(x, ma, mb), ys = rescale(y, ma, mb);
  return RowStats{ma, xs.sum_a + ys.sum_a, mb, xs.sum_b + ys.sum_b, xs.cross + ys.cross,
                  x.flags | y.flags};
}

// One element's contributions to sum_a, sum_b and cross, given maxima that bound it.
struct ElementTerms {
  float exp_a, exp_b, cross;
};

SVD_HD ElementTerms element_terms(float a, float b, float max_a, float max_b) {
  // Where every value so far is -inf the maximum is -inf and z - max would be NaN: measured from 0 instead
  // (a loop-invariant select), -inf goes to exp(-inf) = 0 either way.
  const float da = a - (max_a == -kInf ? 0.0f : max_a), db = b - (max_b == -kInf ? 0.0f : max_b);
  const float ea = fast_exp(da), eb = fast_exp(db);
  // NaN as 0 * inf where the token adds nothing: z_a = -inf, or exp_a underflowed to 0 beside z_b = -inf.
  // Where z_b = -inf and z_a is finite, c is +inf: that row is flagged kBaseRulesOut and left unsteered.
  const float c = ea * (da - db);
  return ElementTerms{ea, eb, c == c ? c : 0.0f};
}

// What the output pass needs to know about a row. Log-probabilities are formed relative to the maxima,
// log p_a(y) = (z_a(y) - max_a) - log sum_a, so large logits never meet a large log-sum-exp.
struct RowSummary {
  float max_a, max_b, log_sum_a;
  float log_sums_ratio;  // log sum_a - log sum_b
  float kl, keep_threshold;
  bool bad;        // NaN / +inf in the row, or z_a entirely -inf: outputs are NaN
  bool steerable;  // false when KL(p_a || p_b) is infinite: delta = 0 for the row
};

SVD_HD RowSummary finalize(const RowStats& s, float log_alpha) {
  RowSummary r;
  r.bad = (s.flags & kBadValue) != 0u || !(s.sum_a > 0.0f);
  r.steerable = (s.flags & kBaseRulesOut) == 0u;
  r.max_a = s.max_a;
  r.max_b = s.max_b;
  r.log_sum_a = logf(s.sum_a);
  r.log_sums_ratio = r.log_sum_a - logf(s.sum_b);
  r.kl = s.cross / s.sum_a - r.log_sums_ratio;
  r.keep_threshold = s.max_a + log_alpha;  // p_a(y) >= alpha * p_a(top)  <=>  z_a(y) >= z_a(top) + log(alpha)
  return r;
}

// delta(y) = p_a(y) * (kl - (log p_a(y) - log p_b(y)))   (SPEC 1); also returns p_a(y).
SVD_HD float steering_delta(float a, float b, const RowSummary& r, float& p_a) {
  const float da = a - r.max_a, db = b - r.max_b;
  p_a = fast_exp(da - r.log_sum_a);
  const float log_ratio = (da - db) - r.log_sums_ratio;  // grouped as in kl: a lone token gets exactly 0
  const float d = p_a * (r.kl - log_ratio);
  return (r.steerable && a > -kInf) ? d : 0.0f;
}

SVD_HD bool is_kept(float a, const RowSummary& r) { return a >= r.keep_threshold; }

// delta_K at one token: delta there if it is kept, else 0 (the label's term in mu*).
SVD_HD float kept_delta(float a, float b, const RowSummary& r) {
  float p_a;
  const float d = steering_delta(a, b, r, p_a);
  return is_kept(a, r) ? d : 0.0f;
}

// How a masked token is written, for one row: -inf, or z_a + add (add = 0 for "keep", mu * lambda for a
// finite lambda). Decided once per row so the element loop has no branch on the mode.
struct FillRule {
  bool neg_inf;
  float add;
};

SVD_HD FillRule fill_rule(int64_t fill_mode, float mu, float fill_value) {
  return FillRule{fill_mode == kFillNegInf, fill_mode == kFillValue ? mu * fill_value : 0.0f};
}

// z_hat(y) (SPEC 3).
SVD_HD float steered_logit(float a, float delta, bool kept, float mu, FillRule fill) {
  return kept ? a + mu * delta : (fill.neg_inf ? -kInf : a + fill.add);
}

// Whether a row's label is a target: not ignore_index and a token id of the vocabulary.
SVD_HD bool is_target(int64_t label, int64_t ignore_index, int64_t vocab) {
  return label != ignore_index && label >= 0 && label < vocab;
}

// A label that is neither ignore_index nor a token id. The Python wrapper rejects it on the CPU; on a GPU
// checking would need a host sync, so the kernels give its row NaN outputs instead.
SVD_HD bool label_out_of_range(int64_t label, int64_t ignore_index, int64_t vocab) {
  return label != ignore_index && (label < 0 || label >= vocab);
}

// Where token_mu writes, one entry per row.
struct TokenMuOutputs {
  float* mu_star;
  bool* valid;
  float* numerator;  // <onehot(label) - p_a, delta_K>
  float* norm_sq;    // ||delta_K||^2
};

// mu* = <onehot(label) - p_a, delta_K> / (||delta_K||^2 + eps)   (SPEC 4) of row `row` with label id y,
// from its summary and its kept-set sums pa_dot_delta_k = sum_K p_a delta, delta_k_sq = sum_K delta^2
// (the label's delta_K is read here). Ignored labels give (0, false, 0, 0); ||delta_K||^2 < eps gives
// mu* = 0, valid = false with the terms kept; bad rows (NaN rows) and out-of-range ids give NaN and false.
template <typename T>
SVD_HD void write_token_mu(const TokenMuOutputs& out, const RowPointers<T>& p, int64_t row, int64_t y,
                           int64_t ignore_index, int64_t vocab, const RowSummary& r, float pa_dot_delta_k,
                           float delta_k_sq, float eps) {
  const bool out_of_range = label_out_of_range(y, ignore_index, vocab);
  const bool in_vocab = is_target(y, ignore_index, vocab);
  const float label_delta_k =
      in_vocab ? kept_delta(static_cast<float>(p.a(row)[y]), static_cast<float>(p.b(row)[y]), r) : 0.0f;
  const bool target = in_vocab || out_of_range, bad = r.bad || out_of_range;
  const bool valid = target && !bad && delta_k_sq >= eps;
  const float numerator = label_delta_k - pa_dot_delta_k;
  out.valid[row] = valid;
  out.mu_star[row] = valid ? numerator / (delta_k_sq + eps) : ((target && bad) ? kNaN : 0.0f);
  out.numerator[row] = target ? (bad ? kNaN : numerator) : 0.0f;
  out.norm_sq[row] = target ? (bad ? kNaN : delta_k_sq) : 0.0f;
}

// ---------------------------------------------------------------------------------------------------
// steered_nll: the NLL of a label under z_hat(mu) and its first two derivatives in mu, for K strengths.
// z_hat(mu) = x0 + mu * slope is affine in mu at every token: kept tokens x0 = z_a, slope = delta; masked
// tokens x0 = z_a, slope = 0 ("keep") or lambda (finite fill), or x0 = -inf (fill -inf: out of the
// softmax). So loss = logsumexp z_hat - z_hat[label] is convex in mu, with
//   d_loss = E_{p_hat}[slope] - slope[label],   d2_loss = Var_{p_hat}[slope].
// The moments are accumulated about c = slope[label] (t = slope - c), which gives d_loss without a
// subtraction and keeps the variance's cancellation small when the label carries most of p_hat.

struct NllFill {
  bool neg_inf;  // masked tokens leave the softmax
  float slope;   // masked tokens' slope: lambda for a finite fill, 0 for "keep"
};

SVD_HD NllFill nll_fill(int64_t fill_mode, float fill_value) {
  return NllFill{fill_mode == kFillNegInf, fill_mode == kFillValue ? fill_value : 0.0f};
}

// z_hat(mu) = x0 + mu * slope at one token, from its delta and whether it is kept.
SVD_HD void nll_line(float a, float delta, bool kept, NllFill fill, float& x0, float& slope) {
  x0 = (kept || !fill.neg_inf) ? a : -kInf;
  slope = kept ? delta : fill.slope;
}

// sum = sum exp(x - max), s1 = sum exp(x - max) t, s2 = sum exp(x - max) t^2 over (part of) a row, for
// one strength (x = z_hat(mu), t = slope - slope[label]).
struct NllStats {
  float max, sum, s1, s2;
};

SVD_HD NllStats empty_nll_stats() { return NllStats{-kInf, 0.0f, 0.0f, 0.0f}; }

SVD_HD NllStats rescale(const NllStats& s, float new_max) {
  if (!(s.sum > 0.0f)) return NllStats{new_max, s.sum, s.s1, s.s2};
  const float f = fast_exp(s.max - new_max);
  return NllStats{new_max, s.sum * f, s.s1 * f, s.s2 * f};
}

SVD_HD NllStats merge(const NllStats& x, const NllStats& y) {
  const float m = max_ignoring_nan(x.max, y.max);
  const NllStats xs = rescale(x, m), ys = rescale(y, m);
  return NllStats{m, xs.sum + ys.sum, xs.s1 + ys.s1, xs.s2 + ys.s2};
}

// Adds one token (x, t) online (the CUDA threads' accumulation; the CPU works a block at a time).
SVD_HD void add_token(NllStats& s, float x, float t) {
  if (!(x > -kInf)) return;  // out of the softmax (and NaN, which only bad rows hold)
  if (x > s.max) s = rescale(s, x);
  const float e = fast_exp(x - s.max);
  s.sum += e;
  s.s1 += e * t;
  s.s2 += e * t * t;
}

// Where steered_nll writes: [rows, K] each.
struct NllOutputs {
  float* loss;
  float* d_loss;
  float* d2_loss;
};

// What a row's label contributes: its line (x0, slope), whether it is a target at all, and whether it is
// out of range (outputs NaN).
struct NllLabel {
  bool target, out_of_range;
  float x0, slope;
};

// The label's line of row `row` (label id y), the same in every block of the row.
template <typename T>
SVD_HD NllLabel nll_label(const RowPointers<T>& p, int64_t row, int64_t y, int64_t ignore_index, int64_t vocab,
                          const RowSummary& r, NllFill fill) {
  const bool target = is_target(y, ignore_index, vocab), out_of_range = label_out_of_range(y, ignore_index, vocab);
  NllLabel l{target || out_of_range, out_of_range, -kInf, 0.0f};
  if (!target || r.bad) return l;
  const float a = static_cast<float>(p.a(row)[y]), b = static_cast<float>(p.b(row)[y]);
  float p_a;
  const float d = steering_delta(a, b, r, p_a);
  nll_line(a, d, is_kept(a, r), fill, l.x0, l.slope);
  return l;
}

// Ignored rows give (0, 0, 0); bad (NaN) rows NaN; a label z_hat rules out (x0 = -inf) gives (+inf, 0, 0).
SVD_HD void write_nll(const NllOutputs& out, int64_t index, const NllLabel& label, bool bad, float mu,
                      const NllStats& s) {
  float loss = 0.0f, d_loss = 0.0f, d2_loss = 0.0f;
  if (label.target && (bad || label.out_of_range)) {
    loss = d_loss = d2_loss = kNaN;
  } else if (label.target && !(label.x0 > -kInf)) {
    loss = kInf;
  } else if (label.target) {
    // >= 0 exactly (the label is one of the summed terms); rounding may take it a few ulp below
    const float nll = (s.max - (label.x0 + mu * label.slope)) + logf(s.sum);
    loss = nll > 0.0f ? nll : 0.0f;
    d_loss = s.s1 / s.sum;
    const float var = s.s2 / s.sum - d_loss * d_loss;
    d2_loss = var > 0.0f ? var : 0.0f;
  }
  out.loss[index] = loss;
  out.d_loss[index] = d_loss;
  out.d2_loss[index] = d2_loss;
}

}  // namespace svd_fast
