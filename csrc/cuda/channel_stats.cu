// CUDA body of channel_stats_update_ (semantics: pyadvk/ops/channel_stats.py).
//
// One kernel, grid (C, G): block (c, g) reads the g-th range of at most kValuesPerBlock values of
// channel c (through the sample/channel/position strides: contiguous, channels_last and (N, C)
// alike) and writes one partial: non-NaN and NaN counts, float32 sums of v - shift and
// (v - shift)^2 (shift: the channel's running mean, or the mean of the batch's first sample for a
// new channel, so a large offset cancels), min, max, and a histogram row (shared-memory atomics
// when the bins fit, else global atomics into the block's own row). The partials are merged in
// float64 with Chan's formula by ATen ops on the current stream, and the top-k / quantile buffer
// merge runs as stable ATen sorts with the reference's tie order (larger value, then smaller
// sample * S + position). Everything is queued on the current stream; no host synchronization.
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

template <typename T>
__global__ void partials_kernel(const T* __restrict__ x, const float* __restrict__ shift_t, int64_t S,
                                int64_t L, int64_t sn, int64_t sc, int64_t ss, int64_t G, int64_t per,
                                float lo, float hi, float inv, int64_t bins, int* __restrict__ cnt_out,
                                int* __restrict__ nan_out, float* __restrict__ s1_out,
                                float* __restrict__ s2_out, float* __restrict__ min_out,
                                float* __restrict__ max_out, int* __restrict__ hist_out) {
  const int64_t c = blockIdx.x, g = blockIdx.y;
  const int64_t task = c * G + g;
  const int64_t H = bins + 2;
  __shared__ int shist[kSharedBins + 2];
  const bool shared_hist = H <= kSharedBins + 2;
  if (shared_hist)
    for (int64_t b = threadIdx.x; b < H; b += blockDim.x) shist[b] = 0;
  __syncthreads();
  const float shift = shift_t[c];
  const int64_t start = g * per;
  const int64_t end = start + per < L ? start + per : L;
  float s1 = 0.f, s2 = 0.f, mn = INFINITY, mx = -INFINITY;
  int cnt = 0, nan = 0;
  int* grow = hist_out + task * H;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t n = i / S, p = i - n * S;
    const float v = static_cast<float>(x[n * sn + c * sc + p * ss]);
    if (isnan(v)) {
      ++nan;
      continue;
    }
    const float d = v - shift;
    s1 += d;
    s2 += d * d;
    ++cnt;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    int64_t col;
    if (v < lo) col = 0;
    else if (v > hi) col = bins + 1;
    else {
      const int64_t b = static_cast<int64_t>(floorf(__fmul_rn(__fsub_rn(v, lo), inv)));
      col = 1 + (b < bins - 1 ? b : bins - 1);
    }
    if (shared_hist) atomicAdd(&shist[col], 1);
    else atomicAdd(&grow[col], 1);
  }
  // Block reduction of the scalars through shared memory.
  __shared__ float r1[kThreads], r2[kThreads], rmn[kThreads], rmx[kThreads];
  __shared__ int rc[kThreads], rn[kThreads];
  r1[threadIdx.x] = s1;
  r2[threadIdx.x] = s2;
  rmn[threadIdx.x] = mn;
  rmx[threadIdx.x] = mx;
  rc[threadIdx.x] = cnt;
  rn[threadIdx.x] = nan;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const int o = threadIdx.x + stride;
      r1[threadIdx.x] += r1[o];
      r2[threadIdx.x] += r2[o];
      rmn[threadIdx.x] = rmn[o] < rmn[threadIdx.x] ? rmn[o] : rmn[threadIdx.x];
      rmx[threadIdx.x] = rmx[o] > rmx[threadIdx.x] ? rmx[o] : rmx[threadIdx.x];
      rc[threadIdx.x] += rc[o];
      rn[threadIdx.x] += rn[o];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    s1_out[task] = r1[0];
    s2_out[task] = r2[0];
    min_out[task] = rmn[0];
    max_out[task] = rmx[0];
    cnt_out[task] = rc[0];
    nan_out[task] = rn[0];
  }
  if (shared_hist)
    for (int64_t b = threadIdx.x; b < H; b += blockDim.x) grow[b] = shist[b];
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
  const int64_t per = (L + G - 1) / G;
  const double inf = std::numeric_limits<double>::infinity();
  auto first = x.select(0, 0).to(at::kFloat).reshape({C, -1});
  auto shift = at::where(count > 0, mean.to(at::kFloat), at::nan_to_num(at::nanmean(first, {1}), 0.0)).contiguous();
  auto i32 = x.options().dtype(at::kInt);
  auto f32 = x.options().dtype(at::kFloat);
  auto cnt = at::empty({C * G}, i32), nan = at::empty({C * G}, i32);
  auto s1 = at::empty({C * G}, f32), s2 = at::empty({C * G}, f32);
  auto pmin = at::empty({C * G}, f32), pmax = at::empty({C * G}, f32);
  auto phist = at::zeros({C * G, bins + 2}, i32);
  const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(G));
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  const float inv = static_cast<float>(static_cast<double>(bins) / (hi - lo));
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    partials_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x.data_ptr()), shift.data_ptr<float>(), S, L, sn, sc, ss, G, per, flo, fhi, inv,
        bins, cnt.data_ptr<int>(), nan.data_ptr<int>(), s1.data_ptr<float>(), s2.data_ptr<float>(),
        pmin.data_ptr<float>(), pmax.data_ptr<float>(), phist.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Chan merge of the partials, in float64, in a fixed order.
  auto n = cnt.view({C, G}).to(at::kLong);
  auto nd = n.to(at::kDouble).clamp_min(1);
  auto d1 = s1.view({C, G}).to(at::kDouble);
  auto pmean = shift.to(at::kDouble).unsqueeze(1) + d1 / nd;
  auto pm2 = (s2.view({C, G}).to(at::kDouble) - d1 * d1 / nd).clamp_min(0);
  auto old_count = count.clone();
  auto tn = count.clone(), tmean = mean.clone(), tm2 = m2.clone();
  for (int64_t g = 0; g < G; ++g) {
    auto nb = n.select(1, g), mb = pmean.select(1, g), m2b = pm2.select(1, g);
    auto na = tn.to(at::kDouble), nbd = nb.to(at::kDouble);
    auto tot = na + nbd;
    auto safe = at::where(tot > 0, tot, at::ones_like(tot));
    auto delta = mb - tmean;
    auto new_mean = at::where(nbd > 0, at::where(na > 0, tmean + delta * (nbd / safe), mb), tmean);
    auto new_m2 = at::where((na > 0).logical_and(nbd > 0), tm2 + m2b + delta * delta * (na * nbd / safe),
                            at::where(na > 0, tm2, m2b));
    tn = tn + nb;
    tmean = new_mean;
    tm2 = new_m2;
  }
  minimum.copy_(at::minimum(minimum, pmin.view({C, G}).amin(1)));
  maximum.copy_(at::maximum(maximum, pmax.view({C, G}).amax(1)));
  nan_count.add_(nan.view({C, G}).sum(1).to(at::kLong));
  hist.add_(phist.view({C, G, bins + 2}).sum(1).to(at::kLong));
  // Selection: the state's filled entries and the batch's values, ranked like the reference.
  auto v = x.to(at::kFloat).reshape({N, C, S}).transpose(0, 1).reshape({C, L});
  auto valid = v.isnan().logical_not();
  auto keys = (at::arange(L, x.options().dtype(at::kLong)) + sample_offset * S).expand({C, L});
  auto slot = at::arange(K, x.options().dtype(at::kLong)).unsqueeze(0) < old_count.clamp_max(K).unsqueeze(1);
  auto old_keys = at::where(slot, topk_sample * S + topk_pos, -1);
  auto merged = merge_topk(at::cat({topk_values, v}, 1), at::cat({old_keys, keys}, 1), at::cat({slot, valid}, 1), K);
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
  count.copy_(tn);
  mean.copy_(tmean);
  m2.copy_(tm2);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CUDA, m) { m.impl("channel_stats_update_", &update_); }

}  // namespace pyadvk
