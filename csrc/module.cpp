// The Python module pyadvk._C. Loading it runs the TORCH_LIBRARY_IMPL registrations of every
// source file linked into it (CPU bodies always, CUDA bodies when built with PYADVK_WITH_CUDA).
#include <torch/extension.h>

#include <string>

#include "cpu/isa.h"

namespace {

bool compiled_with_cuda() {
#ifdef PYADVK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string build_info() {
#ifdef PYADVK_WITH_CUDA
  std::string info = "CPU and CUDA bodies";
#else
  std::string info = "CPU bodies only";
#endif
  info += std::string(", CPU kernels: ") + pyadvk::cpu::isa_name(pyadvk::cpu::isa());
#ifdef _OPENMP
  info += ", OpenMP " + std::to_string(_OPENMP);
#else
  info += ", no OpenMP (cpp bodies run on one thread)";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyadvk compiled bodies (registered with the dispatcher on import)";
  m.def("compiled_with_cuda", &compiled_with_cuda, "Whether the CUDA bodies were compiled in");
  m.def("build_info", &build_info, "How this library was built");
  m.def("cpu_isa", [] { return std::string(pyadvk::cpu::isa_name(pyadvk::cpu::isa())); },
        "The instruction set of the CPU kernels in use (PYADVK_CPU_ISA overrides)");
}
