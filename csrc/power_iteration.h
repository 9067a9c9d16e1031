// Shared declarations and argument checks for the batched power iteration (CPU and CUDA bodies).
//
// The op pyadvk::power_iteration_packed (schema and reference in pyadvk/ops/power_iteration.py)
// runs power iteration on N matrices of different shapes at once. The start vectors come packed
// in one float32 tensor u (Σ m_i values, matrix after matrix), and so do the results (σ (N,),
// u (Σ m_i,), v (Σ n_i,)): no per-matrix allocation, clone or fill.
//
// The host code describes the matrices with a table (one row of kMetaFields int64 per matrix: the
// data pointer of W, the offsets of its rows and columns in the packed u, v and workspaces, its
// shape and its ranges in the task lists) and splits the work into tasks. The table depends only
// on the weights' data pointers, shapes and the block sizes, never on u or v, so the CUDA body
// builds it once per set of weights and keeps it on the device (cuda/power_iteration.cu).
//
// Norms are sums of squares in float64 and every normalization divides in float64, so entries from
// 1e-30 to 1e30 give σ without overflow or underflow (a float32 sum of squares overflows at
// |x| ~ 1.8e19). Non-finite W or u: ||Wᵀu|| is NaN or inf, then v = NaN, σ = NaN and u unchanged
// (never a finite σ; see pyadvk/ops/power_iteration.py).
#pragma once

#include "common.h"

#include <algorithm>
#include <tuple>
#include <vector>

namespace pyadvk {

// Fields of one matrix's row in the meta table.
enum PowerIterMeta : int64_t {
  kMetaW = 0,          // const T* W (row-major m×n), as int64
  kMetaU = 1,          // offset of its m rows in the packed u (and in the workspace t)
  kMetaV = 2,          // offset of its n columns in the packed v
  kMetaRows = 3,       // m
  kMetaCols = 4,       // n
  kMetaColTask0 = 5,   // first column task of this matrix
  kMetaColTask1 = 6,   // one past its last column task
  kMetaRowTask0 = 7,   // first row task (CUDA)
  kMetaRowTask1 = 8,   // one past its last row task
  kMetaPart = 9,       // CPU: offset of its per-column-task shares of W v (m per task);
                       // CUDA: offset of its per-row-chunk partial sums of Wᵀu (n per chunk)
  kMetaFields = 10,
};

// The CPU body's column tasks are at most this wide (a stack buffer of the task's normalized
// columns lives in the kernel; see cpu/power_iteration_kernels.inc).
constexpr int64_t kPowerIterCpuColBlock = 512;

// Arguments of the CPU kernels (csrc/cpu/power_iteration_kernels.inc).
struct PowerIterArgs {
  at::ScalarType dtype;
  int64_t N;                 // matrices
  const int64_t* meta;       // N × kMetaFields
  int64_t n_col_tasks;
  const int64_t* col_tasks;  // n_col_tasks × 3: (matrix, first column, one past last column)
  float* u;                  // packed u (Σ m), in/out
  float* v;                  // packed v (Σ n), out
  float* t_part;             // per column task, its columns' share of W v (m floats per task)
  double* partial;           // n_col_tasks sums of squares of the tasks' columns of Wᵀu
  float* sigma;              // N
  int64_t n_iters;
};

inline void check_power_iteration(const char* op, at::DeviceType device, at::TensorList weights,
                                  const at::Tensor& u, int64_t n_iters) {
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one matrix, got an empty list");
  TORCH_CHECK(n_iters >= 1, op, ": n_iters must be >= 1, got ", n_iters);
  const auto dtype = weights[0].scalar_type();
  TORCH_CHECK(is_supported_float(dtype), op, ": weights must be float32, float16 or bfloat16, got ", dtype);
  int64_t total_m = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.device().type() == device && w.device() == weights[0].device(), op, ": weights[", i,
                "] must be a ", device, " tensor on the device of weights[0], got ", w.device());
    TORCH_CHECK(w.dim() == 2, op, ": weights[", i, "] must be a 2-D matrix, got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == dtype, op, ": weights[", i, "] must have the dtype of weights[0] (",
                dtype, "), got ", w.scalar_type());
    TORCH_CHECK(w.is_contiguous(), op, ": weights[", i, "] must be contiguous");
    total_m += w.size(0);
  }
  TORCH_CHECK(u.scalar_type() == at::kFloat, op, ": u must be float32, got ", u.scalar_type());
  TORCH_CHECK(u.dim() == 1 && u.size(0) == total_m, op,
              ": u must have shape (", total_m, ",) (the rows of all weights, packed), got ", u.sizes());
  TORCH_CHECK(u.device() == weights[0].device(), op, ": u must be on ", weights[0].device(), ", got ",
              u.device());
  TORCH_CHECK(u.is_contiguous(), op, ": u must be contiguous");
}

