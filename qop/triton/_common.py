"""Helpers shared by the Triton kernels: code-book lookup, nearest-code search, exact float math, launch.

Nothing here registers anything; ``qop/triton/__init__.py`` does.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch
import triton
import triton.language as tl

from .._schema import MIX32_MULTIPLIERS

try:  # TRITON_INTERPRET=1 makes @triton.jit return an InterpretedFunction
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - very old Triton
    InterpretedFunction = ()  # type: ignore[assignment,misc]

#: Entries of a dynamic map; 8 halvings of 256 find the nearest one.
CODE_SIZE: tl.constexpr = tl.constexpr(256)
#: Gather code-book entries from a register copy loaded once per program (tl.gather) rather than
#: from global memory; set QOP_TRITON_GATHER=0 to fall back to L1-cached global loads.
GATHER = os.environ.get("QOP_TRITON_GATHER", "1") != "0"


# ------------------------------------------------------------------------------------------ jit math
@triton.jit
def _div(a, b):
    """IEEE round-to-nearest division (Triton's ``/`` is approximate); broadcasts like ``/``."""
    a, b = tl.broadcast(a, b)
    return tl.div_rn(a, b)


@triton.jit
def _pow(base, t):
    """``base ** t`` correctly rounded to float32 (log/exp in float64, as exact as torch's powf)."""
    return tl.exp(t.to(tl.float64) * tl.log(base.to(tl.float64))).to(tl.float32)


@triton.jit
def _log(x):
    """Natural log correctly rounded to float32 (Triton's float32 log is approximate)."""
    return tl.log(x.to(tl.float64)).to(tl.float32)


@triton.jit
def _exp(x):
    """Exponential correctly rounded to float32 (Triton's float32 exp is approximate)."""
    return tl.exp(x.to(tl.float64)).to(tl.float32)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in DTYPE, like torch's ``.to()``.

    bfloat16 is rounded on the bits: the same as the GPU's cvt.rn, and also exact under the
    interpreter, whose bfloat16 cast truncates.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, rounded, x.to(tl.bfloat16))  # NaN stays NaN
    else:
        return x.to(DTYPE)


_MIX32_A = tl.constexpr(MIX32_MULTIPLIERS[0])
_MIX32_B = tl.constexpr(MIX32_MULTIPLIERS[1])


