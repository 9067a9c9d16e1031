// CUDA body of the batched power iteration (see csrc/power_iteration.h for the tables).
//
// Per iteration, five launches over all matrices at once:
//   1. one block per tile (kColBlock columns × kRowChunk rows of one matrix; a thread per column):
//      that tile's share of v = Wᵀu into vpart (coalesced row-segment reads; the rows of a tall
//      matrix are spread over many blocks, split-K);
//   2. one block per column task: v_raw = Σ of its tiles' shares (in chunk order: deterministic),
//      and the task's Σ v_raw² (float64) into partial[task];
//   3. one block per matrix: ||v|| from its tasks' partials, v = v_raw / ||v|| (divided in float64;
//      0 when ||v|| = 0, NaN when ||v|| is NaN or inf, i.e. W or u is not finite);
//   4. one block per row task: t[r] = <W[r, :], v>, a warp per row when the task has 8 rows or
//      more, else 8 / rows warps per row (rows of more than 1024 columns keep every warp busy),
//      and the block's Σ t² (float64);
//   5. one block per matrix: σ = ||t||, u = t / σ (u unchanged when σ is 0, NaN or inf).
// No atomics: results are deterministic. A non-finite W or u makes v NaN, hence t and σ NaN.
//
// The tables depend only on the weights' data pointers and shapes: they are built once per set of
// weights, copied to the device from pinned memory without a host sync, and kept in a small LRU
// cache (PlanCache). A call with cached weights therefore does no host synchronization and can be
// captured in a CUDA graph; a call with new weights under capture is refused with a message (run
// it once before capturing).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <utility>

#include "../power_iteration.h"

namespace pyadvk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kColBlock = kThreads;  // columns per column task and tile
constexpr int64_t kRowChunk = 64;        // rows per tile of Wᵀu
constexpr int64_t kRowElems = 8 * 1024;  // weights per row task of W v (at most 64 rows)
constexpr int64_t kMaxRows = 64;
constexpr size_t kCacheEntries = 64;

__device__ __forceinline__ double block_sum(double x) {
  __shared__ double shared[kWarps];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0)
    for (int k = 0; k < kWarps; ++k) total += shared[k];
  return total;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    wt_u_tile_kernel(const int64_t* __restrict__ meta, const int64_t* __restrict__ col_tasks,
                     const int64_t* __restrict__ tiles, const float* __restrict__ u_all, float* vpart) {
  const int64_t* tile = tiles + 3 * static_cast<int64_t>(blockIdx.x);
  const int64_t* r = meta + tile[0] * kMetaFields;
  const int64_t* task = col_tasks + 3 * tile[1];
  const int64_t c = task[1] + threadIdx.x;
  if (c >= task[2]) return;  // no block-wide synchronization in this kernel
  const T* w = reinterpret_cast<const T*>(r[kMetaW]);
  const float* u = u_all + r[kMetaU];
  const int64_t m = r[kMetaRows], n = r[kMetaCols], chunk = tile[2];
  const int64_t r0 = chunk * kRowChunk, r1 = r0 + kRowChunk < m ? r0 + kRowChunk : m;
  float acc = 0.f;
  for (int64_t row = r0; row < r1; ++row) acc += u[row] * static_cast<float>(w[row * n + c]);
  vpart[r[kMetaPart] + chunk * n + c] = acc;
}

__global__ void __launch_bounds__(kThreads)
    reduce_v_kernel(const int64_t* __restrict__ meta, const int64_t* __restrict__ col_tasks,
                    const float* __restrict__ vpart, float* v_all, double* partial) {
  const int64_t k = blockIdx.x;
  const int64_t* task = col_tasks + 3 * k;
  const int64_t* r = meta + task[0] * kMetaFields;
  const int64_t m = r[kMetaRows], n = r[kMetaCols], chunks = (m + kRowChunk - 1) / kRowChunk;
  const int64_t c = task[1] + threadIdx.x;
  double sq = 0;
  if (c < task[2]) {
    const float* part = vpart + r[kMetaPart] + c;
    float s = 0.f;
    for (int64_t j = 0; j < chunks; ++j) s += part[j * n];
    v_all[r[kMetaV] + c] = s;
    sq = static_cast<double>(s) * s;
  }
  const double total = block_sum(sq);
  if (threadIdx.x == 0) partial[k] = total;
}

