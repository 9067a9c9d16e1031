// Shared declarations, argument checks and the per-row search of the boundary projection (CPU and
// CUDA bodies; the op and its torch reference: pyadvk/ops/boundary_projection.py).
//
// Per row (x, w of D values, offset b), all in double: r = w.x + b, s = -sign(r) (+1 at r = 0),
// w' = s w, and per coordinate with w_i != 0 a breakpoint tau_i and a weight v_i (breakpoint()).
// g(t) = sum_i v_i min(t, tau_i) is concave, piecewise linear and non-decreasing; the answer is
// tau = (|r| - A) / B on the partition {i: tau_i below the crossing of g with |r|}, with
// A = sum over the partition of v_i tau_i and B = sum of v_i outside it. BoundarySearch finds that
// partition without sorting: each probe t is one pass over the row accumulating ProbeSums (A(t),
// B(t), the partition's size and the breakpoints nearest t on both sides). It keeps a bracket
// [lo, hi] with g(lo) < |r| <= g(hi) and probes the middle of the tighter bracket that concavity
// gives for free: the tangent at lo (slope B(lo)) reaches |r| at or before the crossing, the chord
// from lo to hi at or after it. It stops as soon as the segment of g around a probe holds the
// crossing, else after kMaxProbes probes (then the partition of lo, on which g is below |r|). On
// FAB-like rows this takes 2-14 probes where plain bisection on [lo, hi] takes 5-35. The bodies
// differ only in how they split a pass over threads.
#pragma once

#include "common.h"

#if defined(__CUDACC__)
#define PYADVK_HOST_DEVICE __host__ __device__
#else
#define PYADVK_HOST_DEVICE
#endif

namespace pyadvk {

// Arguments of one boundary projection as the CPU kernels (csrc/cpu/boundary_projection_kernels.inc)
// see them: R rows of D values, x, w, out contiguous (R, D), b (R,), all of dtype.
struct BoundaryProjectionArgs {
  at::ScalarType dtype;  // float32 or float64
  const void* x;
  const void* w;
  const void* b;
  void* out;
  int64_t R, D;
  double lower, upper;
  bool l2;          // norm "l2" (else "linf")
  double* scratch;  // 2 R D doubles: per row the breakpoints tau_i (NaN where w_i = 0), then v_i
};

namespace boundary {

constexpr int kMaxProbes = 64;

// The breakpoint tau and weight v of one coordinate (x, w) for the direction s; false where w = 0
// (the coordinate does not move). L2: tau = reach/|w|, v = w^2; linf: tau = reach, v = |w|, with
// reach = upper - x where s w > 0, x - lower where s w < 0, clamped at 0.
PYADVK_HOST_DEVICE inline bool breakpoint(double x, double w, double s, double lower, double upper, bool l2,
                                          double& v, double& tau) {
  const double ws = w * s;
  const double a = ws < 0 ? -ws : ws;
  double reach = ws > 0 ? upper - x : x - lower;
  reach = reach < 0 ? 0.0 : reach;  // a NaN reach stays NaN, as torch's clamp_min
  v = l2 ? ws * ws : a;
  tau = l2 ? reach / a : reach;
  return ws != 0;
}

// The value of delta at one coordinate for the final tau (tau NaN: NaN where w != 0).
PYADVK_HOST_DEVICE inline double delta_at(double x, double w, double s, double lower, double upper, bool l2,
                                          double tau) {
  double v, tau_i;
  if (!breakpoint(x, w, s, lower, upper, l2, v, tau_i)) return 0.0;
  const double step = (tau < tau_i || tau != tau) ? tau : tau_i;  // torch.minimum: NaN propagates
  const double ws = w * s;
  return l2 ? ws * step : (ws > 0 ? step : -step);
}

// What one pass accumulates for a probe t over the coordinates with w != 0.
struct ProbeSums {
  double A;           // sum of v_i tau_i over tau_i <= t
  double B;           // sum of v_i over tau_i > t (and NaN tau_i)
  double V;           // sum of v_i over tau_i <= t
  double below_max;   // largest tau_i <= t (-inf if none)
  double above_min;   // smallest tau_i > t (inf if none)
  int64_t n;          // how many tau_i <= t

  PYADVK_HOST_DEVICE static ProbeSums empty() {
    const double inf = __builtin_huge_val();
    return {0.0, 0.0, 0.0, -inf, inf, 0};
  }
  PYADVK_HOST_DEVICE void add(double t, double v, double tau) {
    if (tau <= t) {
      A += v * tau;
      V += v;
      n += 1;
      below_max = tau > below_max ? tau : below_max;
    } else {
      B += v;
      above_min = tau < above_min ? tau : above_min;
    }
  }
  PYADVK_HOST_DEVICE void merge(const ProbeSums& o) {
    A += o.A;
    B += o.B;
    V += o.V;
    n += o.n;
    below_max = o.below_max > below_max ? o.below_max : below_max;
    above_min = o.above_min < above_min ? o.above_min : above_min;
  }
};

// The bisection of one row, driven by the body: start() with |r| and the sums at t = inf and t = 0,
// then while !done: t = probe(), one pass for ProbeSums at t, update(t, sums). tau() is the answer.
struct BoundarySearch {
  double target;      // |r|
  double lo_t, hi_t;  // the bracket: g(lo_t) < |r| <= g(hi_t)
  double A, B;        // the partition at lo_t
  double A_hi, B_hi;  // the partition at hi_t
  int64_t lo_n;  // the partition's size at lo_t
  int probes;
  bool done;
  bool decided;  // start() decided the answer without a search: fixed
  double fixed;  // NaN (a NaN row), inf (w = 0, or the hyperplane misses the box) or 0 (r = 0)

