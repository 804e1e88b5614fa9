"""Fake (meta) kernels of the ``qop`` ops: shapes and dtypes only, with the shared argument checks.

Installed as ``qop.meta``; ``qop/__init__.py`` imports it so FakeTensor tracing (torch.compile,
opcheck) never runs a real kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qop import _checks, _schema


@torch.library.register_fake("qop::quantize_blockwise")
def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    _checks.check_quantize(A, code, blocksize)
    nblocks = -(-A.numel() // blocksize)
    return torch.empty_like(A, dtype=torch.uint8), A.new_empty((nblocks,), dtype=torch.float32)


@torch.library.register_fake("qop::dequantize_blockwise")
def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    _checks.check_dequantize(A, absmax, code, blocksize, dtype)
    return torch.empty_like(A, dtype=dtype)


def _check_step(*args: object) -> None:
    _checks.check_step(*args)  # type: ignore[arg-type]


# the fake of the step op: its checks only (it returns nothing), with the op's signature
torch.library.register_fake("qop::step")(
    _schema.forwarder("step", _check_step, "Fake ``qop::step``: the shared argument checks, no output.")
)


@torch.library.register_fake("qop::percentile_clip")
def percentile_clip(grads, gnorm_vecs, steps, percentile, prescale) -> Tensor:
    _checks.check_percentile_clip(grads, gnorm_vecs, steps, percentile, prescale)
    return prescale.new_empty((len(grads),), dtype=torch.float32)
