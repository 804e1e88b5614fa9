"""State tiles of the 4-bit and fp8 formats in the Triton step kernel (see ``_kernel._load_state``/``_store_state``).

A tile is ``(rows, ROW)`` elements, one block of the format per row (128 for 4-bit, 256 for fp8).

* 4-bit: byte ``i`` of a state holds element ``2i`` in its low nibble and ``2i + 1`` in its high one; a tile
  is loaded as ``(rows, ROW // 2)`` bytes and split/joined into nibbles, so every byte is written by one lane.
  Codes are the nearest of a 16-entry book (the count of midpoints below ``x / absmax``, as the reference's
  searchsorted), raised to the book's floor for positive values (an unsigned book with zeros).
* fp8: the states are passed as their uint8 bytes; e4m3fn is encoded and decoded with integer operations,
  rounding to nearest-even exactly as PyTorch's conversion does, so no fp8 hardware (and no Triton fp8 cast,
  whose rounding differs between targets) is involved.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._schema import FP8_MAX, FP8_MIN_ABSMAX
from ._common import _div, _row_absmax

_BOOK4 = tl.constexpr(16)
_FP8_MAX = tl.constexpr(FP8_MAX)
_FP8_MIN_ABSMAX = tl.constexpr(FP8_MIN_ABSMAX)


@triton.jit
def _byte_tile(off, rows, ROW: tl.constexpr):
    """Byte offsets of a 4-bit tile starting at element ``off`` (even), and their first elements."""
    half = tl.arange(0, ROW // 2)
    bytes_ = off // 2 + rows[:, None] * (ROW // 2) + half[None, :]
    return bytes_, 2 * bytes_


@triton.jit
def load4(s_ptr, a_ptr, code_ptr, off, rows, end, blocks, block_mask, ROW: tl.constexpr):
    """A 4-bit state tile in float32 (``(rows, ROW)``)."""
    bytes_, first = _byte_tile(off, rows, ROW)
    b = tl.load(s_ptr + bytes_, mask=first < end, other=0).to(tl.int32)
    idx = tl.reshape(tl.join(b & 15, b >> 4), (rows.shape[0], ROW))
    absmax = tl.load(a_ptr + blocks, mask=block_mask, other=0.0)
    return tl.load(code_ptr + idx) * absmax[:, None], absmax


@triton.jit
def store4(s_ptr, a_ptr, code_ptr, x, old_absmax, off, rows, mask, end, blocks, block_mask, dry, ROW: tl.constexpr):
    """Write a 4-bit state tile: per row (128-block) a fresh absmax, nearest codes, two per byte."""
    absmax = _row_absmax(tl.where(mask, x, 0.0))
    scale = tl.where(absmax > 0, absmax, 1.0)
    y = _div(x, scale[:, None])
    book = tl.load(code_ptr + tl.arange(0, _BOOK4))
    unsigned = (tl.min(book, axis=0) >= 0) & (tl.max(book, axis=0) > 0)
    floor = tl.where(unsigned, tl.sum((book == 0).to(tl.int32), axis=0), 0)
    q = tl.zeros(y.shape, tl.int32)
    for k in tl.static_range(_BOOK4 - 1):
        mid = 0.5 * (tl.load(code_ptr + k) + tl.load(code_ptr + k + 1))
        q += tl.where(mid >= y, 0, 1)  # NaN counts every midpoint, as searchsorted
    q = tl.where(x > 0, tl.maximum(q, floor), q)
    q = tl.where(mask, q, 0)  # an odd tail leaves the last high nibble 0
    lo, hi = tl.split(tl.reshape(q, (rows.shape[0], ROW // 2, 2)))
    bytes_, first = _byte_tile(off, rows, ROW)
    bmask = first < end
    old = tl.load(s_ptr + bytes_, mask=bmask, other=0)
    tl.store(s_ptr + bytes_, tl.where(dry, old, (lo | (hi << 4)).to(tl.uint8)), mask=bmask)
    tl.store(a_ptr + blocks, tl.where(dry, old_absmax, absmax), mask=block_mask)


@triton.jit
def _fp8_value(b):
    """The float32 value of e4m3fn bytes ``b`` (int32 0..255): exact, NaN for 0x7F/0xFF."""
    sign = (b & 0x80) << 24
    e = (b >> 3) & 15
    m = b & 7
    normal = ((e + 120) << 23) | (m << 20)
    sub = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # m * 2^-9, exact
    bits = tl.where((b & 0x7F) == 0x7F, 0x7FC00000, tl.where(e == 0, sub, normal))
    return (bits | sign).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_bits(x):
    """e4m3fn bytes (int32) of float32 ``x``, rounded to nearest-even as PyTorch's conversion: at or above 480 in
    magnitude NaN gives 0x7F and anything else (inf) 0x7E; below 2^-6 subnormals by one float addition."""
    bits = x.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    sub = (tl.abs(x) + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    normal = (a - 0x3C000000 + 0x7FFFF + ((a >> 20) & 1)) >> 20
    big = tl.where(a > 0x7F800000, 0x7F, 0x7E)
    r = tl.where(a >= 0x43F00000, big, tl.where(a < 0x3C800000, sub, normal))
    return r | tl.where(bits < 0, 0x80, 0)


@triton.jit
def load_fp8(s_ptr, a_ptr, offs, mask, blocks, block_mask):
    """An fp8 state tile (bytes) in float32: ``code * scale``."""
    b = tl.load(s_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(a_ptr + blocks, mask=block_mask, other=0.0)
    return _fp8_value(b) * scale[:, None], b, scale


@triton.jit
def store_fp8(s_ptr, a_ptr, x, old_b, old_scale, offs, mask, blocks, block_mask, dry, ZERO_FREE: tl.constexpr):
    """Write an fp8 state tile: per row (256-block) the scale ``max(absmax, 1e-12) / 448``, codes ``x / scale``;
    ``ZERO_FREE`` (second moments): a positive ``x`` whose code is 0 takes the smallest subnormal (byte 1)."""
    absmax = _row_absmax(tl.where(mask, x, 0.0))
    floor = tl.full(absmax.shape, _FP8_MIN_ABSMAX, tl.float32)
    top = tl.full(absmax.shape, _FP8_MAX, tl.float32)
    scale = _div(tl.where(absmax < floor, floor, absmax), top)  # NaN stays NaN, as torch.clamp
    b = _fp8_bits(_div(x, scale[:, None]))
    if ZERO_FREE:
        b = tl.where((b == 0) & (x > 0.0), 1, b)
    tl.store(s_ptr + offs, tl.where(dry, old_b, b).to(tl.uint8), mask=mask)
    tl.store(a_ptr + blocks, tl.where(dry, old_scale, scale), mask=block_mask)
