// The cpp bodies' hot loops for AVX2 + FMA (see cpu/isa.h).
#include "cpu/isa.h"
#include "cpu/kernels_common.h"

#if PYADVK_X86_ISAS
#pragma GCC target("avx2,fma")
namespace pyadvk {
namespace cpu_avx2 {
#include "cpu/pgd_kernels.inc"
#include "cpu/apgd_kernels.inc"
#include "cpu/half_huber_kernels.inc"
#include "cpu/power_iteration_kernels.inc"
#include "cpu/channel_stats_kernels.inc"
#include "cpu/boundary_projection_kernels.inc"
}  // namespace cpu_avx2
}  // namespace pyadvk
#endif
