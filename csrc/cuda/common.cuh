// Device helpers shared by the CUDA bodies of the elementwise and per-sample ops (pgd.cu, apgd.cu,
// half_huber.cu): vector loads and stores, the choice of vector width, NaN-propagating min/max,
// per-sample tiles and block sums.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace pyadvk {
namespace cuda {

constexpr int kThreads = 256;  // threads per block
constexpr int64_t kTile = 8192;  // values per block in the per-sample ops (never crosses a sample)

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC consecutive values of type T converted to the compute type C, in one load.
template <int VEC, typename T, typename C>
__device__ __forceinline__ void load_pack(const T* p, C (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<C>(pk.v[k]);
}

template <int VEC, typename T, typename C>
__device__ __forceinline__ void store_pack(T* p, const C (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// Calls f(std::integral_constant<int, VEC>) with the widest vector (16 bytes of T) that every
// pointer and the row length `n` allow, else VEC = 1.
template <typename T, typename F>
void with_vector_width(int64_t n, std::initializer_list<const void*> ptrs, const F& f) {
  constexpr int W = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
  bool ok = n % W == 0;
  for (const void* p : ptrs) ok = ok && aligned(p, 16);
  if (ok) {
    f(std::integral_constant<int, W>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// torch.maximum / torch.minimum / torch.clamp: a NaN operand propagates (fmaxf/fminf drop it).
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ float min_nan(float a, float b) { return (a < b || a != a) ? a : b; }
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) { return min_nan(max_nan(v, lo), hi); }

// One block's tile of a per-sample op: sample b, first value base, n values (<= kTile).
struct TileInfo {
  int64_t b, base, n;
};

__device__ __forceinline__ TileInfo tile_info(int64_t D, int64_t per_sample) {
  const int64_t tile = blockIdx.x;
  const int64_t b = tile / per_sample;
  const int64_t offset = (tile - b * per_sample) * kTile;
  return {b, b * D + offset, D - offset < kTile ? D - offset : kTile};
}

// Sums N doubles over the block (kThreads threads) in a fixed order; every thread gets the totals.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N]) {
  __shared__ double shared[N][kThreads / 32];
#pragma unroll
  for (int k = 0; k < N; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < N; ++k) shared[k][warp] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = 0.0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) v[k] += shared[k][w];
  }
  __syncthreads();  // shared may be reused by a later call
}

// Sample b's total of its per-tile partials (one double per tile), in a fixed order; every thread
// gets it.
__device__ __forceinline__ double sample_total(const double* partial, int64_t b, int64_t per_sample) {
  double s[1] = {0.0};
  for (int64_t c = threadIdx.x; c < per_sample; c += kThreads) s[0] += partial[b * per_sample + c];
  block_sum<1>(s);
  return s[0];
}

// This block's tile sum of |g|^2 (double: float squares of gradients beyond ~1e19 overflow and
// below ~1e-19 underflow; g without NaN) into partial[blockIdx.x].
template <typename T, int VEC>
__device__ __forceinline__ void tile_square_norm(const T* g, double* partial, const TileInfo& t) {
  double s[1] = {0.0};
  for (int64_t i = threadIdx.x * VEC; i < t.n; i += kThreads * VEC) {
    float vg[VEC];
    load_pack<VEC>(g + t.base + i, vg);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const double gk = isnan(vg[k]) ? 0.0 : static_cast<double>(vg[k]);
      s[0] += gk * gk;
    }
  }
  block_sum<1>(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

// g/|g| of one value as the torch bodies compute it: the double quotient rounded to float (here
// g * (1/|g|) in double, the same bar a double rounding at 2^-29 odds; g without NaN; inv = 0 where
// |g| = 0). Its float rounding is part of the op: with a step far larger than the result, one ulp of
// it moves the result by step ulps.
__device__ __forceinline__ float unit_step(float g, double inv) {
  return static_cast<float>(static_cast<double>(isnan(g) ? 0.f : g) * inv);
}
__device__ __forceinline__ double inverse_norm(double gg) { return gg > 0.0 ? 1.0 / sqrt(gg) : 0.0; }

}  // namespace cuda
}  // namespace pyadvk
