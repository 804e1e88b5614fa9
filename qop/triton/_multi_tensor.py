"""Device metadata of a multi-tensor launch, in the spirit of apex ``multi_tensor_apply``.

One launch updates every tensor of a call.  The host describes the call once, in device memory:

* ``table``  int64 ``[n, N_SLOTS]``: per tensor the addresses of param, grad, three states, three
  absmax vectors and the step counter (0 where absent), then its element count;
* ``chunks`` int64 ``[n_chunks, 2]``: per program the tensor it works on and the first element of its
  chunk.  Chunks hold ``chunk`` elements, a multiple of the 256-element block, so no 8-bit block
  straddles two programs or two tensors; every tensor has at least one chunk (empty ones too, whose
  single program only advances the step counter);
* ``work``   int32 ``[1 + n]``: a dry-run flag (set only while the autotuner times configs) and one
  chunk counter per tensor: the last program of a tensor to finish resets it to 0;
* ``norms``  float64 ``[n, 2]``: the update-norm clip's sums of u^2 and p^2, reset to 0 the same way
  (float64 like the reference's and the C++ kernel's: float32 squares overflow or vanish at extremes).

Descriptions are cached per (device, chunk, addresses, sizes), so a step that sees the same tensors
again (every step of a training loop, and every replay of a captured CUDA graph) reuses the same
device buffers and copies nothing: the buffers are stable device memory that a graph can replay.
A description built while a CUDA graph is being captured is copied from a pinned host buffer that it
keeps alive (the copy becomes a node of the graph) and is kept for that graph only, never reused by
eager calls, because its device buffers are filled only when the graph replays.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._schema import BLOCKSIZE
from ._common import capturing

#: Elements per program: a multiple of BLOCKSIZE (no 8-bit block straddles programs), large enough to
#: amortise the per-program prologue, small enough to spread a 16M-element tensor over ~1000 programs.
CHUNK = 64 * BLOCKSIZE

SLOT_P, SLOT_G, SLOT_S1, SLOT_S2, SLOT_S3, SLOT_A1, SLOT_A2, SLOT_A3, SLOT_STEP, SLOT_NUMEL = range(10)
N_SLOTS = 10
#: The same, as constexprs for the kernels that read the table.
K_SLOT_P, K_SLOT_G, K_SLOT_S1, K_SLOT_A1, K_SLOT_STEP, K_SLOT_NUMEL, K_N_SLOTS = (
    tl.constexpr(v) for v in (SLOT_P, SLOT_G, SLOT_S1, SLOT_A1, SLOT_STEP, SLOT_NUMEL, N_SLOTS)
)
#: Descriptions kept; a training loop needs one per param group (more when grads move between steps).
CACHE_SIZE = 64
#: Byte alignment that lets the kernel vectorize loads through addresses read from the table.
ALIGN = 16


@dataclass
class Metadata:
    table: Tensor
    chunks: Tensor
    work: Tensor
    norms: Tensor
    n_chunks: int
    #: every address is 16-byte aligned and every size a multiple of 16: the kernel may assume both
    aligned: bool
    host: Tensor  # source of the table copy, kept alive for CUDA-graph replays


@triton.jit
def load_slot(row_ptr, SLOT: tl.constexpr, like, ALIGNED: tl.constexpr):
    """Address in slot SLOT of a table row, typed like the kernel argument ``like``."""
    ptr = tl.load(row_ptr + SLOT).to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:  # on the pointer: the hint does not survive the int -> pointer cast
        ptr = tl.multiple_of(ptr, 16)
    return ptr


_cache: OrderedDict[tuple, Metadata] = OrderedDict()
_captured: list[Metadata] = []
_lock = threading.Lock()


def n_programs(numel: int, chunk: int) -> int:
    """Programs (chunks) of one tensor: at least one, so that even an empty tensor's step advances."""
    return torch.sym_max(1, (numel + chunk - 1) // chunk)


def _numel(p: Tensor | None) -> int:
    assert p is not None  # every row has its parameter
    return p.numel()


def metadata(rows: list[list[Tensor | None]], chunk: int = CHUNK) -> Metadata:
    """The cached description of a call; ``rows[i]`` holds tensor i's slots SLOT_P .. SLOT_STEP."""
    if chunk <= 0 or chunk % BLOCKSIZE:
        raise ValueError(f"qop: chunk must be a positive multiple of {BLOCKSIZE}, got {chunk}")
    first = rows[0][SLOT_P]
    assert first is not None  # every row has its parameter
    device = first.device
    ptrs = [[0 if t is None else t.data_ptr() for t in row] + [_numel(row[SLOT_P])] for row in rows]
    key = (device, chunk, tuple(v for row in ptrs for v in row))
    with _lock:
        meta = _cache.get(key)
        if meta is not None:
            _cache.move_to_end(key)
            return meta
    meta = _build(ptrs, chunk, device)
    with _lock:
        if capturing(device):
            _captured.append(meta)
        else:
            _cache[key] = meta
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return meta


def _build(ptrs: list[list[int]], chunk: int, device: torch.device) -> Metadata:
    n = len(ptrs)
    table = torch.tensor(ptrs, dtype=torch.int64)
    numels = table[:, SLOT_NUMEL]
    per_tensor = torch.clamp((numels + chunk - 1) // chunk, min=1)
    owner = torch.repeat_interleave(torch.arange(n), per_tensor)
    first = torch.cumsum(per_tensor, 0) - per_tensor
    start = (torch.arange(owner.numel()) - first[owner]) * chunk
    host = torch.cat([table.reshape(-1), torch.stack([owner, start], 1).reshape(-1)])
    if device.type == "cuda":
        host = host.pin_memory()
        packed = host.to(device, non_blocking=True)
    else:  # the interpreter reads host memory directly
        packed = host
    aligned = all(v % ALIGN == 0 for row in ptrs for v in row[:SLOT_NUMEL]) and all(
        row[SLOT_NUMEL] % 16 == 0 for row in ptrs
    )
    return Metadata(
        table=packed[: n * N_SLOTS].view(n, N_SLOTS),
        chunks=packed[n * N_SLOTS :].view(-1, 2),
        work=torch.zeros(1 + n, dtype=torch.int32, device=device),
        norms=torch.zeros(n, 2, dtype=torch.float64, device=device),
        n_chunks=owner.numel(),
        aligned=aligned,
        host=host,
    )


def clear_cache() -> None:
    """Forget the cached descriptions of eager calls (those of captured graphs stay with the graphs)."""
    with _lock:
        _cache.clear()
