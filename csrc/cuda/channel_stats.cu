// CUDA body of channel_stats_update_ (semantics: pyadvk/ops/channel_stats.py).
//
// Partials per (channel, sample group): non-NaN and NaN counts, float64 sums of v - shift and
// (v - shift)^2 (shift: the channel's running mean, or the mean of the batch's first sample for a
// new channel, so a large offset cancels), min, max, and a histogram row (shared-memory atomics
// when the columns fit, else global atomics into the block's own row). Two kernels read along the
// contiguous dimension with no division per value:
//   runs_kernel (contiguous (N, C, *spatial)): block (c, g) walks its samples' runs of S values,
//     each thread advancing its (sample, position) by a precomputed step;
//   rows_kernel (channels innermost: channels_last and (N, C)): block (channel tile, g) of
//     kTileC x kTileR threads, threadIdx.x the channel, so a warp reads 32 neighbouring values.
// The partials are merged in one pass by a few ATen ops (the parallel-variance formula for many
// parts, as pyadvk.ops.channel_stats.merge_partials); the top-k candidates of the batch are chosen
// by one at::topk over int64 composite keys (the value's order-preserving bits, then the inverted
// column: the reference's tie order), the quantile buffer's by one at::topk, and both are merged
// with the state's entries (sorts of 2K and 2M entries). Channels that saw +-inf get the defined
// moments (mean +inf / -inf / NaN, M2 NaN). Everything is queued on the current stream of the
// activations' device; no host synchronization.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "channel_stats.h"

