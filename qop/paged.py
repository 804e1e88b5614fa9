"""Paged (CUDA unified memory) state buffers; ordinary tensors elsewhere. (placeholder, see qop.triton owner)"""

from __future__ import annotations

import torch


def paged_zeros(shape, dtype, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def prefetch(tensors) -> None:
    return None