@triton.jit
def _mix32(x):
    """The "lowbias32" hash of uint32 ``x`` (``reference.mix32``)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), _MIX32_A, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), _MIX32_B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _sr_key(seed, t):
    """The per-tensor key of stochastic rounding at step ``t`` (float32 whole numbers, as ``reference.sr_bits``)."""
    return _mix32(seed.to(tl.int64).to(tl.uint32) ^ _mix32(t.to(tl.int64).to(tl.uint32)))


@triton.jit
def _stochastic_round_bf16(x, key, index):
    """float32 ``x`` rounded stochastically to bfloat16 (``reference.stochastic_round_bf16``): its bits plus the 16
    random bits of element ``index`` (int64, taken mod 2^32), cut to the top 16; NaN becomes 0x7FC0."""
    r = _mix32(index.to(tl.uint32) ^ key) >> 16
    top = (x.to(tl.uint32, bitcast=True) + r) >> 16
    top = tl.where(x == x, top, 0x7FC0)
    return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)


# ------------------------------------------------------------------------------------- code books
@triton.jit
def _code_book(code_ptr):
    """The 256 code values, their 255 midpoints (slot 255 unused) and the book's floor, once per program.

    The floor is the smallest code of a positive value (``reference.unsigned_floor``): the number of
    zero entries of an unsigned book (no entry negative or NaN, some positive), else 0.
    """
    r = tl.arange(0, CODE_SIZE)
    code = tl.load(code_ptr + r)
    upper = tl.load(code_ptr + r + 1, mask=r < CODE_SIZE - 1, other=0.0)
    negative = tl.sum((~(code >= 0.0)).to(tl.int32), axis=0)
    positive = tl.sum((code > 0.0).to(tl.int32), axis=0)
    zeros = tl.sum((code == 0.0).to(tl.int32), axis=0)
    floor = tl.where((negative == 0) & (positive > 0), zeros, 0)
    return code, 0.5 * (code + upper), floor


@triton.jit
def _lookup(table, table_ptr, idx, GATHER: tl.constexpr):
    """``table[idx]`` for an int32 index tensor of any shape."""
    if GATHER:
        flat = tl.gather(table, tl.reshape(idx, (idx.numel,)), 0)
        return tl.reshape(flat, idx.shape)
    else:
        return tl.load(table_ptr + idx)


@triton.jit
def _mid(mids, code_ptr, idx, GATHER: tl.constexpr):
    """Midpoint ``0.5 * (code[idx] + code[idx + 1])``."""
    if GATHER:
        return _lookup(mids, code_ptr, idx, GATHER)
    else:
        return 0.5 * (tl.load(code_ptr + idx) + tl.load(code_ptr + idx + 1))


@triton.jit
def _nearest(x, mids, code_ptr, GATHER: tl.constexpr):
    """Index of the code nearest to x: the number of midpoints strictly below x (ties go down).

    Branchless binary search: 8 steps of 128, 64, ..., 1 over the sorted midpoints.
    """
    pos = tl.zeros(x.shape, tl.int32)
    for k in tl.static_range(8):
        step = tl.constexpr(128) >> k
        below = _mid(mids, code_ptr, pos + (step - 1), GATHER) < x
        pos = tl.where(below, pos + step, pos)
    return pos


@triton.jit
def _encode(x, scale, mids, floor, code_ptr, GATHER: tl.constexpr):
    """Codes of x in blocks of absmax ``scale``: the nearest code to ``x / scale``, at least ``floor``
    where x > 0 (the one place of the unsigned books' rule, as ``reference.encode``); a NaN quotient
    (x NaN, or +-inf over an infinite absmax) takes the last code, as torch.searchsorted puts it."""
    y = _div(x, scale)
    q = _nearest(y, mids, code_ptr, GATHER)
    q = tl.where(y != y, CODE_SIZE - 1, q)
    return tl.where(x > 0, tl.maximum(q, floor), q)


@triton.jit
def _nan_max(a, b):
    """``torch.maximum``: NaN when either is NaN (tl.maximum may return the other operand)."""
    return tl.where((a != a) | (b != b), a + b, tl.maximum(a, b))


@triton.jit
def _row_absmax(x):
    """max |x| of each row of a 2-D tile, NaN for a row holding a NaN (torch.amax)."""
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    return tl.where(has_nan, float("nan"), tl.max(tl.abs(x), axis=1))


# ------------------------------------------------------------------------------------------ launch
def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` (a jit function or an autotuner around one) runs in the interpreter."""
    while hasattr(kernel, "fn") and not isinstance(kernel, InterpretedFunction):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def tuning_size(n) -> int:
    """The autotuning key of an element count: its bit length (symbolic sizes share one bucket)."""
    return int(n).bit_length() if isinstance(n, int) else 0


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_best: dict[tuple, triton.Config] = {}
_best_lock = threading.Lock()


def launch(tuner: Any, grid: tuple, key: tuple, device: torch.device, config: dict | None, **kwargs: Any) -> None:
    """Launch an autotuned kernel eagerly.

    ``config`` (``{"BLOCK": ..., "num_warps": ...}``) bypasses tuning.  Under the interpreter the
    first config is used (there is nothing to time), and during CUDA-graph capture the config found
    by an earlier eager call (or the first one) is used, since benchmarking cannot be captured.
    """
    if config is None and (is_interpreted(tuner) or capturing(device)):
        with _best_lock:
            best = _best.get(key)
        config = (best or tuner.configs[0]).all_kwargs()
    if config is not None:
        tuner.fn[grid](**kwargs, **config)
        return
    tuner[grid](**kwargs)
    with _best_lock:
        _best[key] = tuner.best_config
