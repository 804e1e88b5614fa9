"""Registers the reference as the kernel of every device without a native one.

CPU kernels come from the C++ extension and CUDA kernels from ``qop.triton``, each registered for its backend's
dispatch key; the checked reference is registered once, for ``CompositeExplicitAutograd``, which the dispatcher
uses for every backend without a kernel of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _checks, _schema, reference

#: Each op's argument checks and reference kernel, both taking the op's arguments in schema order.
_REFERENCE: dict[str, tuple[Callable[..., object], Callable[..., Any]]] = {
    "quantize_blockwise": (_checks.check_quantize, reference.quantize_blockwise),
    "dequantize_blockwise": (_checks.check_dequantize, reference.dequantize_blockwise),
    "step": (_checks.check_step, reference.step),
    "percentile_clip": (_checks.check_percentile_clip, reference.percentile_clip),
}


def _checked(check: Callable[..., object], kernel: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        check(*args)
        return kernel(*args)

    return run


def _checked_reference() -> dict[str, Callable[..., Any]]:
    """Reference kernels wrapped with the shared argument checks (the C++ and Triton paths check too), each with
    its op's signature (read from the schema)."""
    return {
        name: _schema.forwarder(name, _checked(check, kernel), f"Checked reference of ``qop::{name}``.")
        for name, (check, kernel) in _REFERENCE.items()
    }


_lib = torch.library.Library("qop", "IMPL")


def _register_triton() -> None:
    """Register the Triton kernels for CUDA; any failure leaves CUDA on the reference, with a warning."""
    if not torch.cuda.is_available():
        return
    try:
        from . import triton as _triton  # noqa: F401  (registers the CUDA kernels on import)
    except Exception as exc:  # a missing or broken Triton must not break `import qop`
        warnings.warn(f"qop: Triton GPU kernels unavailable ({exc!r}); CUDA ops use the reference", stacklevel=2)


_register_triton()
# One registration for every backend: a kernel registered for a backend's own key (the C++ CPU kernels, the
# Triton CUDA kernels) takes precedence over CompositeExplicitAutograd whatever the order of registration, and
# any other device (XPU, MPS, a new one) runs the reference with no change here.
for _name, _fn in _checked_reference().items():
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
