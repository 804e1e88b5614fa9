"""Builds qop's C++ CPU kernels (``qop._C``) and, where CUDA is present, the paging helper ``qop._C_cuda``.

The extensions expose no Python API: importing them runs their ``TORCH_LIBRARY_IMPL`` registrations.
Set ``QOP_CPU_FLAGS`` to override the ISA flags (default ``-march=native``: the wheel is built where it
runs; set e.g. ``-mavx2 -mfma`` for a portable x86-64-v3 build).
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
    isa = os.environ.get("QOP_CPU_FLAGS", "-march=native").split()
    return CppExtension(
        "qop._C",
        sorted(glob.glob("csrc/cpu/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", *isa],
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
