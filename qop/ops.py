"""Typed wrappers over ``torch.ops.qop``: what users and the optimizer engine call."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._schema import BLOCKSIZE


def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int = BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Quantize ``A`` to uint8 indices into ``code`` with one float32 absmax per block."""
    return torch.ops.qop.quantize_blockwise(A, code, blocksize)


def dequantize_blockwise(
    A: Tensor, absmax: Tensor, code: Tensor, blocksize: int = BLOCKSIZE, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[A] * absmax[block]`` in ``dtype``."""
    return torch.ops.qop.dequantize_blockwise(A, absmax, code, blocksize, dtype)


def step_32bit(
    rule: int,
    flags: int,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor],
    hp: Tensor,
    gscale: Tensor | None = None,
    found_inf: Tensor | None = None,
    unorm: Tensor | None = None,
) -> None:
    """One fused step over a list of tensors with float32 states (``states``: up to three lists)."""
    s1, s2, s3 = [*states, [], [], []][:3]
    torch.ops.qop.step_32bit(rule, flags, params, grads, s1, s2, s3, steps, hp, gscale, found_inf, unorm)


def step_8bit(
    rule: int,
    flags: int,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    absmax: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor],
    hp: Tensor,
    codes: Sequence[Tensor],
    gscale: Tensor | None = None,
    found_inf: Tensor | None = None,
    unorm: Tensor | None = None,
) -> None:
    """One fused step over a list of tensors with blockwise 8-bit states and their code books."""
    s1, s2, s3 = [*states, [], [], []][:3]
    a1, a2, a3 = [*absmax, [], [], []][:3]
    c1, c2, c3 = [*codes, codes[0], codes[0], codes[0]][:3]
    torch.ops.qop.step_8bit(rule, flags, params, grads, s1, s2, s3, a1, a2, a3, steps, hp, c1, c2, c3,
                            gscale, found_inf, unorm)


def percentile_clip(
    grads: Sequence[Tensor], gnorm_vecs: Sequence[Tensor], steps: Sequence[Tensor], percentile: int,
    prescale: Tensor,
) -> Tensor:
    """Percentile clipping of a list of gradients: records each norm in its history, returns the factors."""
    return torch.ops.qop.percentile_clip(grads, gnorm_vecs, steps, percentile, prescale)
