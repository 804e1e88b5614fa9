"""Fake (meta) kernels of the ``qop`` ops: shapes and dtypes only, with the shared argument checks.

Installed as ``qop.meta``; ``qop/__init__.py`` imports it so FakeTensor tracing (torch.compile,
opcheck) never runs a real kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qop import _checks


@torch.library.register_fake("qop::quantize_blockwise")
def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    _checks.check_quantize(A, code, blocksize)
    nblocks = -(-A.numel() // blocksize)
    return torch.empty_like(A, dtype=torch.uint8), A.new_empty((nblocks,), dtype=torch.float32)


@torch.library.register_fake("qop::dequantize_blockwise")
def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    _checks.check_dequantize(A, absmax, code, blocksize, dtype)
    return torch.empty_like(A, dtype=dtype)


@torch.library.register_fake("qop::step_32bit")
def step_32bit(rule, flags, params, grads, state1, state2, state3, steps, hp, gscale, found_inf, unorm=None) -> None:
    _checks.check_step(rule, flags, params, grads, (state1, state2, state3), steps, hp, gscale, found_inf,
                       torch.float32, unorm=unorm)


@torch.library.register_fake("qop::step_8bit")
def step_8bit(rule, flags, params, grads, state1, state2, state3, absmax1, absmax2, absmax3, steps, hp,
              code1, code2, code3, gscale, found_inf, unorm=None) -> None:
    _checks.check_step(rule, flags, params, grads, (state1, state2, state3), steps, hp, gscale, found_inf,
                       torch.uint8, (absmax1, absmax2, absmax3), (code1, code2, code3), unorm)


@torch.library.register_fake("qop::percentile_clip")
def percentile_clip(grads, gnorm_vecs, steps, percentile, prescale) -> Tensor:
    _checks.check_percentile_clip(grads, gnorm_vecs, steps, percentile, prescale)
    return prescale.new_empty((len(grads),), dtype=torch.float32)
