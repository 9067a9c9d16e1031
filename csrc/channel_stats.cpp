// CPU body of channel_stats_update_: argument checks, the per-task workspace, and the call into
// the hot loops of the best instruction set (csrc/cpu/channel_stats_kernels.inc).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "channel_stats.h"
#include "cpu/isa.h"

namespace pyadvk {

PYADVK_CPU_KERNEL(channel_stats_update, ChannelStatsArgs)

namespace {

void update_(at::Tensor& count, at::Tensor& nan_count, at::Tensor& mean, at::Tensor& m2, at::Tensor& minimum,
             at::Tensor& maximum, at::Tensor& hist, at::Tensor& topk_values, at::Tensor& topk_sample,
             at::Tensor& topk_pos, at::Tensor& qbuf, const at::Tensor& x, int64_t sample_offset, double lo,
             double hi) {
  const char* op = "channel_stats_update_";
  check_channel_stats(op, at::kCPU, count, nan_count, mean, m2, minimum, maximum, hist, topk_values, topk_sample,
                      topk_pos, qbuf, x, sample_offset, lo, hi);
  const int64_t N = x.size(0), C = x.size(1);
  // The hot loops index the top-k and buffer slots by min(count, K): a negative count (a damaged
  // or tampered state) would make them write before their buffers. Python validates states read
  // from files; this check keeps the kernel safe whatever the caller passes.
  const int64_t* count_ptr = count.data_ptr<int64_t>();
  const int64_t* nan_ptr = nan_count.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    TORCH_CHECK(count_ptr[c] >= 0 && nan_ptr[c] >= 0, op,
                ": count and nan_count must be >= 0 (a damaged or tampered state), got count=", count_ptr[c],
                ", nan_count=", nan_ptr[c], " for channel ", c);
  }
  if (N == 0) return;
  int64_t S, sn, sc, ss;
  channel_strides(x, S, sn, sc, ss);
  // A channel's values are strided when channels are innermost (channels_last, (N, C)) and come
  // in short runs when the spatial size is small: then one transposed copy (C, N, *spatial) makes
  // each channel one contiguous run, read in long blocks (the kernels see stride_n == S). The
  // kernels read positions with stride 1, which holds in every other case.
  at::Tensor xt = x;
  if (ss != 1 || (C > 1 && N > 1 && S < 256)) {
    xt = x.movedim(1, 0).contiguous();
    sn = S;
    sc = N * S;
    ss = 1;
  }
  const int64_t bins = hist.size(1) - 2, K = topk_values.size(1), M = qbuf.size(1);
  // Enough tasks for every thread: split the samples of a channel when channels are few.
  const int64_t threads = at::get_num_threads();
  int64_t groups = C >= 2 * threads ? 1 : (2 * threads + C - 1) / C;
  groups = groups < N ? groups : N;
  const int64_t tasks = C * groups;
  auto i64 = x.options().dtype(at::kLong);
  auto f64 = x.options().dtype(at::kDouble);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor w_count = at::empty({tasks}, i64), w_nan = at::empty({tasks}, i64);
  at::Tensor w_mean = at::empty({tasks}, f64), w_m2 = at::empty({tasks}, f64);
  at::Tensor w_min = at::empty({tasks}, f32), w_max = at::empty({tasks}, f32);
  at::Tensor w_hist = at::empty({tasks, bins + 2}, i64);
  at::Tensor w_topv = at::empty({tasks, K}, f32), w_topkey = at::empty({tasks, K}, i64);
  at::Tensor w_topn = at::empty({tasks}, i64);
  at::Tensor w_q = at::empty({tasks, M}, f32), w_qn = at::empty({tasks}, i64);
  ChannelStatsArgs args{x.scalar_type(),
                        xt.data_ptr(),
                        N,
                        C,
                        S,
                        sn,
                        sc,
                        ss,
                        sample_offset,
                        static_cast<float>(lo),
                        static_cast<float>(hi),
                        static_cast<float>(static_cast<double>(bins) / (hi - lo)),
                        bins,
                        K,
                        M,
                        groups,
                        count.data_ptr<int64_t>(),
                        nan_count.data_ptr<int64_t>(),
                        mean.data_ptr<double>(),
                        m2.data_ptr<double>(),
                        minimum.data_ptr<float>(),
                        maximum.data_ptr<float>(),
                        hist.data_ptr<int64_t>(),
                        topk_values.data_ptr<float>(),
                        topk_sample.data_ptr<int64_t>(),
                        topk_pos.data_ptr<int64_t>(),
                        qbuf.data_ptr<float>(),
                        w_count.data_ptr<int64_t>(),
                        w_nan.data_ptr<int64_t>(),
                        w_mean.data_ptr<double>(),
                        w_m2.data_ptr<double>(),
                        w_min.data_ptr<float>(),
                        w_max.data_ptr<float>(),
                        w_hist.data_ptr<int64_t>(),
                        w_topv.data_ptr<float>(),
                        w_topkey.data_ptr<int64_t>(),
                        w_topn.data_ptr<int64_t>(),
                        w_q.data_ptr<float>(),
                        w_qn.data_ptr<int64_t>()};
  channel_stats_update_dispatch(args);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CPU, m) { m.impl("channel_stats_update_", &update_); }

}  // namespace pyadvk