// The task tables of one set of weights, on the host. Column tasks cover at most `col_block`
// columns, and when `col_block_bytes` > 0 at most that many bytes of W (m rows × columns, at least
// 16 columns). CUDA: a matrix's Wᵀu is split further into chunks of `row_chunk` rows (tiles: one
// per column task and row chunk), and row tasks cover about `row_elems` weights (a power of two
// rows when fewer than 8, at most `max_rows`). `row_chunk` = 0: no tiles (CPU).
struct PowerIterTables {
  std::vector<int64_t> meta, col, row, tiles;  // tiles: (matrix, column task, row chunk)
  int64_t u_total = 0, v_total = 0, part_total = 0;
  int64_t n_col() const { return static_cast<int64_t>(col.size() / 3); }
  int64_t n_row() const { return static_cast<int64_t>(row.size() / 3); }
  int64_t n_tiles() const { return static_cast<int64_t>(tiles.size() / 3); }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline PowerIterTables power_iteration_tables(at::TensorList weights, int64_t col_block, int64_t col_block_bytes,
                                              int64_t row_chunk, int64_t row_elems, int64_t max_rows) {
  PowerIterTables p;
  const int64_t N = static_cast<int64_t>(weights.size());
  p.meta.resize(N * kMetaFields);
  for (int64_t i = 0; i < N; ++i) {
    const auto& w = weights[i];
    const int64_t m = w.size(0), n = w.size(1);
    int64_t* r = p.meta.data() + i * kMetaFields;
    r[kMetaW] = reinterpret_cast<int64_t>(w.data_ptr());
    r[kMetaU] = p.u_total;
    r[kMetaV] = p.v_total;
    r[kMetaRows] = m;
    r[kMetaCols] = n;
    p.u_total += m;
    p.v_total += n;
    int64_t width = col_block;
    if (col_block_bytes > 0) {
      const int64_t fit = col_block_bytes / std::max<int64_t>(1, m * static_cast<int64_t>(w.element_size()));
      width = std::min(col_block, std::max<int64_t>(16, fit / 16 * 16));
    }
    r[kMetaColTask0] = p.n_col();
    for (int64_t c = 0; c < n; c += width) p.col.insert(p.col.end(), {i, c, std::min(n, c + width)});
    r[kMetaColTask1] = p.n_col();
    r[kMetaPart] = p.part_total;
    if (row_chunk > 0) {
      const int64_t chunks = ceil_div(m, row_chunk);
      for (int64_t k = r[kMetaColTask0]; k < r[kMetaColTask1]; ++k)
        for (int64_t j = 0; j < chunks; ++j) p.tiles.insert(p.tiles.end(), {i, k, j});
      p.part_total += n * chunks;
    } else {
      p.part_total += m * (r[kMetaColTask1] - r[kMetaColTask0]);
    }
    int64_t rows_per = std::max<int64_t>(1, std::min(max_rows, row_elems / std::max<int64_t>(n, 1)));
    if (rows_per < 8) rows_per = rows_per >= 4 ? 4 : rows_per >= 2 ? 2 : 1;  // warps split evenly
    r[kMetaRowTask0] = p.n_row();
    for (int64_t s = 0; s < m; s += rows_per) p.row.insert(p.row.end(), {i, s, std::min(m, s + rows_per)});
    r[kMetaRowTask1] = p.n_row();
  }
  return p;
}

}  // namespace pyadvk
