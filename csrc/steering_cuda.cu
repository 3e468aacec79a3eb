// CUDA kernels. Each row's vocabulary is cut into chunks; a grid of (chunks, rows) blocks first writes
// one RowStats per chunk (row_stats_kernel), then every block of the output pass merges its row's
// partial stats and writes its chunk (output_kernel). With few rows (decode, B = 1..8) many blocks
// share a row, so the whole GPU streams the vocabulary, as split-softmax sampling kernels do.
// No host synchronisation; everything runs on the current stream (CUDA-graph capturable).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "steering_host.h"
#include "steering_math.h"

namespace svd_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinChunk = 4096;  // elements per block at least, so each thread has work

template <typename T>
struct Pack {
  static constexpr int kSize = 16 / sizeof(T);  // one 16-byte load
  struct alignas(16) Raw {
    T v[kSize];
  };
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&v)[N]) {
  const typename Pack<T>::Raw raw = *reinterpret_cast<const typename Pack<T>::Raw*>(p);
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = static_cast<float>(raw.v[j]);
}

template <int N>
__device__ __forceinline__ void store_floats(float* p, const float (&v)[N]) {
#pragma unroll
  for (int j = 0; j < N; j += 4)
    *reinterpret_cast<float4*>(p + j) = make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]);
}

__device__ __forceinline__ RowStats shfl_xor(const RowStats& s, int mask) {
  return RowStats{__shfl_xor_sync(0xffffffffu, s.max_a, mask), __shfl_xor_sync(0xffffffffu, s.sum_a, mask),
                  __shfl_xor_sync(0xffffffffu, s.max_b, mask), __shfl_xor_sync(0xffffffffu, s.sum_b, mask),
                  __shfl_xor_sync(0xffffffffu, s.cross, mask), __shfl_xor_sync(0xffffffffu, s.flags, mask)};
}

__device__ __forceinline__ float2 shfl_xor(const float2& s, int mask) {
  return make_float2(__shfl_xor_sync(0xffffffffu, s.x, mask), __shfl_xor_sync(0xffffffffu, s.y, mask));
}

__device__ __forceinline__ NllStats shfl_xor(const NllStats& s, int mask) {
  return NllStats{__shfl_xor_sync(0xffffffffu, s.max, mask), __shfl_xor_sync(0xffffffffu, s.sum, mask),
                  __shfl_xor_sync(0xffffffffu, s.s1, mask), __shfl_xor_sync(0xffffffffu, s.s2, mask)};
}

__device__ __forceinline__ RowStats combine(const RowStats& x, const RowStats& y) { return merge(x, y); }
__device__ __forceinline__ NllStats combine(const NllStats& x, const NllStats& y) { return merge(x, y); }
__device__ __forceinline__ float2 combine(const float2& x, const float2& y) {
  return make_float2(x.x + y.x, x.y + y.y);
}

// Reduction over the block; every thread gets the result.
template <typename V>
__device__ V block_all_reduce(V v) {
  __shared__ V per_warp[kWarps];
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = combine(v, shfl_xor(v, mask));
  if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = v;
  __syncthreads();
  v = per_warp[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = combine(v, per_warp[w]);
  __syncthreads();  // per_warp may be reused by a later call
  return v;
}

// Adds N consecutive elements to a thread's running stats.
template <int N>
__device__ __forceinline__ void accumulate(RowStats& s, const float (&a)[N], const float (&b)[N]) {
  float ma = s.max_a, mb = s.max_b;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    ma = max_ignoring_nan(ma, a[j]);
    mb = max_ignoring_nan(mb, b[j]);
    s.flags |= element_flags(a[j], b[j]);
  }
  if (ma != s.max_a || mb != s.max_b) s = rescale(s, ma, mb);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const ElementTerms t = element_terms(a[j], b[j], ma, mb);
    s.sum_a += t.exp_a;
    s.sum_b += t.exp_b;
    s.cross += t.cross;
  }
}

