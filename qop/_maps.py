"""The 8-bit code books ("dynamic maps") used for optimizer states."""

from __future__ import annotations

import functools

import torch

_EXPONENT_BITS = 7  # decades 1e-6 .. 1
_TOTAL_BITS = 8


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """Return the sorted 256-entry float32 dynamic map (signed: [-0.993, 1], unsigned: [0, 1]).

    Each decade 10^(i-6) holds a linear grid of bin midpoints between 0.1 and 1 (2^i of them per sign
    when signed, 2^(i+1) when unsigned), plus the values 0 and 1.
    """
    values: list[float] = []
    value_bits = _TOTAL_BITS - 1
    for i in range(_EXPONENT_BITS):
        n_edges = 2 ** (i + value_bits - _EXPONENT_BITS + (0 if signed else 1)) + 1
        edges = torch.linspace(0.1, 1, n_edges, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - (_EXPONENT_BITS - 1))
        values += (scale * mids).tolist()
        if signed:
            values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**_TOTAL_BITS - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


@functools.cache
def _cpu_map(signed: bool) -> torch.Tensor:
    return create_dynamic_map(signed)


_device_maps: dict[tuple[bool, torch.device], torch.Tensor] = {}


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The cached dynamic map on ``device`` (one copy per device, shared by every optimizer)."""
    device = torch.device(device)
    key = (signed, device)
    table = _device_maps.get(key)
    if table is None:
        table = _device_maps[key] = _cpu_map(signed).to(device)
    return table
