// Host-side helpers shared by the CPU and CUDA implementations: argument checks for direct callers of
// the ops (the Python wrapper checks first, with friendlier messages), the inputs' rows (read in place when
// their strides allow: RowLayout), and the
// plan that splits each row's vocabulary into chunks when there are too few rows to fill the machine.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "steering_math.h"

namespace svd_fast {

struct LogitRows {
  at::Tensor z_a, z_b;  // as given, or contiguous copies where their leading strides do not collapse to two
  RowLayout la, lb;
  int64_t rows, vocab;
  template <typename T>
  RowPointers<T> pointers() const {
    return {z_a.const_data_ptr<T>(), z_b.const_data_ptr<T>(), la, lb};
  }
};

// t's rows as a RowLayout, when its last dim is contiguous and its leading dims (size-1 ones aside) merge
// into at most two strides; false otherwise (then the caller reads a contiguous copy).
inline bool row_layout(const at::Tensor& t, RowLayout& layout) {
  if (t.size(-1) > 1 && t.stride(-1) != 1) return false;
  int64_t sizes[2], strides[2], groups = 0;  // outermost group first
  for (int64_t d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) == 1) continue;
    if (groups > 0 && strides[groups - 1] == t.stride(d) * t.size(d)) {
      sizes[groups - 1] *= t.size(d);
      strides[groups - 1] = t.stride(d);
    } else if (groups == 2) {
      return false;
    } else {
      sizes[groups] = t.size(d);
      strides[groups++] = t.stride(d);
    }
  }
  if (groups == 0) layout = RowLayout{1, 0, 0};
  if (groups == 1) layout = RowLayout{sizes[0], 0, strides[0]};
  if (groups == 2) layout = RowLayout{sizes[1], strides[0], strides[1]};
  return true;
}

inline at::Tensor rows_in_place(const at::Tensor& t, RowLayout& layout) {
  if (row_layout(t, layout)) return t;
  at::Tensor copy = t.contiguous();
  row_layout(copy, layout);
  return copy;
}

inline LogitRows flatten_logits(const at::Tensor& z_a, const at::Tensor& z_b) {
  TORCH_CHECK(z_a.sizes() == z_b.sizes(), "svd_fast: z_adapted and z_base must have the same shape, got ",
              z_a.sizes(), " and ", z_b.sizes());
  TORCH_CHECK(z_a.scalar_type() == z_b.scalar_type(),
              "svd_fast: z_adapted and z_base must have the same dtype");
  const auto dtype = z_a.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "svd_fast: logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(z_a.device() == z_b.device(), "svd_fast: z_adapted and z_base are on different devices");
  TORCH_CHECK(z_a.dim() >= 1 && z_a.size(-1) >= 1, "svd_fast: logits need a non-empty last (vocabulary) dim");
  const int64_t vocab = z_a.size(-1);
  LogitRows x;
  x.z_a = rows_in_place(z_a, x.la);
  x.z_b = rows_in_place(z_b, x.lb);
  x.rows = z_a.numel() / vocab;
  x.vocab = vocab;
  return x;
}

inline void check_steer_args(const LogitRows& x, const c10::optional<at::Tensor>& mu_rows,
                             const at::Tensor& out) {
  if (mu_rows.has_value()) {
    TORCH_CHECK(mu_rows->scalar_type() == at::kFloat && mu_rows->is_contiguous() &&
                    mu_rows->numel() == x.rows && mu_rows->device() == x.z_a.device(),
                "svd_fast: mu_rows must be a contiguous float32 tensor with one value per row");
  }
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == x.rows * x.vocab &&
                  out.device() == x.z_a.device(),
              "svd_fast: out must be a contiguous float32 tensor shaped like z_adapted, on its device");
}

inline void check_labels(const LogitRows& x, const at::Tensor& labels) {
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.numel() == x.rows &&
                  labels.device() == x.z_a.device(),
              "svd_fast: labels must be int64 with one label per row of logits, on the logits' device");
}

// Calls fn(T{}) with T the C++ type of a logits dtype.
template <typename Fn>
void dispatch_logit_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "svd_fast: unsupported logits dtype ", dtype);
  }
}

// Outputs of token_mu, shaped like the rows of z_adapted: mu_star (float32), valid (bool), and the
// numerator and ||delta_K||^2 of mu* (float32, for the ratio-of-sums reduction).
struct TokenMuTensors {
  at::Tensor mu_star, valid, numerator, norm_sq;

  explicit TokenMuTensors(const at::Tensor& z_adapted) {
    const auto rows_shape = z_adapted.sizes().slice(0, z_adapted.dim() - 1);
    const auto f32 = z_adapted.options().dtype(at::kFloat);
    mu_star = at::empty(rows_shape, f32);
    valid = at::empty(rows_shape, z_adapted.options().dtype(at::kBool));
    numerator = at::empty(rows_shape, f32);
    norm_sq = at::empty(rows_shape, f32);
  }
  TokenMuOutputs pointers() {
    return {mu_star.data_ptr<float>(), valid.data_ptr<bool>(), numerator.data_ptr<float>(), norm_sq.data_ptr<float>()};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {mu_star, valid, numerator, norm_sq};
  }
};

inline void check_strengths(const LogitRows& x, const at::Tensor& mus) {
  TORCH_CHECK(mus.scalar_type() == at::kFloat && mus.dim() == 1 && mus.is_contiguous() &&
                  mus.device() == x.z_a.device(),
              "svd_fast: mus must be a contiguous 1-D float32 tensor of strengths, on the logits' device");
}

// Outputs of steered_nll: loss, d_loss, d2_loss, each float32 [rows..., K].
struct NllTensors {
  at::Tensor loss, d_loss, d2_loss;

  NllTensors(const at::Tensor& z_adapted, int64_t strengths) {
    std::vector<int64_t> shape(z_adapted.sizes().begin(), z_adapted.sizes().end() - 1);
    shape.push_back(strengths);
    const auto f32 = z_adapted.options().dtype(at::kFloat);
    loss = at::empty(shape, f32);
    d_loss = at::empty(shape, f32);
    d2_loss = at::empty(shape, f32);
  }
  NllOutputs pointers() { return {loss.data_ptr<float>(), d_loss.data_ptr<float>(), d2_loss.data_ptr<float>()}; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> tuple() const { return {loss, d_loss, d2_loss}; }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Each row's vocabulary is cut into `splits` chunks of `chunk` elements (chunk a multiple of `align`).
struct SplitPlan {
  int64_t splits, chunk;
};

inline SplitPlan plan_splits(int64_t rows, int64_t vocab, int64_t wanted_tasks, int64_t min_chunk,
                             int64_t align) {
  int64_t splits = 1;
  if (rows < wanted_tasks) splits = ceil_div(wanted_tasks, std::max<int64_t>(rows, 1));
  splits = std::max<int64_t>(1, std::min(splits, vocab / min_chunk));
  const int64_t chunk = ceil_div(ceil_div(vocab, splits), align) * align;
  return {ceil_div(vocab, chunk), chunk};
}

}  // namespace svd_fast