namespace pyadvk {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kValuesPerBlock = 65536;
constexpr int64_t kSharedBins = 2048;
constexpr int kTileC = 32;  // rows_kernel: channels per block (threadIdx.x)
constexpr int kTileR = 8;   // rows_kernel: rows read at once (threadIdx.y)
constexpr int64_t kSharedTileCols = 8192;  // rows_kernel: shared histogram columns (kTileC channels)

// s1, s2 in double: squares of deviations past ~1.8e19 overflow float (m2 = inf where the torch
// body has its float64 value; found in the Triton body by tests/test_fuzz_stat_bodies.py).
struct Partial {
  double s1 = 0.0, s2 = 0.0;
  float mn = INFINITY, mx = -INFINITY;
  int cnt = 0, nan = 0;
};

__device__ __forceinline__ int64_t column_of(float v, float lo, float hi, float inv, int64_t bins) {
  if (v < lo) return 0;
  if (v > hi) return bins + 1;
  const int64_t b = static_cast<int64_t>(floorf(__fmul_rn(__fsub_rn(v, lo), inv)));
  return 1 + (b < bins - 1 ? b : bins - 1);
}

// Folds one value into a thread's partial; returns its histogram column, or -1 for NaN.
__device__ __forceinline__ int64_t fold(Partial& t, float v, float shift, float lo, float hi, float inv,
                                        int64_t bins) {
  if (isnan(v)) {
    ++t.nan;
    return -1;
  }
  const double d = v - shift;  // the float deviation, squared in double
  t.s1 += d;
  t.s2 += d * d;
  ++t.cnt;
  t.mn = v < t.mn ? v : t.mn;
  t.mx = v > t.mx ? v : t.mx;
  return column_of(v, lo, hi, inv, bins);
}

__device__ __forceinline__ void combine(Partial& a, const Partial& b) {
  a.s1 += b.s1;
  a.s2 += b.s2;
  a.mn = b.mn < a.mn ? b.mn : a.mn;
  a.mx = b.mx > a.mx ? b.mx : a.mx;
  a.cnt += b.cnt;
  a.nan += b.nan;
}

struct PartialOut {
  int* cnt;
  int* nan;
  double* s1;
  double* s2;
  float* mn;
  float* mx;
  int* hist;  // tasks x (bins + 2)
  __device__ void store(int64_t task, const Partial& p) const {
    s1[task] = p.s1;
    s2[task] = p.s2;
    mn[task] = p.mn;
    mx[task] = p.mx;
    cnt[task] = p.cnt;
    nan[task] = p.nan;
  }
};

template <typename T>
__global__ void runs_kernel(const T* __restrict__ x, const float* __restrict__ shift_t, int64_t N, int64_t S,
                            int64_t sn, int64_t sc, int64_t G, int64_t samples_per_block, float lo, float hi,
                            float inv, int64_t bins, PartialOut out) {
  const int64_t c = blockIdx.x, g = blockIdx.y;
  const int64_t task = c * G + g;
  const int64_t H = bins + 2;
  __shared__ int shist[kSharedBins + 2];
  const bool shared_hist = H <= kSharedBins + 2;
  if (shared_hist)
    for (int64_t b = threadIdx.x; b < H; b += blockDim.x) shist[b] = 0;
  __syncthreads();
  const float shift = shift_t[c];
  const int64_t n0 = g * samples_per_block;
  const int64_t n1 = n0 + samples_per_block < N ? n0 + samples_per_block : N;
  int* grow = out.hist + task * H;
  const T* base = x + c * sc;
  // Thread t starts at flat index t of the group's (sample, position) range and advances by
  // blockDim: the (sample, position) step is computed once, so no division per value.
  const int64_t dn = blockDim.x / S, dp = blockDim.x - dn * S;
  int64_t n = n0 + threadIdx.x / S, p = threadIdx.x % S;
  Partial t;
  while (n < n1) {
    const int64_t col = fold(t, static_cast<float>(base[n * sn + p]), shift, lo, hi, inv, bins);
    if (col >= 0) {
      if (shared_hist) atomicAdd(&shist[col], 1);
      else atomicAdd(&grow[col], 1);
    }
    n += dn;
    p += dp;
    if (p >= S) {
      p -= S;
      ++n;
    }
  }
  __shared__ Partial red[kThreads];
  red[threadIdx.x] = t;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) combine(red[threadIdx.x], red[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) out.store(task, red[0]);
  if (shared_hist)
    for (int64_t b = threadIdx.x; b < H; b += blockDim.x) grow[b] = shist[b];
}

// Channels innermost: row r (= sample * S + position) holds C contiguous values.
template <typename T>
__global__ void rows_kernel(const T* __restrict__ x, const float* __restrict__ shift_t, int64_t R, int64_t C,
                            int64_t G, int64_t rows_per_block, float lo, float hi, float inv, int64_t bins,
                            PartialOut out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + threadIdx.x;
  const int64_t g = blockIdx.y;
  const int64_t H = bins + 2;
  __shared__ int shist[kSharedTileCols];
  const bool shared_hist = kTileC * H <= kSharedTileCols;
  const int tid = threadIdx.y * kTileC + threadIdx.x;
  if (shared_hist)
    for (int64_t b = tid; b < kTileC * H; b += kTileC * kTileR) shist[b] = 0;
  __syncthreads();
  const bool active = c < C;
  const float shift = active ? shift_t[c] : 0.f;
  const int64_t r0 = g * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < R ? r0 + rows_per_block : R;
  int* grow = out.hist + (c * G + g) * H;
  Partial t;
  if (active) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileR) {
      const int64_t col = fold(t, static_cast<float>(x[r * C + c]), shift, lo, hi, inv, bins);
      if (col >= 0) {
        if (shared_hist) atomicAdd(&shist[threadIdx.x * H + col], 1);
        else atomicAdd(&grow[col], 1);
      }
    }
  }
  __shared__ Partial red[kTileR][kTileC];
  red[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  for (int stride = kTileR / 2; stride > 0; stride /= 2) {
    if (threadIdx.y < stride) combine(red[threadIdx.y][threadIdx.x], red[threadIdx.y + stride][threadIdx.x]);
    __syncthreads();
  }
  if (active && threadIdx.y == 0) out.store(c * G + g, red[0][threadIdx.x]);
  if (shared_hist && active)
    for (int64_t b = threadIdx.y; b < H; b += kTileR) grow[b] = shist[threadIdx.x * H + b];
}

