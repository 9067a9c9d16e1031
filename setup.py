"""Build of pyadvk: the Python package, the Triton kernels (kernels/ -> pyadvk.kernels) and the
compiled extension pyadvk._C.

The C++ CPU bodies are always built. The CUDA bodies are built when torch is a CUDA build and a
CUDA toolkit is found (torch.version.cuda and CUDA_HOME); whether a GPU is visible does not matter.
Environment switches:
  PYADVK_SKIP_EXTENSION=1  build no compiled extension (pure Python install; see PYADVK_JIT)
  PYADVK_SKIP_CUDA=1       build the CPU bodies only
  PYADVK_FORCE_CUDA=1      fail instead of silently skipping the CUDA bodies
Install with `pip install --no-build-isolation -e .` so the build uses the torch it runs with.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def extensions():
    if _flag("PYADVK_SKIP_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("PYADVK_FORCE_CUDA") and not have_cuda:
        raise RuntimeError(
            f"PYADVK_FORCE_CUDA=1 but torch {torch.__version__} has CUDA {torch.version.cuda} and "
            f"CUDA_HOME is {CUDA_HOME}: a CUDA build of torch and a CUDA toolkit are both needed"
        )
    use_cuda = have_cuda and not _flag("PYADVK_SKIP_CUDA")
    # No contraction of a * b + c into one FMA: the bodies follow the torch body's float32
    # operations one rounding at a time (a fused multiply-add moves results by an ulp, and by far
    # more where a large step cancels: tests/test_l2_cancellation.py). Triton launches ask the same
    # (kernels/_common.py, unfused). -fno-trapping-math changes no result (nothing reads the FP
    # exception flags) but lets GCC vectorize loops with a select next to a float/double conversion
    # (the l2 steps' unit step g/|g| in double), which it otherwise keeps scalar: measured 134 ms for
    # the cpp l2 pgd_step_ at 256x3x224x224 on the 2-core AVX-512 VM before the flag.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    kwargs = dict(
        name="pyadvk._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if use_cuda:
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx + ["-DPYADVK_WITH_CUDA"],
                "nvcc": ["-O3", "-DPYADVK_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"],
            },
            **kwargs,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="pyadvk",
    version="0.1.0",
    description="Fused kernels for adversarial robustness and interpretability in PyTorch",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pyadvk", "pyadvk.*"]) + ["pyadvk.kernels"],
    package_dir={"pyadvk.kernels": "kernels"},
    install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "ninja", "pybind11"],
        # Peer libraries timed by benchmarks/bench_attack.py when installed (never needed by the
        # package or the tests; torchattacks pulls torchvision, which may want another torch).
        "peers": ["torchattacks", "foolbox"],
        # pyadvk.integrations.lightning (a robust-accuracy callback, an adversarial training_step)
        "lightning": ["lightning>=2.0"],
    },
    package_data={"pyadvk": ["py.typed"]},
    entry_points={"console_scripts": ["pyadvk=pyadvk.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
