"""Typed wrappers over ``torch.ops.qop``: what users and the optimizer engine call."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _schema
from ._schema import BLOCKSIZE


def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int = BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Quantize ``A`` to uint8 indices into ``code`` with one float32 absmax per block."""
    return torch.ops.qop.quantize_blockwise(A, code, blocksize)


def dequantize_blockwise(
    A: Tensor, absmax: Tensor, code: Tensor, blocksize: int = BLOCKSIZE, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[A] * absmax[block]`` in ``dtype``."""
    return torch.ops.qop.dequantize_blockwise(A, absmax, code, blocksize, dtype)


step = _schema.forwarder(
    "step",
    torch.ops.qop.step.default,
    """One fused optimizer step over a list of tensors.

``states``: k states x n tensors in one flat list (state j of tensor i at ``j * n + i``), float32 or blockwise
8-bit (uint8, then ``absmax`` flat like ``states`` and ``codes`` one code book per state; both empty otherwise).
""",
    __name__,
)


def percentile_clip(
    grads: Sequence[Tensor],
    gnorm_vecs: Sequence[Tensor],
    steps: Sequence[Tensor],
    percentile: int,
    prescale: Tensor,
) -> Tensor:
    """Percentile clipping of a list of gradients: records each norm in its history, returns the factors."""
    return torch.ops.qop.percentile_clip(grads, gnorm_vecs, steps, percentile, prescale)
