// The cpp bodies' hot loops for the baseline instruction set (see cpu/isa.h).
#include "cpu/kernels_common.h"

namespace pyadvk {
namespace cpu_default {
#include "cpu/pgd_kernels.inc"
#include "cpu/apgd_kernels.inc"
#include "cpu/half_huber_kernels.inc"
#include "cpu/power_iteration_kernels.inc"
#include "cpu/channel_stats_kernels.inc"
#include "cpu/boundary_projection_kernels.inc"
}  // namespace cpu_default
}  // namespace pyadvk
