"""The code books of the blockwise optimizer states: 8-bit dynamic maps, 4-bit signed dynamic and linear maps."""

from __future__ import annotations

import functools
import itertools
import struct
from fractions import Fraction

import torch

_EXPONENT_BITS = 7  # decades 1e-6 .. 1
_TOTAL_BITS = 8


def create_dynamic_map(
    signed: bool = True, exponent_bits: int = _EXPONENT_BITS, total_bits: int = _TOTAL_BITS
) -> torch.Tensor:
    """Return the sorted 2^total_bits-entry float32 dynamic map (8 bits, signed: [-0.993, 1], unsigned: [0, 1]).

    Each of the ``exponent_bits`` decades 10^(i-exponent_bits+1) holds a linear grid of bin midpoints between
    0.1 and 1 (2^(i+total_bits-1-exponent_bits) of them per sign when signed, twice as many when unsigned),
    plus the values 0 and 1; zeros fill what is left.  ``(True, 3, 4)`` is the 16-entry signed 4-bit map.
    """
    values: list[float] = []
    value_bits = total_bits - 1
    for i in range(exponent_bits):
        n_edges = 2 ** (i + value_bits - exponent_bits + (0 if signed else 1)) + 1
        edges = _linspace32(0.1, 1.0, n_edges)
        mids = [_f32(_f32(a + b) / 2.0) for a, b in itertools.pairwise(edges)]
        scale = _f32(10.0 ** (i - (exponent_bits - 1)))
        values += [_f32(scale * m) for m in mids]
        if signed:
            values += [_f32(-scale * m) for m in mids]
    values += [0.0, 1.0]
    if len(values) > 2**total_bits:
        raise ValueError(f"qop: {exponent_bits} exponent bits need more than {total_bits} bits")
    values += [0.0] * (2**total_bits - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def _linspace32(start: float, end: float, steps: int) -> list[float]:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as ATen's vectorized CPU builds compute it (each
    value a fused ``start + step * i``, or ``end - step * (steps - 1 - i)`` in the upper half, rounded once), in
    exact arithmetic, so that the code books do not depend on the CPU or on ``ATEN_CPU_CAPABILITY``: torch's
    baseline build rounds twice there and gives books one float32 step off bitsandbytes' tables."""
    lo, hi = _f32(start), _f32(end)
    step = _f32(_f32(hi - lo) / (steps - 1))
    half = steps // 2
    exact = [
        Fraction(lo) + Fraction(step) * i if i < half else Fraction(hi) - Fraction(step) * (steps - 1 - i)
        for i in range(steps)
    ]
    return [_f32(float(v)) for v in exact]  # each exact value fits a double: one rounding, to float32


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (float64 sums, products and quotients of float32 values, rounded
    so, are the correctly rounded float32 operations)."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def create_linear_map(total_bits: int = 4) -> torch.Tensor:
    """The zero-free linear map ``k / 2^bits, k = 1 .. 2^bits`` of 4-bit second moments (a zero second moment
    under a non-zero first one would make the update explode)."""
    n = 2**total_bits
    return torch.arange(1, n + 1, dtype=torch.float32) / n


def create_code_book(signed: bool, bits: int) -> torch.Tensor:
    """The code book of a state with ``bits`` (8 or 4) bits: signed states (first moments, momentum) take the
    signed dynamic map, unsigned ones (second moments, accumulators) the unsigned 8-bit or linear 4-bit map."""
    if bits == 8:
        return create_dynamic_map(signed)
    if bits == 4:
        return create_dynamic_map(True, 3, 4) if signed else create_linear_map(4)
    raise ValueError(f"qop: code books exist for 8 and 4 bits, got {bits}")


@functools.cache
def _cpu_map(signed: bool, bits: int) -> torch.Tensor:
    return create_code_book(signed, bits)


_device_maps: dict[tuple[bool, int, torch.device], torch.Tensor] = {}


def code_book(signed: bool, bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The cached code book of ``bits`` (8 or 4) on ``device`` (one copy per device, shared by every optimizer)."""
    device = torch.device(device)
    key = (signed, bits, device)
    table = _device_maps.get(key)
    if table is None:
        table = _device_maps[key] = _cpu_map(signed, bits).to(device)
    return table


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The cached 8-bit dynamic map on ``device``."""
    return code_book(signed, 8, device)
