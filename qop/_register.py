"""Registers the reference as the kernel of every device without a native one.

CPU kernels come from the C++ extension and CUDA kernels from ``qop.triton``, each registered for its backend's
dispatch key; the checked reference is registered once, for ``CompositeExplicitAutograd``, which the dispatcher
uses for every backend without a kernel of its own.
"""

from __future__ import annotations

import warnings

import torch

from . import _checks, reference


def _checked_reference():
    """Reference kernels wrapped with the shared argument checks (the C++ and Triton paths check too)."""

    def quantize_blockwise(A, code, blocksize):
        _checks.check_quantize(A, code, blocksize)
        return reference.quantize_blockwise(A, code, blocksize)

    def dequantize_blockwise(A, absmax, code, blocksize, dtype):
        _checks.check_dequantize(A, absmax, code, blocksize, dtype)
        return reference.dequantize_blockwise(A, absmax, code, blocksize, dtype)

    def step_32bit(rule, flags, params, grads, state1, state2, state3, steps, hp, gscale, found_inf, unorm=None):
        _checks.check_step(rule, flags, params, grads, (state1, state2, state3), steps, hp, gscale,
                           found_inf, torch.float32, unorm=unorm)
        reference.step_32bit(rule, flags, params, grads, state1, state2, state3, steps, hp, gscale, found_inf,
                             unorm)

    def step_8bit(rule, flags, params, grads, state1, state2, state3, absmax1, absmax2, absmax3, steps, hp,
                  code1, code2, code3, gscale, found_inf, unorm=None):
        _checks.check_step(rule, flags, params, grads, (state1, state2, state3), steps, hp, gscale,
                           found_inf, torch.uint8, (absmax1, absmax2, absmax3), (code1, code2, code3), unorm)
        reference.step_8bit(rule, flags, params, grads, state1, state2, state3, absmax1, absmax2, absmax3,
                            steps, hp, code1, code2, code3, gscale, found_inf, unorm)

    def percentile_clip(grads, gnorm_vecs, steps, percentile, prescale):
        _checks.check_percentile_clip(grads, gnorm_vecs, steps, percentile, prescale)
        return reference.percentile_clip(grads, gnorm_vecs, steps, percentile, prescale)

    return {
        "quantize_blockwise": quantize_blockwise,
        "dequantize_blockwise": dequantize_blockwise,
        "step_32bit": step_32bit,
        "step_8bit": step_8bit,
        "percentile_clip": percentile_clip,
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
