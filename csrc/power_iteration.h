// Shared declarations and argument checks for the batched power iteration (CPU and CUDA bodies).
//
// The op (schema and reference in pyadvk/ops/power_iteration.py) runs power iteration on N
// matrices of different shapes at once. The host code describes them with a table (one row of
// kMetaFields int64 per matrix: data pointers of W, u and v, the shape, the offset of its rows in
// the packed workspace t, and its ranges in the two task lists) and splits the work into tasks
// (matrix, begin, end): column blocks for v = Wᵀu, row blocks for t = W v (CUDA; the CPU body
// computes each column block's share of W v in the same task, see cpu/power_iteration_kernels.inc).
// Each task writes the partial sum of squares of what it produced, so the norms need no atomics.
#pragma once

#include "common.h"

#include <tuple>
#include <vector>

namespace pyadvk {

// Fields of one matrix's row in the meta table.
enum PowerIterMeta : int64_t {
  kMetaW = 0,         // const T* W (row-major m×n), as int64
  kMetaU = 1,         // float* u (m), in/out
  kMetaV = 2,         // float* v (n), out
  kMetaRows = 3,      // m
  kMetaCols = 4,      // n
  kMetaT = 5,         // offset of this matrix's m values in the packed workspace t
  kMetaColTask0 = 6,  // first column task of this matrix
  kMetaColTask1 = 7,  // one past its last column task
  kMetaRowTask0 = 8,
  kMetaRowTask1 = 9,
  kMetaTPart = 10,    // CPU: offset of this matrix's per-column-task partial W v (m per task)
  kMetaFields = 11,
};

// Arguments of the CPU kernels (csrc/cpu/power_iteration_kernels.inc).
struct PowerIterArgs {
  at::ScalarType dtype;
  int64_t N;                 // matrices
  const int64_t* meta;       // N × kMetaFields
  int64_t n_col_tasks;
  const int64_t* col_tasks;  // n_col_tasks × 3: (matrix, first column, one past last column)
  float* t_part;             // per column task, its columns' share of W v (m floats per task)
  double* partial;           // n_col_tasks partial sums of squares
  float* sigma;              // N
  int64_t n_iters;
};

inline void check_power_iteration(const char* op, at::DeviceType device, at::TensorList weights,
                                  at::TensorList us, int64_t n_iters) {
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one matrix, got an empty list");
  TORCH_CHECK(us.size() == weights.size(), op, ": us must hold one vector per weight (",
              weights.size(), "), got ", us.size());
  TORCH_CHECK(n_iters >= 1, op, ": n_iters must be >= 1, got ", n_iters);
  const auto dtype = weights[0].scalar_type();
  TORCH_CHECK(is_supported_float(dtype), op, ": weights must be float32, float16 or bfloat16, got ", dtype);
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const auto& u = us[i];
    TORCH_CHECK(w.device().type() == device && w.device() == weights[0].device(), op, ": weights[", i,
                "] must be a ", device, " tensor on the device of weights[0], got ", w.device());
    TORCH_CHECK(w.dim() == 2, op, ": weights[", i, "] must be a 2-D matrix, got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == dtype, op, ": weights[", i, "] must have the dtype of weights[0] (",
                dtype, "), got ", w.scalar_type());
    TORCH_CHECK(w.is_contiguous(), op, ": weights[", i, "] must be contiguous");
    TORCH_CHECK(u.scalar_type() == at::kFloat, op, ": us[", i, "] must be float32, got ", u.scalar_type());
    TORCH_CHECK(u.dim() == 1 && u.size(0) == w.size(0), op, ": us[", i, "] must have shape (", w.size(0),
                ",), got ", u.sizes());
    TORCH_CHECK(u.device() == w.device(), op, ": us[", i, "] must be on ", w.device(), ", got ", u.device());
  }
}

// Output tensors and the task tables (built on the CPU; the CUDA body copies them over).
struct PowerIterPlan {
  at::Tensor sigma;
  std::vector<at::Tensor> us, vs;
  at::Tensor meta, col_tasks, row_tasks;  // int64, CPU
  int64_t n_col_tasks = 0, n_row_tasks = 0, t_total = 0, t_part_total = 0;
};

// Column tasks cover at most `col_block` columns, and when `col_block_bytes` > 0 at most that many
// bytes of W (m rows × columns, at least 16 columns); row tasks cover about `row_elems` weights (at
// least one row, at most `max_rows` rows).
inline PowerIterPlan plan_power_iteration(at::TensorList weights, at::TensorList us, int64_t col_block,
                                          int64_t row_elems, int64_t max_rows, int64_t col_block_bytes = 0) {
  PowerIterPlan p;
  const int64_t N = static_cast<int64_t>(weights.size());
  const auto opts = weights[0].options();
  p.sigma = at::zeros({N}, opts.dtype(at::kFloat));
  std::vector<int64_t> meta(N * kMetaFields), col, row;
  for (int64_t i = 0; i < N; ++i) {
    const auto& w = weights[i];
    const int64_t m = w.size(0), n = w.size(1);
    p.us.push_back(us[i].clone());
    p.vs.push_back(at::zeros({n}, opts.dtype(at::kFloat)));
    int64_t* r = meta.data() + i * kMetaFields;
    r[kMetaW] = reinterpret_cast<int64_t>(w.data_ptr());
    r[kMetaU] = reinterpret_cast<int64_t>(p.us.back().data_ptr());
    r[kMetaV] = reinterpret_cast<int64_t>(p.vs.back().data_ptr());
    r[kMetaRows] = m;
    r[kMetaCols] = n;
    r[kMetaT] = p.t_total;
    p.t_total += m;
    int64_t width = col_block;
    if (col_block_bytes > 0) {
      const int64_t fit = col_block_bytes / std::max<int64_t>(1, m * static_cast<int64_t>(w.element_size()));
      width = std::min(col_block, std::max<int64_t>(16, fit / 16 * 16));
    }
    r[kMetaColTask0] = static_cast<int64_t>(col.size() / 3);
    for (int64_t c = 0; c < n; c += width) col.insert(col.end(), {i, c, std::min(n, c + width)});
    r[kMetaColTask1] = static_cast<int64_t>(col.size() / 3);
    r[kMetaTPart] = p.t_part_total;
    p.t_part_total += m * (r[kMetaColTask1] - r[kMetaColTask0]);
    const int64_t rows_per = std::max<int64_t>(1, std::min(max_rows, row_elems / std::max<int64_t>(n, 1)));
    r[kMetaRowTask0] = static_cast<int64_t>(row.size() / 3);
    for (int64_t s = 0; s < m; s += rows_per) row.insert(row.end(), {i, s, std::min(m, s + rows_per)});
    r[kMetaRowTask1] = static_cast<int64_t>(row.size() / 3);
  }
  const auto cpu = at::TensorOptions().dtype(at::kLong);
  p.meta = at::tensor(meta, cpu);
  p.n_col_tasks = static_cast<int64_t>(col.size() / 3);
  p.n_row_tasks = static_cast<int64_t>(row.size() / 3);
  p.col_tasks = col.empty() ? at::zeros({3}, cpu) : at::tensor(col, cpu);
  p.row_tasks = row.empty() ? at::zeros({3}, cpu) : at::tensor(row, cpu);
  return p;
}

}  // namespace pyadvk
