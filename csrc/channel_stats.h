// Shared declarations and argument checks for the streaming per-channel statistics op
// channel_stats_update_ (schema and semantics: pyadvk/ops/channel_stats.py).
//
// Activations (N, C, *spatial) are read through three strides (sample, channel, spatial position),
// which covers contiguous tensors, channels_last / channels_last_3d and (N, C) alike; positions are
// numbered in the row-major order of `spatial` in every layout. The state is eleven tensors, updated
// in place: count, nan_count (int64 C), mean, m2 (float64 C), minimum, maximum (float32 C), hist
// (int64 C x bins+2), topk_values (float32 C x K), topk_sample, topk_pos (int64 C x K), qbuf
// (float32 C x M).
#pragma once

#include <cmath>

#include "common.h"

namespace pyadvk {

// Values per float32 partial sum of the moments; partials are merged in float64 (Chan's formula).
constexpr int64_t kStatsBlock = 4096;

// One (channel, sample group) task's results, as the CPU kernels see them. Heaps are stored in
// the workspace arrays; `key` = sample * S + position.
struct ChannelStatsArgs {
  at::ScalarType dtype;
  const void* x;
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;  // in elements
  int64_t sample_offset;
  float lo, hi, inv;  // inv = float32(bins / (hi - lo))
  int64_t bins, K, M;
  int64_t groups;  // sample groups per channel (tasks = C * groups)
  // state, updated in place
  int64_t* count;
  int64_t* nan_count;
  double* mean;
  double* m2;
  float* minimum;
  float* maximum;
  int64_t* hist;
  float* topk_values;
  int64_t* topk_sample;
  int64_t* topk_pos;
  float* qbuf;
  // workspace, one slot per task
  int64_t* w_count;
  int64_t* w_nan;
  double* w_mean;
  double* w_m2;
  float* w_min;
  float* w_max;
  int64_t* w_hist;   // tasks x (bins + 2)
  float* w_topv;     // tasks x K
  int64_t* w_topkey; // tasks x K
  int64_t* w_topn;   // tasks
  float* w_q;        // tasks x M
  int64_t* w_qn;     // tasks
};

// Checks every argument of an update; `device` is the expected device type.
inline void check_channel_stats(const char* op, at::DeviceType device, const at::Tensor& count,
                                const at::Tensor& nan_count, const at::Tensor& mean, const at::Tensor& m2,
                                const at::Tensor& minimum, const at::Tensor& maximum, const at::Tensor& hist,
                                const at::Tensor& topk_values, const at::Tensor& topk_sample,
                                const at::Tensor& topk_pos, const at::Tensor& qbuf, const at::Tensor& x,
                                int64_t sample_offset, double lo, double hi) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be a ", device, " tensor, got ", x.device());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (N, C) or (N, C, *spatial), got ", x.sizes());
  TORCH_CHECK(dense_format(x).has_value(), op, ": x must be contiguous or channels_last");
  const int64_t C = x.size(1);
  TORCH_CHECK(sample_offset >= 0, op, ": sample_offset must be >= 0, got ", sample_offset);
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo < hi, op,
              ": the histogram range must be finite with lo < hi, got lo=", lo, ", hi=", hi);
  auto vec = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape (", C, ",), got ", t.sizes());
    TORCH_CHECK(t.device() == x.device() && t.is_contiguous(), op, ": ", name,
                " must be a contiguous tensor on ", x.device());
  };
  auto mat = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == C, op, ": ", name, " must have shape (", C, ", k), got ",
                t.sizes());
    TORCH_CHECK(t.device() == x.device() && t.is_contiguous(), op, ": ", name,
                " must be a contiguous tensor on ", x.device());
  };
  vec(count, "count", at::kLong);
  vec(nan_count, "nan_count", at::kLong);
  vec(mean, "mean", at::kDouble);
  vec(m2, "m2", at::kDouble);
  vec(minimum, "minimum", at::kFloat);
  vec(maximum, "maximum", at::kFloat);
  mat(hist, "hist", at::kLong);
  TORCH_CHECK(hist.size(1) >= 3, op, ": hist must have bins + 2 >= 3 columns, got ", hist.size(1));
  mat(topk_values, "topk_values", at::kFloat);
  TORCH_CHECK(topk_values.size(1) >= 1, op, ": topk_values must have k >= 1 columns, got ", topk_values.sizes());
  mat(topk_sample, "topk_sample", at::kLong);
  mat(topk_pos, "topk_pos", at::kLong);
  TORCH_CHECK(topk_sample.sizes() == topk_values.sizes() && topk_pos.sizes() == topk_values.sizes(), op,
              ": topk_sample and topk_pos must have the shape of topk_values ", topk_values.sizes());
  mat(qbuf, "qbuf", at::kFloat);
}

// (stride_n, stride_c, stride_s) of a dense x, and the spatial size S.
inline void channel_strides(const at::Tensor& x, int64_t& S, int64_t& sn, int64_t& sc, int64_t& ss) {
  const int64_t C = x.size(1);
  S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  if (x.dim() > 2 && !x.is_contiguous()) {  // channels_last(_3d): (N, *spatial, C) in memory
    sn = S * C;
    sc = 1;
    ss = C;
  } else {
    sn = C * S;
    sc = S;
    ss = 1;
  }
}

}  // namespace pyadvk
