"""Blockwise 8-bit quantization and dequantization of one tensor (any block size).

``_quantize_kernel``: each program takes ROWS blocks as a ``[ROWS, COLS]`` tile (COLS a power of two
>= the block size, or 1024 columns walked in a loop for larger blocks), reduces each row to its
absmax, then writes the index of the nearest code to ``x / absmax``.  ``_dequantize_kernel``: one
element per lane, ``code[q] * absmax[i // blocksize]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ._common import (
    CODE_SIZE,
    GATHER,
    _code_book,
    _encode,
    _lookup,
    _nan_max,
    _round_to,
    _row_absmax,
    is_interpreted,
    launch,
    tuning_size,
)

#: Widest tile row; larger blocks are walked in slices of this many columns.
MAX_COLS = 1024
#: Narrowest tile row: smaller blocks are padded up to it (masked), keeping tiles a sensible size.
MIN_COLS = 16


@triton.jit
def _quantize_kernel(
    a_ptr,
    code_ptr,
    q_ptr,
    absmax_ptr,
    numel,
    blocksize,
    n_blocks,
    size_class,
    COLS: tl.constexpr,
    TILE: tl.constexpr,
    GATHER: tl.constexpr,
):
    ROWS: tl.constexpr = (TILE + COLS - 1) // COLS
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_blocks
    first = rows * blocksize
    cols = tl.arange(0, COLS)
    absmax = tl.zeros((ROWS,), tl.float32)
    for c0 in range(0, blocksize, COLS):
        col = c0 + cols
        offs = first[:, None] + col[None, :]
        mask = (row_ok[:, None] & (col < blocksize)[None, :]) & (offs < numel)
        x = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        absmax = _nan_max(absmax, _row_absmax(x))
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)

    scale = tl.where(absmax > 0, absmax, 1.0)
    _, mids, floor = _code_book(code_ptr)
    for c0 in range(0, blocksize, COLS):
        col = c0 + cols
        offs = first[:, None] + col[None, :]
        mask = (row_ok[:, None] & (col < blocksize)[None, :]) & (offs < numel)
        x = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = _encode(x, scale[:, None], mids, floor, code_ptr, GATHER)
        tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_kernel(
    q_ptr, absmax_ptr, code_ptr, out_ptr, numel, blocksize, size_class, BLOCK: tl.constexpr, GATHER: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    code = tl.load(code_ptr + tl.arange(0, CODE_SIZE))
    absmax = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0)
    value = _lookup(code, code_ptr, q, GATHER) * absmax
    tl.store(out_ptr + offs, _round_to(value, out_ptr.dtype.element_ty), mask=mask)


#: First entry: the interpreter's and CUDA-graph capture's choice.  TILE elements per program.
QUANTIZE_CONFIGS = [
    triton.Config({"TILE": 2048}, num_warps=4),
    triton.Config({"TILE": 1024}, num_warps=4),
    triton.Config({"TILE": 4096}, num_warps=8),
]
DEQUANTIZE_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]
# Pure kernels (fresh outputs), so timing runs need no restoring.
_quantize = triton.autotune(QUANTIZE_CONFIGS, key=["size_class", "COLS"])(_quantize_kernel)
_dequantize = triton.autotune(DEQUANTIZE_CONFIGS, key=["size_class"])(_dequantize_kernel)


def _run(tuner, grid, key, device, traced: bool, config: dict | None, **kwargs) -> None:
    if traced and config is None and not is_interpreted(tuner):
        torch.library.wrap_triton(tuner)[grid](**kwargs)
    else:
        launch(tuner, grid, key, device, config, **kwargs)


def quantize_blockwise(
    A: Tensor, code: Tensor, blocksize: int, *, traced: bool = False, config: dict | None = None
) -> tuple[Tensor, Tensor]:
    """``qop::quantize_blockwise`` with Triton; ``traced`` launches through ``wrap_triton``."""
    _checks.check_quantize(A, code, blocksize)
    n = A.numel()
    n_blocks = (n + blocksize - 1) // blocksize
    q = torch.empty_like(A, dtype=torch.uint8)
    absmax = A.new_empty((n_blocks,), dtype=torch.float32)
    if n == 0:
        return q, absmax
    cols = max(MIN_COLS, min(triton.next_power_of_2(blocksize), MAX_COLS))

    def grid(meta):
        return (triton.cdiv(n_blocks, max(1, meta["TILE"] // cols)),)

    _run(
        _quantize,
        grid,
        ("quantize", tuning_size(n), cols, A.dtype),
        A.device,
        traced,
        config,
        a_ptr=A,
        code_ptr=code,
        q_ptr=q,
        absmax_ptr=absmax,
        numel=n,
        blocksize=blocksize,
        n_blocks=n_blocks,
        size_class=tuning_size(n),
        COLS=cols,
        GATHER=GATHER,
    )
    return q, absmax


def dequantize_blockwise(
    A: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    dtype: torch.dtype,
    *,
    traced: bool = False,
    config: dict | None = None,
) -> Tensor:
    """``qop::dequantize_blockwise`` with Triton; ``traced`` launches through ``wrap_triton``."""
    _checks.check_dequantize(A, absmax, code, blocksize, dtype)
    out = torch.empty_like(A, dtype=dtype)
    n = A.numel()
    if n == 0:
        return out

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    _run(
        _dequantize,
        grid,
        ("dequantize", tuning_size(n), dtype),
        A.device,
        traced,
        config,
        q_ptr=A,
        absmax_ptr=absmax,
        code_ptr=code,
        out_ptr=out,
        numel=n,
        blocksize=blocksize,
        size_class=tuning_size(n),
        GATHER=GATHER,
    )
    return out
