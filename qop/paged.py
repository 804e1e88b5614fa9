"""Paged optimizer states: tensors in CUDA unified (managed) memory, and prefetching them.

Managed memory can be paged out to host memory by the driver when the GPU runs short and migrates
back on access; :func:`prefetch` moves it back ahead of a step, asynchronously on the current stream.
The allocation and the prefetch come from the small CUDA-runtime extension ``qop._C_cuda``
(``csrc/cuda/paged.cpp``, ops ``torch.ops.qop_paged.*``).  Everywhere else (CPU tensors, a build
without CUDA or nvcc) the functions fall back to ordinary tensors and no-ops, so callers never branch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def _load_extension() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from . import _C_cuda  # type: ignore[attr-defined]  # noqa: F401  (registers torch.ops.qop_paged.*)
    except ImportError:
        return False
    return True


#: Whether managed allocations are available (CUDA present and qop._C_cuda built).
HAS_PAGED = _load_extension()

if HAS_PAGED:

    @torch.library.register_fake("qop_paged::managed_empty")
    def _managed_empty_fake(size, dtype, device):
        return torch.empty(size, dtype=dtype, device=device)

    @torch.library.register_fake("qop_paged::prefetch")
    def _prefetch_fake(tensors, to_host=False):
        return None


_warned = False


def _size(shape: int | Sequence[int] | torch.Size) -> list[int]:
    return [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]


def paged_empty(
    shape: int | Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """An uninitialised tensor in managed memory on a CUDA ``device``; an ordinary one elsewhere.

    Raises RuntimeError when the GPU has less free memory than the tensor needs.
    """
    global _warned
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        if HAS_PAGED:
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            return torch.ops.qop_paged.managed_empty(_size(shape), dtype, device)
        if not _warned:
            _warned = True
            warnings.warn(
                "qop: the paging extension qop._C_cuda is not built; paged states are ordinary "
                "CUDA tensors (rebuild with CUDA and nvcc present to page them)",
                stacklevel=2,
            )
    return torch.empty(_size(shape), dtype=dtype, device=device)


def paged_zeros(
    shape: int | Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """Like :func:`paged_empty`, filled with zeros."""
    return paged_empty(shape, dtype, device).zero_()


def is_paged(t: Tensor) -> bool:
    """Whether ``t`` lives in managed memory."""
    return HAS_PAGED and t.is_cuda and bool(torch.ops.qop_paged.is_managed(t))


def prefetch(tensors: Iterable[Tensor], to_host: bool = False) -> None:
    """Migrate the managed tensors among ``tensors`` to their GPU (or to the host) asynchronously.

    A no-op for every other tensor, without the extension, and while a CUDA graph is being captured.
    """
    if not HAS_PAGED:
        return
    cuda = [t for t in tensors if t is not None and t.is_cuda]
    if cuda:
        torch.ops.qop_paged.prefetch(cuda, to_host)


__all__ = ["HAS_PAGED", "is_paged", "paged_empty", "paged_zeros", "prefetch"]