// Per row, the k best valid entries: larger value first, then smaller key; invalid last.
std::tuple<at::Tensor, at::Tensor> merge_topk(const at::Tensor& values, const at::Tensor& keys,
                                              const at::Tensor& valid, int64_t k) {
  const double inf = std::numeric_limits<double>::infinity();
  auto order = std::get<1>(at::sort(keys, /*stable=*/true, 1, /*descending=*/false));
  auto v = values.gather(1, order), kk = keys.gather(1, order), ok = valid.gather(1, order);
  order = std::get<1>(at::sort(at::where(ok, v, -inf), true, 1, true));
  v = v.gather(1, order), kk = kk.gather(1, order), ok = ok.gather(1, order);
  order = std::get<1>(at::sort(ok.to(at::kChar), true, 1, true)).narrow(1, 0, k);
  v = v.gather(1, order), kk = kk.gather(1, order), ok = ok.gather(1, order);
  return {at::where(ok, v, -inf), at::where(ok, kk, -1)};
}

// The k best valid entries of each row of a batch (C, L) in the reference's order (larger value,
// then smaller column), by one topk over int64 composite keys; (values, columns, valid).
std::tuple<at::Tensor, at::Tensor, at::Tensor> preselect_topk(const at::Tensor& v, const at::Tensor& valid,
                                                               int64_t k) {
  const int64_t L = v.size(1);
  auto columns = at::arange(L, v.options().dtype(at::kLong));
  if (L <= k) return {v, columns.unsqueeze(0).expand({v.size(0), L}), valid};
  auto bits = (v + 0.0).view(at::kInt).to(at::kLong);  // + 0.0: -0.0 ranks as 0.0
  auto ordered = at::where(bits >= 0, bits, bits.bitwise_xor(0x7FFFFFFF));
  auto composite = at::where(valid, ordered.bitwise_left_shift(32).bitwise_or(0xFFFFFFFFLL - columns),
                             std::numeric_limits<int64_t>::min());
  auto top = std::get<1>(at::topk(composite, k, 1));
  return {v.gather(1, top), top, valid.gather(1, top)};
}