  PYADVK_HOST_DEVICE void start(double r_abs, const ProbeSums& at_inf, const ProbeSums& at_zero) {
    target = r_abs;
    probes = 0;
    done = decided = true;
    A = 0.0;
    B = 0.0;
    A_hi = B_hi = 0.0;
    lo_t = hi_t = 0.0;
    lo_n = 0;
    const double total = at_inf.V + at_inf.B;
    fixed = target;  // NaN
    if (target != target) return;
    fixed = __builtin_huge_val();
    if (!(total > 0) || at_inf.A < target) return;
    fixed = 0.0;
    if (target == 0) return;
    decided = false;
    lo_t = 0.0;
    A = at_zero.A;
    B = at_zero.B;
    lo_n = at_zero.n;
    hi_t = at_inf.below_max;
    A_hi = at_inf.A;  // every breakpoint <= hi_t: g(hi_t) = g(inf)
    B_hi = 0.0;
    done = lo_n == at_inf.n || A + at_zero.above_min * B >= target;
  }

  PYADVK_HOST_DEVICE double midpoint() const { return lo_t + 0.5 * (hi_t - lo_t); }

  // The next probe: the middle of [tangent crossing, chord crossing] within (lo, hi), else of [lo, hi].
  PYADVK_HOST_DEVICE double probe() const {
    const double g_lo = A + lo_t * B, g_hi = A_hi + hi_t * B_hi;
    const double tangent = lo_t + (target - g_lo) / B;  // B > 0 while searching
    const double chord = g_hi > g_lo ? lo_t + (target - g_lo) * ((hi_t - lo_t) / (g_hi - g_lo)) : hi_t;
    const double t = 0.5 * ((tangent > lo_t ? tangent : lo_t) + (chord < hi_t ? chord : hi_t));
    return (t > lo_t && t < hi_t) ? t : midpoint();
  }

  PYADVK_HOST_DEVICE void update(double t, const ProbeSums& p) {
    probes += 1;
    if (p.A + t * p.B < target) {
      lo_t = t;
      A = p.A;
      B = p.B;
      lo_n = p.n;
      done = p.A + p.above_min * p.B >= target;  // the crossing lies before the next breakpoint
    } else {
      hi_t = t;
      A_hi = p.A;
      B_hi = p.B;
      if (p.n > lo_n && p.A + p.below_max * p.B < target) {
        A = p.A;  // the crossing lies after the last breakpoint below t: the partition at t
        B = p.B;
        lo_n = p.n;
        done = true;
      } else {
        done = p.n == lo_n;
      }
    }
    const double mid = midpoint();
    done = done || probes >= kMaxProbes || mid <= lo_t || mid >= hi_t;
  }

  PYADVK_HOST_DEVICE double tau() const {
    if (decided) return fixed;
    return B > 0 ? (target - A) / B : __builtin_huge_val();
  }
};

}  // namespace boundary

// Checks every argument of a boundary projection (rows as the Python wrapper passes them).
inline void check_boundary_projection(const char* op, at::DeviceType device, const at::Tensor& x,
                                      const at::Tensor& w, const at::Tensor& b, double lower, double upper,
                                      c10::string_view norm) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be a ", device, " tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": x must be float32 or float64, got ", dtype);
  TORCH_CHECK(x.dim() == 2, op, ": x must be (R, D) rows, got shape ", x.sizes());
  TORCH_CHECK(w.scalar_type() == dtype && b.scalar_type() == dtype, op, ": w and b must have the dtype of x (",
              dtype, "), got ", w.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous (the Python wrapper converts it)");
  check_like(op, "w", w, "x", x, at::MemoryFormat::Contiguous);
  TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(0), op, ": b must have shape (", x.size(0), ",), got ",
              b.sizes());
  TORCH_CHECK(b.device() == x.device(), op, ": b must be on ", x.device(), ", got ", b.device());
  TORCH_CHECK(b.is_contiguous(), op, ": b must be contiguous");
  TORCH_CHECK(lower <= upper, op, ": lower must be <= upper, got lower=", lower, ", upper=", upper);
  TORCH_CHECK(norm == "l2" || norm == "linf", op, ": norm must be 'l2' or 'linf', got '", norm, "'");
}

}  // namespace pyadvk
