"""The state formats an optimizer keeps, named by ``optim_bits``: what each value means and how its states are made.

``optim_bits`` is 32 (float32 states), 16 (bfloat16 states), 8 (blockwise 8-bit, 256-entry dynamic maps), 4
(packed 4-bit, 16-entry books) or ``"fp8"`` (float8_e4m3fn with per-block scales).  The blockwise formats apply
to tensors of at least ``min_8bit_size`` elements, smaller ones keep float32 states; bfloat16 applies to every
tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .. import reference
from .._maps import code_book
from .._schema import (
    CODE_SIZE,
    FORMAT_BLOCKSIZE,
    FORMAT_RULES,
    FP8_MAX,
    FP8_MIN_ABSMAX,
    Rule,
    StateFormat,
    state_format,
    state_numel,
)

#: ``optim_bits`` value -> the format of the states it makes.
FORMATS: dict[Any, StateFormat] = {
    32: StateFormat.FLOAT32,
    16: StateFormat.BFLOAT16,
    8: StateFormat.BLOCKWISE8,
    4: StateFormat.BLOCKWISE4,
    "fp8": StateFormat.FP8,
}
#: The dtype of the states of the formats that keep values (the others keep codes).
VALUE_DTYPES = {StateFormat.FLOAT32: torch.float32, StateFormat.BFLOAT16: torch.bfloat16}
#: Bits of the code books of each format that has them.
BOOK_BITS = {StateFormat.BLOCKWISE8: 8, StateFormat.BLOCKWISE4: 4}


def check_optim_bits(bits: Any, rule: Rule | None = None) -> None:
    """``optim_bits`` must name a format (that serves ``rule``, when given); the error names the argument."""
    if isinstance(bits, bool) or bits not in FORMATS:
        raise ValueError(f"qop: optim_bits must be one of {', '.join(map(repr, FORMATS))}, got {bits!r}")
    rules = FORMAT_RULES.get(FORMATS[bits])
    if rule is not None and rules is not None and rule not in rules:
        raise ValueError(f"qop: optim_bits={bits!r} serves the Adam family only (rule {rule.name}), got it here")


def low_bit(bits: Any, numel: int, min_size: int) -> StateFormat:
    """The format of a tensor of ``numel`` elements for ``optim_bits=bits``: small tensors keep float32 states
    instead of blockwise ones."""
    fmt = FORMATS[bits]
    return fmt if fmt in VALUE_DTYPES or numel >= min_size else StateFormat.FLOAT32


def books(fmt: StateFormat, signed: tuple[bool, ...], device: torch.device) -> list[Tensor]:
    """The code books of format ``fmt``, one per state (none for formats without them)."""
    bits = BOOK_BITS.get(fmt)
    return [] if bits is None else [code_book(s, bits, device) for s in signed]


def format_of(state: dict[str, Any], numel: int, expected: StateFormat) -> StateFormat:
    """The format of a parameter's live states (``expected``: what the optimizer would make, deciding only where
    the stored tensors cannot tell 8-bit from 4-bit, a tensor of at most two elements)."""
    s = state.get("state1")
    if s is None:
        return StateFormat.FLOAT32
    if "absmax1" not in state:
        return StateFormat.BFLOAT16 if s.dtype == torch.bfloat16 else StateFormat.FLOAT32
    if s.dtype != torch.uint8:
        fmt = state_format(s.dtype)
        assert fmt is not None
        return fmt
    if s.numel() != numel:  # 4-bit codes: two per byte (plus one for an odd head of a shard, see _distributed)
        return StateFormat.BLOCKWISE4
    return expected if numel <= 2 and expected in CODE_SIZE else StateFormat.BLOCKWISE8


def new_state(
    fmt: StateFormat,
    like: Tensor,
    init: float,
    code: Tensor | None,
    zeros: Any,
    j: int = 0,
    entries: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """A fresh blockwise state (state ``j``) of ``like``'s size holding ``init`` everywhere, and its absmax (scales);
    ``zeros(shape, dtype)`` allocates (paged or not).  ``entries``: the element counts of the op entries that
    step it, each with blocks of its own (a local shard's head block, then the rest); one entry by default."""
    sizes = [like.numel()] if entries is None else list(entries)
    bs = FORMAT_BLOCKSIZE[fmt]
    shape = like.shape if fmt != StateFormat.BLOCKWISE4 else (sum(state_numel(fmt, n) for n in sizes),)
    dtype = torch.float8_e4m3fn if fmt == StateFormat.FP8 else torch.uint8
    q = zeros(shape, dtype)
    absmax = zeros((sum(-(-n // bs) for n in sizes),), torch.float32)
    if not init and fmt == StateFormat.FP8:  # zeros, each block with the floor scale (as quantize_fp8 gives)
        absmax.fill_(float(torch.tensor(FP8_MIN_ABSMAX, dtype=torch.float32) / FP8_MAX))
    elif init:
        full = [torch.full((n,), float(init), dtype=torch.float32, device=like.device) for n in sizes]
        parts = [reference.quantize_state(fmt, x, code, j) for x in full]
        q.view(-1).view(torch.uint8).copy_(torch.cat([c.view(torch.uint8) for c, _ in parts]))
        absmax.copy_(torch.cat([cast(Tensor, a) for _, a in parts]))
    return q, absmax