void update_(at::Tensor& count, at::Tensor& nan_count, at::Tensor& mean, at::Tensor& m2, at::Tensor& minimum,
             at::Tensor& maximum, at::Tensor& hist, at::Tensor& topk_values, at::Tensor& topk_sample,
             at::Tensor& topk_pos, at::Tensor& qbuf, const at::Tensor& x, int64_t sample_offset, double lo,
             double hi) {
  const char* op = "channel_stats_update_";
  check_channel_stats(op, at::kCUDA, count, nan_count, mean, m2, minimum, maximum, hist, topk_values, topk_sample,
                      topk_pos, qbuf, x, sample_offset, lo, hi);
  const int64_t N = x.size(0), C = x.size(1);
  if (N == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t S, sn, sc, ss;
  channel_strides(x, S, sn, sc, ss);
  const int64_t L = N * S, bins = hist.size(1) - 2, K = topk_values.size(1), M = qbuf.size(1);
  const int64_t G = (L + kValuesPerBlock - 1) / kValuesPerBlock;
  const double inf = std::numeric_limits<double>::infinity();
  auto first = x.select(0, 0).to(at::kFloat).reshape({C, -1});
  auto shift = at::where(count > 0, mean.to(at::kFloat), at::nan_to_num(at::nanmean(first, {1}), 0.0)).contiguous();
  auto i32 = x.options().dtype(at::kInt);
  auto f32 = x.options().dtype(at::kFloat);
  auto cnt = at::empty({C * G}, i32), nan = at::empty({C * G}, i32);
  auto f64 = x.options().dtype(at::kDouble);
  auto s1 = at::empty({C * G}, f64), s2 = at::empty({C * G}, f64);
  auto pmin = at::empty({C * G}, f32), pmax = at::empty({C * G}, f32);
  auto phist = at::zeros({C * G, bins + 2}, i32);
  PartialOut out{cnt.data_ptr<int>(),     nan.data_ptr<int>(),     s1.data_ptr<double>(), s2.data_ptr<double>(),
                 pmin.data_ptr<float>(), pmax.data_ptr<float>(), phist.data_ptr<int>()};
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  const float inv = static_cast<float>(static_cast<double>(bins) / (hi - lo));
  const bool rows = sc == 1;  // channels innermost: (N, C) or channels_last
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    if (rows) {
      const dim3 grid(static_cast<unsigned>((C + kTileC - 1) / kTileC), static_cast<unsigned>(G));
      const dim3 block(kTileC, kTileR);
      rows_kernel<T><<<grid, block, 0, stream>>>(xp, shift.data_ptr<float>(), L, C, G, (L + G - 1) / G, flo, fhi,
                                                  inv, bins, out);
    } else {
      const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(G));
      runs_kernel<T><<<grid, kThreads, 0, stream>>>(xp, shift.data_ptr<float>(), N, S, sn, sc, G, (N + G - 1) / G,
                                                    flo, fhi, inv, bins, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // One pass over the partials (pyadvk.ops.channel_stats.merge_partials), in float64.
  auto n = cnt.view({C, G}).to(at::kLong);
  auto nd = n.to(at::kDouble);
  auto safe = nd.clamp_min(1);
  auto d1 = s1.view({C, G}).to(at::kDouble);
  auto part_m2 = (s2.view({C, G}).to(at::kDouble) - d1 * d1 / safe).clamp_min(0);
  auto shift64 = shift.to(at::kDouble);
  auto total = count + n.sum(1);
  auto had = count > 0;
  auto old_off = at::where(had, mean - shift64, 0.0);
  auto new_mean = shift64 + (count.to(at::kDouble) * old_off + d1.sum(1)) / total.to(at::kDouble).clamp_min(1);
  auto spread = at::where(had, count.to(at::kDouble) * (mean - new_mean).square(), 0.0) +
                at::where(n > 0, nd * (shift64.unsqueeze(1) + d1 / safe - new_mean.unsqueeze(1)).square(), 0.0).sum(1);
  auto new_m2 = m2 + part_m2.sum(1) + spread;
  auto seen = total > 0;
  new_mean = at::where(seen, new_mean, mean);
  new_m2 = at::where(seen, new_m2, m2);
  auto old_count = count.clone();
  minimum.copy_(at::minimum(minimum, pmin.view({C, G}).amin(1)));
  maximum.copy_(at::maximum(maximum, pmax.view({C, G}).amax(1)));
  nan_count.add_(nan.view({C, G}).sum(1).to(at::kLong));
  hist.add_(phist.view({C, G, bins + 2}).sum(1).to(at::kLong));
  // Selection: the batch's best K candidates and the state's filled entries, ranked like the reference.
  auto v = x.to(at::kFloat).reshape({N, C, S}).transpose(0, 1).reshape({C, L});
  auto valid = v.isnan().logical_not();
  auto [cand_v, cand_col, cand_ok] = preselect_topk(v, valid, K);
  auto keys = cand_col + sample_offset * S;
  auto slot = at::arange(K, x.options().dtype(at::kLong)).unsqueeze(0) < old_count.clamp_max(K).unsqueeze(1);
  auto old_keys = at::where(slot, topk_sample * S + topk_pos, -1);
  auto merged =
      merge_topk(at::cat({topk_values, cand_v}, 1), at::cat({old_keys, keys}, 1), at::cat({slot, cand_ok}, 1), K);
  auto mk = std::get<1>(merged);
  topk_values.copy_(std::get<0>(merged));
  topk_sample.copy_(at::where(mk >= 0, at::floor_divide(mk, S), -1));
  topk_pos.copy_(at::where(mk >= 0, at::remainder(mk, S), -1));
  if (M > 0) {
    auto cand = at::where(valid, v, -inf);
    if (M < L) cand = std::get<0>(at::topk(cand, M, 1));
    auto both = at::cat({qbuf, cand}, 1);
    qbuf.copy_(std::get<0>(at::topk(both, M, 1)));
  }
  count.copy_(total);
  // Channels that saw +-inf: mean +inf / -inf / NaN (both), M2 NaN (the reference's definition).
  auto pos = maximum == inf, neg = minimum == -inf;
  const double nan_v = std::numeric_limits<double>::quiet_NaN();
  mean.copy_(at::where(pos.logical_and(neg), nan_v, at::where(pos, inf, at::where(neg, -inf, new_mean))));
  m2.copy_(at::where(pos.logical_or(neg), nan_v, new_m2));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CUDA, m) { m.impl("channel_stats_update_", &update_); }

}  // namespace pyadvk