// Calls fn(index, a[N], b[N]) over this block's chunk of the row, N-wide when `vectorized`
// (16-byte aligned rows, chunk a multiple of N), one at a time otherwise.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_in_chunk(const RowPointers<T>& p, int64_t vocab, int64_t chunk,
                                                  bool vectorized, Fn&& fn) {
  const int64_t row = blockIdx.x;
  const int64_t lo = blockIdx.y * chunk, hi = min(vocab, lo + chunk);
  const T* a = p.a(row);
  const T* b = p.b(row);
  constexpr int N = Pack<T>::kSize;
  if (vectorized) {
    for (int64_t i = lo + threadIdx.x * N; i < hi; i += kThreads * N) {
      float va[N], vb[N];
      load_floats(a + i, va);
      load_floats(b + i, vb);
      fn(i, va, vb);
    }
  } else {
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      float va[1] = {static_cast<float>(a[i])}, vb[1] = {static_cast<float>(b[i])};
      fn(i, va, vb);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(RowPointers<T> p, int64_t vocab, int64_t chunk, bool vectorized,
                     RowStats* partial) {
  RowStats s = empty_stats();
  for_each_in_chunk(p, vocab, chunk, vectorized,
                    [&](int64_t, const auto& a, const auto& b) { accumulate(s, a, b); });
  s = block_all_reduce(s);
  if (threadIdx.x == 0) partial[blockIdx.x * gridDim.y + blockIdx.y] = s;
}

__device__ __forceinline__ RowSummary row_summary(const RowStats* partial, int64_t splits, float log_alpha) {
  RowStats s = empty_stats();
  for (int64_t k = threadIdx.x; k < splits; k += kThreads) s = merge(s, partial[blockIdx.x * splits + k]);
  return finalize(block_all_reduce(s), log_alpha);
}

enum class Output { kDelta, kSteered, kKeptSums };

struct OutputArgs {
  const RowStats* partial;
  float log_alpha;
  float* out;            // [rows, vocab] for kDelta / kSteered
  const float* mu_rows;  // optional, kSteered
  float mu, fill_value;
  int64_t fill_mode;
  float2* kept_sums;     // [rows, splits] (sum_K p_a delta, sum_K delta^2), kKeptSums
};

template <typename T, Output kind>
__global__ void __launch_bounds__(kThreads)
    output_kernel(RowPointers<T> p, int64_t vocab, int64_t chunk, bool vectorized, OutputArgs args) {
  const RowSummary r = row_summary(args.partial, gridDim.y, args.log_alpha);
  const int64_t row = blockIdx.x;
  float* out = kind == Output::kKeptSums ? nullptr : args.out + row * vocab;
  const float mu = args.mu_rows ? args.mu_rows[row] : args.mu;
  const FillRule fill = fill_rule(args.fill_mode, mu, args.fill_value);
  float2 sums = make_float2(0.0f, 0.0f);
  for_each_in_chunk(p, vocab, chunk, vectorized, [&](int64_t i, const auto& a, const auto& b) {
    constexpr int N = sizeof(a) / sizeof(float);
    [[maybe_unused]] float o[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float p_a;
      const float d = steering_delta(a[j], b[j], r, p_a);
      const bool kept = is_kept(a[j], r);
      if constexpr (kind == Output::kDelta) o[j] = r.bad ? kNaN : d;
      if constexpr (kind == Output::kSteered)
        o[j] = r.bad ? kNaN : steered_logit(a[j], d, kept, mu, fill);
      if constexpr (kind == Output::kKeptSums) {
        sums.x += kept ? p_a * d : 0.0f;
        sums.y += kept ? d * d : 0.0f;
      }
    }
    if constexpr (kind != Output::kKeptSums) {
      if constexpr (N > 1) {
        store_floats(out + i, o);
      } else {
        out[i] = o[0];
      }
    }
  });
  if constexpr (kind == Output::kKeptSums) {
    sums = block_all_reduce(sums);
    if (threadIdx.x == 0) args.kept_sums[row * gridDim.y + blockIdx.y] = sums;
  }
}

template <typename T>
__global__ void token_mu_kernel(RowPointers<T> p, const int64_t* labels, int64_t rows, int64_t vocab,
                                int64_t splits, const RowStats* partial, const float2* kept_sums,
                                float log_alpha, float eps, int64_t ignore_index, TokenMuOutputs out) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  RowStats s = empty_stats();
  float2 sums = make_float2(0.0f, 0.0f);
  for (int64_t k = 0; k < splits; ++k) {
    s = merge(s, partial[row * splits + k]);
    sums = combine(sums, kept_sums[row * splits + k]);
  }
  write_token_mu(out, p, row, labels[row], ignore_index, vocab, finalize(s, log_alpha), sums.x, sums.y, eps);
}

constexpr int kStrengthGroup = 8;  // strengths per block (grid z): each thread holds their sums in registers

struct NllArgs {
  const RowStats* partial;
  const int64_t* labels;
  const float* mus;
  int64_t strengths, ignore_index;
  float log_alpha;
  NllFill fill;
  NllStats* nll_partial;  // [rows, splits, strengths]
};

// Grid (rows, splits, strength groups): each block's NllStats over its chunk, one per strength of its group.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    nll_kernel(RowPointers<T> p, int64_t vocab, int64_t chunk, bool vectorized, NllArgs args) {
  const RowSummary r = row_summary(args.partial, gridDim.y, args.log_alpha);
  const int64_t row = blockIdx.x;
  const NllLabel l = nll_label(p, row, args.labels[row], args.ignore_index, vocab, r, args.fill);
  const int64_t first = static_cast<int64_t>(blockIdx.z) * kStrengthGroup;
  float mu[kStrengthGroup];
  NllStats acc[kStrengthGroup];
#pragma unroll
  for (int g = 0; g < kStrengthGroup; ++g) {
    mu[g] = first + g < args.strengths ? args.mus[first + g] : 0.0f;
    acc[g] = empty_nll_stats();
  }
  // Masked tokens all lie on z_a + mu * fill.slope: one online sum of exp(z_a) serves every strength; only the
  // kept tokens (few) are added per strength.
  NllStats masked = empty_nll_stats();
  if (!r.bad && l.x0 > -kInf) {  // uniform over the block; otherwise the outputs need no sums
    for_each_in_chunk(p, vocab, chunk, vectorized, [&](int64_t, const auto& a, const auto& b) {
      constexpr int N = sizeof(a) / sizeof(float);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (!is_kept(a[j], r)) {
          if (!args.fill.neg_inf) add_token(masked, a[j], 0.0f);
          continue;
        }
        float p_a;
        const float d = steering_delta(a[j], b[j], r, p_a);
#pragma unroll
        for (int g = 0; g < kStrengthGroup; ++g) add_token(acc[g], a[j] + mu[g] * d, d - l.slope);
      }
    });
  }
  const float t_masked = args.fill.slope - l.slope;
