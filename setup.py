"""Builds qop's C++ CPU kernels (``qop._C``) and, where CUDA is present, the paging helper ``qop._C_cuda``.

The extensions expose no Python API: importing them runs their ``TORCH_LIBRARY_IMPL`` registrations.
The CPU kernels are compiled once per instruction set from one source (``csrc/cpu/isa/kernels_*.cpp``
include ``csrc/cpu/qop_cpu.cpp`` under a ``#pragma GCC target``: baseline, AVX2, AVX-512) with one
portable command line, and ``csrc/cpu/register.cpp`` picks one at import from
``torch.backends.cpu.get_cpu_capability()``. ``QOP_CPU_FLAGS`` (opt-in) adds flags to every file,
e.g. ``-march=native`` for a build that then runs only on CPUs like the one that built it.
"""

from __future__ import annotations

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
#: The extensions use only the stable Python ABI (a module with no functions), so one wheel serves CPython 3.10+.
LIMITED_API = [("Py_LIMITED_API", "0x030A0000")]


def cpu_extension() -> CppExtension:
    isa = os.environ.get("QOP_CPU_FLAGS", "").split()
    return CppExtension(
        "qop._C",
        ["csrc/cpu/register.cpp", *sorted(glob.glob("csrc/cpu/isa/kernels_*.cpp"))],
        include_dirs=[os.path.join(ROOT, "csrc")],
        # -Wno-psabi: vectors passed by value never cross from one ISA's build to another (each build's
        # helpers are internal to its translation unit), so GCC's ABI-change notes do not apply
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-psabi", *isa],
        extra_link_args=["-fopenmp"],
        define_macros=LIMITED_API,
        py_limited_api=True,
    )


def cuda_extension():
    """The unified-memory helper for Paged optimizers: only with a CUDA build of torch and nvcc."""
    if torch.version.cuda is None or shutil.which("nvcc") is None or os.environ.get("QOP_NO_CUDA"):
        return None
    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension(
        "qop._C_cuda",
        sorted(glob.glob("csrc/cuda/*.cpp")),
        extra_compile_args={"cxx": ["-O2"]},
        define_macros=LIMITED_API,
        py_limited_api=True,
    )


ext_modules = [cpu_extension()]
if (cuda := cuda_extension()) is not None:
    ext_modules.append(cuda)

setup(
    packages=["qop", "qop.optim", "qop.triton", "qop.nn", "qop.bench", "qop.meta"],
    package_dir={"qop.meta": "meta"},
    package_data={"qop": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