__global__ void __launch_bounds__(kThreads)
    normalize_v_kernel(const int64_t* __restrict__ meta, const double* partial, float* v_all) {
  const int64_t* r = meta + blockIdx.x * kMetaFields;
  __shared__ double norm;
  if (threadIdx.x == 0) {
    double ss = 0;
    for (int64_t k = r[kMetaColTask0]; k < r[kMetaColTask1]; ++k) ss += partial[k];
    norm = sqrt(ss);
  }
  __syncthreads();
  float* v = v_all + r[kMetaV];
  const double nv = norm;
  const bool finite = isfinite(nv);
  for (int64_t c = threadIdx.x; c < r[kMetaCols]; c += kThreads)
    v[c] = nv == 0 ? 0.f : finite ? static_cast<float>(v[c] / nv) : __int_as_float(0x7fc00000);  // NaN
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    w_v_kernel(const int64_t* __restrict__ meta, const int64_t* __restrict__ row_tasks,
               const float* __restrict__ v_all, float* t_all, double* partial) {
  const int64_t k = blockIdx.x;
  const int64_t* task = row_tasks + 3 * k;
  const int64_t* r = meta + task[0] * kMetaFields;
  const T* w = reinterpret_cast<const T*>(r[kMetaW]);
  const float* v = v_all + r[kMetaV];
  float* t = t_all + r[kMetaU];
  const int64_t n = r[kMetaCols], r0 = task[1], rows = task[2] - task[1];
  // g warps per row: 1 when the task has >= 8 rows, else 8 / rows (the host makes that 2, 4 or 8).
  const int g = rows >= kWarps ? 1 : kWarps / static_cast<int>(rows);
  const int per_pass = kWarps / g;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, slot = warp / g, sub = warp % g;
  __shared__ float dots[kWarps];
  double ss = 0;  // thread 0's
  for (int64_t base = 0; base < rows; base += per_pass) {
    float dot = 0.f;
    if (base + slot < rows) {
      const T* wr = w + (r0 + base + slot) * n;
      for (int64_t c = sub * 32 + lane; c < n; c += 32 * g) dot += static_cast<float>(wr[c]) * v[c];
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_down_sync(0xffffffffu, dot, o);
    if (lane == 0) dots[warp] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int s = 0; s < per_pass && base + s < rows; ++s) {
        float d = 0.f;
        for (int q = 0; q < g; ++q) d += dots[s * g + q];
        t[r0 + base + s] = d;
        ss += static_cast<double>(d) * d;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[k] = ss;
}

__global__ void __launch_bounds__(kThreads)
    normalize_u_kernel(const int64_t* __restrict__ meta, const float* t_all, const double* partial, float* sigma,
                       float* u_all) {
  const int64_t* r = meta + blockIdx.x * kMetaFields;
  __shared__ double norm;
  if (threadIdx.x == 0) {
    double ss = 0;
    for (int64_t k = r[kMetaRowTask0]; k < r[kMetaRowTask1]; ++k) ss += partial[k];
    norm = sqrt(ss);
    sigma[blockIdx.x] = static_cast<float>(norm);
  }
  __syncthreads();
  const double nt = norm;
  if (!(nt > 0 && isfinite(nt))) return;
  float* u = u_all + r[kMetaU];
  const float* t = t_all + r[kMetaU];
  for (int64_t row = threadIdx.x; row < r[kMetaRows]; row += kThreads) u[row] = static_cast<float>(t[row] / nt);
}

// The tables of one set of weights on one device: meta, column tasks, row tasks and tiles packed
// in one int64 device tensor, and their sizes.
struct Plan {
  at::Tensor table;
  int64_t n_col = 0, n_row = 0, n_tiles = 0, col_at = 0, row_at = 0, tiles_at = 0;
  int64_t u_total = 0, v_total = 0, part_total = 0;
};

// What a plan depends on: the device, and per weight its data pointer and shape.
struct PlanKey {
  int device = 0;
  std::vector<int64_t> weights;  // (pointer, m, n) per weight
  bool operator==(const PlanKey& o) const { return device == o.device && weights == o.weights; }
};

// Least recently used plans (a handful of weight sets: a model's layers grouped by dtype).
class PlanCache {
 public:
  std::shared_ptr<const Plan> get(at::TensorList weights) {
    PlanKey key{weights[0].device().index(), {}};
    for (const auto& w : weights)
      key.weights.insert(key.weights.end(), {reinterpret_cast<int64_t>(w.data_ptr()), w.size(0), w.size(1)});
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (it->first == key) {
          entries_.splice(entries_.begin(), entries_, it);
          return entries_.front().second;
        }
      }
    }
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "power_iteration_packed: these weights (", weights.size(),
                " matrices) have no device plan yet, and building one copies a table to the device, "
                "which cannot happen during CUDA graph capture: call it once with the same weights "
                "before capturing");
    auto plan = std::make_shared<Plan>(build(weights));
    const std::lock_guard<std::mutex> lock(mutex_);
    entries_.emplace_front(std::move(key), plan);
    if (entries_.size() > kCacheEntries) entries_.pop_back();
    return plan;
  }

 private:
  static Plan build(at::TensorList weights) {
    const auto tables = power_iteration_tables(weights, kColBlock, 0, kRowChunk, kRowElems, kMaxRows);
    Plan p;
    p.n_col = tables.n_col();
    p.n_row = tables.n_row();
    p.n_tiles = tables.n_tiles();
    p.col_at = static_cast<int64_t>(tables.meta.size());
    p.row_at = p.col_at + static_cast<int64_t>(tables.col.size());
    p.tiles_at = p.row_at + static_cast<int64_t>(tables.row.size());
    const int64_t len = p.tiles_at + static_cast<int64_t>(tables.tiles.size());
    p.u_total = tables.u_total;
    p.v_total = tables.v_total;
    p.part_total = tables.part_total;
    // Pinned host memory and a non-blocking copy on the current stream: no host synchronization
    // (the host allocator keeps the block until the copy has run).
    auto host = at::empty({len}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* dst = host.data_ptr<int64_t>();
    for (const auto* part : {&tables.meta, &tables.col, &tables.row, &tables.tiles}) {
      if (!part->empty()) std::memcpy(dst, part->data(), part->size() * sizeof(int64_t));
      dst += part->size();
    }
    p.table = at::empty({len}, weights[0].options().dtype(at::kLong));
    p.table.copy_(host, /*non_blocking=*/true);
    return p;
  }

  std::mutex mutex_;
  std::list<std::pair<PlanKey, std::shared_ptr<const Plan>>> entries_;
};

PlanCache& plan_cache() {
  static auto* cache = new PlanCache();  // never destroyed: no device frees at process exit
  return *cache;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cuda(at::TensorList weights, const at::Tensor& u,
                                                                    int64_t n_iters) {
  check_power_iteration("power_iteration_packed", at::kCUDA, weights, u, n_iters);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const auto plan = plan_cache().get(weights);
  const auto opts = weights[0].options().dtype(at::kFloat);
  const int64_t N = static_cast<int64_t>(weights.size());
  auto u_out = u.clone();
  auto v_out = at::empty({plan->v_total}, opts);
  auto sigma = at::empty({N}, opts);
  auto t = at::empty({std::max<int64_t>(plan->u_total, 1)}, opts);
  auto vpart = at::empty({std::max<int64_t>(plan->part_total, 1)}, opts);
  auto partial = at::empty({std::max<int64_t>(std::max(plan->n_col, plan->n_row), 1)}, opts.dtype(at::kDouble));
  const int64_t* table = plan->table.data_ptr<int64_t>();
  const int64_t* meta = table;
  const int64_t* col = table + plan->col_at;
  const int64_t* row = table + plan->row_at;
  const int64_t* tiles = table + plan->tiles_at;
  float* u_p = u_out.data_ptr<float>();
  float* v_p = v_out.data_ptr<float>();
  float* t_p = t.data_ptr<float>();
  float* vpart_p = vpart.data_ptr<float>();
  double* partial_p = partial.data_ptr<double>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(weights[0].scalar_type(), "power_iteration_packed", [&](auto tag) {
    using T = decltype(tag);
    for (int64_t it = 0; it < n_iters; ++it) {
      // (no launch of an empty grid: matrices without columns have no tiles and no column tasks,
      // matrices without rows no tiles and no row tasks)
      if (plan->n_tiles > 0) {
        wt_u_tile_kernel<T><<<plan->n_tiles, kThreads, 0, stream>>>(meta, col, tiles, u_p, vpart_p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (plan->n_col > 0) {
        reduce_v_kernel<<<plan->n_col, kThreads, 0, stream>>>(meta, col, vpart_p, v_p, partial_p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      normalize_v_kernel<<<N, kThreads, 0, stream>>>(meta, partial_p, v_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (plan->n_row > 0) {
        w_v_kernel<T><<<plan->n_row, kThreads, 0, stream>>>(meta, row, v_p, t_p, partial_p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      normalize_u_kernel<<<N, kThreads, 0, stream>>>(meta, t_p, partial_p, sigma.data_ptr<float>(), u_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {sigma, u_out, v_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyadvk, CUDA, m) { m.impl("power_iteration_packed", &power_iteration_cuda); }

}  // namespace pyadvk