#pragma unroll
  for (int g = 0; g < kStrengthGroup; ++g) {
    if (masked.sum > 0.0f)
      acc[g] = merge(acc[g], NllStats{masked.max + mu[g] * args.fill.slope, masked.sum, t_masked * masked.sum,
                                      t_masked * t_masked * masked.sum});
    const NllStats s = block_all_reduce(acc[g]);
    if (threadIdx.x == 0 && first + g < args.strengths)
      args.nll_partial[(row * gridDim.y + blockIdx.y) * args.strengths + first + g] = s;
  }
}

// One thread per (row, strength): merges the chunks' stats and writes the three outputs.
template <typename T>
__global__ void nll_output_kernel(RowPointers<T> p, int64_t rows, int64_t vocab, int64_t splits, NllArgs args,
                                  NllOutputs out) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= rows * args.strengths) return;
  const int64_t row = index / args.strengths, j = index % args.strengths;
  RowStats stats = empty_stats();
  NllStats s = empty_nll_stats();
  for (int64_t split = 0; split < splits; ++split) {
    stats = merge(stats, args.partial[row * splits + split]);
    s = merge(s, args.nll_partial[(row * splits + split) * args.strengths + j]);
  }
  const RowSummary r = finalize(stats, args.log_alpha);
  write_nll(out, index, nll_label(p, row, args.labels[row], args.ignore_index, vocab, r, args.fill), r.bad,
            args.mus[j], s);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t multiprocessor_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

