// Everything the per-ISA kernel copies include, *before* the target pragma: library code is
// compiled for the baseline instruction set; only the functions defined in the *_kernels.inc
// files after the pragma get the wider vectors. The .inc files therefore define everything they
// instantiate (no std containers) and must not include headers themselves.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "half_huber.h"
#include "apgd.h"
#include "pgd.h"
#include "power_iteration.h"
#include "channel_stats.h"
#include "boundary_projection.h"
