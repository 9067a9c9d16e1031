// Runtime choice of the CPU instruction set for the cpp bodies.
//
// The hot loops (csrc/cpu/*_kernels.inc) are compiled once per instruction set, each copy in its
// own namespace (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp), and the host code
// calls the best copy this CPU supports. So one build runs everywhere (no -march=native) and
// still uses 256/512-bit vectors where they exist. PYADVK_CPU_ISA=default|avx2|avx512 overrides
// the choice (to test every copy, or to compare them).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYADVK_X86_ISAS 1
#else
#define PYADVK_X86_ISAS 0
#endif

namespace pyadvk {
namespace cpu {

enum class Isa { Default = 0, Avx2 = 1, Avx512 = 2 };

// The instruction set in use (detected once; PYADVK_CPU_ISA may lower it, never raise it past
// what the CPU supports).
Isa isa();
const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace pyadvk

// Declares `void NAME(const ARGS&)` in every ISA namespace and defines `NAME_dispatch`, which
// calls the copy for cpu::isa().
#if PYADVK_X86_ISAS
#define PYADVK_CPU_KERNEL(NAME, ARGS)                                  \
  namespace cpu_default { void NAME(const ARGS&); }                    \
  namespace cpu_avx2 { void NAME(const ARGS&); }                       \
  namespace cpu_avx512 { void NAME(const ARGS&); }                     \
  inline void NAME##_dispatch(const ARGS& args) {                      \
    switch (::pyadvk::cpu::isa()) {                                    \
      case ::pyadvk::cpu::Isa::Avx512: cpu_avx512::NAME(args); break;  \
      case ::pyadvk::cpu::Isa::Avx2: cpu_avx2::NAME(args); break;      \
      default: cpu_default::NAME(args);                                \
    }                                                                  \
  }
#else
#define PYADVK_CPU_KERNEL(NAME, ARGS)               \
  namespace cpu_default { void NAME(const ARGS&); } \
  inline void NAME##_dispatch(const ARGS& args) { cpu_default::NAME(args); }
#endif
