#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace pyadvk {
namespace cpu {
namespace {

Isa detect() {
#if PYADVK_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Default;
}

Isa choose() {
  const Isa best = detect();
  const char* env = std::getenv("PYADVK_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa wanted;
  if (std::strcmp(env, "default") == 0) wanted = Isa::Default;
  else if (std::strcmp(env, "avx2") == 0) wanted = Isa::Avx2;
  else if (std::strcmp(env, "avx512") == 0) wanted = Isa::Avx512;
  else TORCH_CHECK(false, "PYADVK_CPU_ISA must be default, avx2 or avx512, got '", env, "'");
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best), "PYADVK_CPU_ISA=", env,
              " but this CPU (or build) supports at most ", isa_name(best));
  return wanted;
}

}  // namespace

Isa isa() {
  static const Isa chosen = choose();
  return chosen;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace cpu
}  // namespace pyadvk