struct Launched {
  SplitPlan plan;
  bool vectorized;
  dim3 grid;                      // (rows, splits)
  at::Tensor partial, kept_sums;  // RowStats [rows, splits]; float2 [rows, splits] for kKeptSums
  const RowStats* stats() const { return reinterpret_cast<const RowStats*>(partial.const_data_ptr<float>()); }
};

// Pass 1 (row_stats_kernel) on the current stream: the plan and the partial RowStats of every chunk.
template <typename T>
Launched launch_row_stats(const LogitRows& x, const float* out) {
  constexpr int N = Pack<T>::kSize;
  const RowPointers<T> p = x.pointers<T>();
  Launched result;
  // every row of both inputs (and of the output) must start 16-byte aligned
  const auto aligned_rows = [](const RowLayout& l) { return l.outer_stride % N == 0 && l.inner_stride % N == 0; };
  result.vectorized = x.vocab % N == 0 && aligned16(p.za) && aligned16(p.zb) && aligned_rows(x.la) &&
                      aligned_rows(x.lb) && (out == nullptr || aligned16(out));
  const int64_t sms = multiprocessor_count(x.z_a.device().index());
  result.plan = plan_splits(x.rows, x.vocab, 2 * sms, kMinChunk, result.vectorized ? N : 1);
  TORCH_CHECK(result.plan.splits <= 65535, "svd_fast: vocabulary too large for one CUDA grid");
  result.grid = dim3(static_cast<unsigned>(x.rows), static_cast<unsigned>(result.plan.splits));
  result.partial = at::empty({x.rows, result.plan.splits, static_cast<int64_t>(sizeof(RowStats) / 4)},
                             x.z_a.options().dtype(at::kFloat));
  row_stats_kernel<T><<<result.grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p, x.vocab, result.plan.chunk, result.vectorized, reinterpret_cast<RowStats*>(result.partial.data_ptr<float>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

// Pass 1 and the output pass of `kind`, on the current stream.
template <Output kind>
Launched launch(const LogitRows& x, OutputArgs args) {
  Launched result;
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    result = launch_row_stats<T>(x, args.out);
    args.partial = result.stats();
    if constexpr (kind == Output::kKeptSums) {
      result.kept_sums = at::empty({x.rows, result.plan.splits, 2}, x.z_a.options().dtype(at::kFloat));
      args.kept_sums = reinterpret_cast<float2*>(result.kept_sums.data_ptr<float>());
    }
    output_kernel<T, kind><<<result.grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.pointers<T>(), x.vocab, result.plan.chunk, result.vectorized, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

at::Tensor steering_vector_cuda(const at::Tensor& z_adapted, const at::Tensor& z_base) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  at::Tensor out = at::empty(z_adapted.sizes(), z_adapted.options().dtype(at::kFloat));
  if (x.rows == 0) return out;
  const c10::cuda::CUDAGuard guard(x.z_a.device());
  OutputArgs args{};
  args.out = out.data_ptr<float>();
  launch<Output::kDelta>(x, args);
  return out;
}

void steer_logits_out_cuda(const at::Tensor& z_adapted, const at::Tensor& z_base,
                           const c10::optional<at::Tensor>& mu_rows, double mu, double log_alpha,
                           int64_t fill_mode, double fill_value, at::Tensor& out) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  check_steer_args(x, mu_rows, out);
  if (x.rows == 0) return;
  const c10::cuda::CUDAGuard guard(x.z_a.device());
  OutputArgs args{};
  args.out = out.data_ptr<float>();
  args.mu_rows = mu_rows.has_value() ? mu_rows->const_data_ptr<float>() : nullptr;
  args.mu = static_cast<float>(mu);
  args.log_alpha = static_cast<float>(log_alpha);
  args.fill_mode = fill_mode;
  args.fill_value = static_cast<float>(fill_value);
  launch<Output::kSteered>(x, args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_mu_cuda(const at::Tensor& z_adapted,
                                                                         const at::Tensor& z_base,
                                                                         const at::Tensor& labels, double log_alpha,
                                                                         double eps, int64_t ignore_index) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  check_labels(x, labels);
  TokenMuTensors result(z_adapted);
  if (x.rows == 0) return result.tuple();
  const at::Tensor labels_c = labels.contiguous();
  const c10::cuda::CUDAGuard guard(x.z_a.device());
  OutputArgs args{};
  args.log_alpha = static_cast<float>(log_alpha);
  const Launched pass = launch<Output::kKeptSums>(x, args);
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int threads = 128;
    token_mu_kernel<T><<<static_cast<unsigned>(ceil_div(x.rows, threads)), threads, 0,
                         c10::cuda::getCurrentCUDAStream()>>>(
        x.pointers<T>(), labels_c.const_data_ptr<int64_t>(), x.rows,
        x.vocab, pass.plan.splits, pass.stats(),
        reinterpret_cast<const float2*>(pass.kept_sums.const_data_ptr<float>()), static_cast<float>(log_alpha),
        static_cast<float>(eps), ignore_index, result.pointers());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> steered_nll_cuda(const at::Tensor& z_adapted, const at::Tensor& z_base,
                                                                const at::Tensor& labels, const at::Tensor& mus,
                                                                double log_alpha, int64_t fill_mode, double fill_value,
                                                                int64_t ignore_index) {
  const LogitRows x = flatten_logits(z_adapted, z_base);
  check_labels(x, labels);
  check_strengths(x, mus);
  NllTensors result(z_adapted, mus.numel());
  if (x.rows == 0 || mus.numel() == 0) return result.tuple();
  const at::Tensor labels_c = labels.contiguous();
  const c10::cuda::CUDAGuard guard(x.z_a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NllArgs args{};
  args.labels = labels_c.const_data_ptr<int64_t>();
  args.mus = mus.const_data_ptr<float>();
  args.strengths = mus.numel();
  args.ignore_index = ignore_index;
  args.log_alpha = static_cast<float>(log_alpha);
  args.fill = nll_fill(fill_mode, static_cast<float>(fill_value));
  const int64_t groups = ceil_div(args.strengths, kStrengthGroup);
  TORCH_CHECK(groups <= 65535, "svd_fast: too many strengths for one CUDA grid");
  dispatch_logit_dtype(x.z_a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const RowPointers<T> p = x.pointers<T>();
    const Launched pass = launch_row_stats<T>(x, nullptr);
    args.partial = pass.stats();
    const at::Tensor nll_partial = at::empty({x.rows, pass.plan.splits, args.strengths, 4}, x.z_a.options().dtype(at::kFloat));
    args.nll_partial = reinterpret_cast<NllStats*>(nll_partial.data_ptr<float>());
    const dim3 grid(pass.grid.x, pass.grid.y, static_cast<unsigned>(groups));
    nll_kernel<T><<<grid, kThreads, 0, stream>>>(p, x.vocab, pass.plan.chunk, pass.vectorized, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = 128;
    nll_output_kernel<T><<<static_cast<unsigned>(ceil_div(x.rows * args.strengths, threads)), threads, 0, stream>>>(
        p, x.rows, x.vocab, pass.plan.splits, args, result.pointers());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result.tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(svd_fast, CUDA, m) {
  m.impl("steering_vector", &steering_vector_cuda);
  m.impl("steer_logits_out", &steer_logits_out_cuda);
  m.impl("token_mu", &token_mu_cuda);
  m.impl("steered_nll", &steered_nll_cuda);
}

}  // namespace svd_fast
