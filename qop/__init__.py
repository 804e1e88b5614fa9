"""qop: low-bit (8-bit, 4-bit, fp8, bfloat16) and 32-bit optimizers for PyTorch 2 from ``torch.library`` ops.

Importing qop declares the ``qop`` ops (``qop._schema``), registers their fake kernels (``qop.meta``),
the C++ CPU kernels (``qop._C``), the Triton GPU kernels (``qop.triton``, when CUDA and Triton are
present) and the pure-PyTorch reference as the fallback for every other device.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

from ._maps import create_dynamic_map, dynamic_map
from ._schema import BLOCKSIZE, HP, Flag, Rule

__version__ = "0.1.0"


def _load_meta() -> None:
    """Import the fake kernels: ``qop/meta`` in a wheel, ``meta/`` beside ``qop/`` in a source tree."""
    try:
        from . import meta  # type: ignore[attr-defined]  # noqa: F401  (meta/, installed as qop.meta)

        return
    except ImportError:
        pass
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "meta", "__init__.py")
    spec = importlib.util.spec_from_file_location(f"{__name__}.meta", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"qop: fake kernels not found (looked for qop.meta and {path})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


def _load_cpu_kernels() -> bool:
    """Import the compiled extension, whose static initializers register the CPU kernels."""
    try:
        from . import _C  # type: ignore[attr-defined]  # noqa: F401  (the compiled extension)
    except ImportError as exc:
        warnings.warn(
            f"qop: C++ CPU kernels not built ({exc}); CPU ops fall back to the slow reference. "
            "Build them with `pip install --no-build-isolation -e .`.",
            stacklevel=3,
        )
        return False
    return True


def _cpu_kernel_isa() -> str | None:
    """The build of the C++ CPU kernels chosen at import ("default", "avx2", "avx512"), or None."""
    if not HAS_CPU_KERNELS:
        return None
    from . import _C  # type: ignore[attr-defined]  # (the compiled extension)

    return str(_C.cpu_kernel_isa())


_load_meta()
HAS_CPU_KERNELS = _load_cpu_kernels()
#: Which build of the C++ CPU kernels runs: chosen once at import from
#: ``torch.backends.cpu.get_cpu_capability()`` (so ``ATEN_CPU_CAPABILITY=avx2`` or ``default`` forces a
#: lower one); ``"avx512"`` also needs AVX-512 VBMI. None without the compiled kernels.
CPU_KERNEL_ISA = _cpu_kernel_isa()

# registration needs the schema and the compiled kernels first
from . import _register, nn, ops, optim  # noqa: E402, F401

__all__ = [
    "BLOCKSIZE",
    "CPU_KERNEL_ISA",
    "HAS_CPU_KERNELS",
    "HP",
    "Flag",
    "Rule",
    "create_dynamic_map",
    "dynamic_map",
    "nn",
    "ops",
    "optim",
]
