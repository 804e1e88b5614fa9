"""Benchmark workloads: parameter shapes of one big tensor, a GPT-like model and many small tensors.

Two sets: **cpu** (one 16M-element tensor, a 19M-parameter GPT-like model, 2,000 tensors of 1K-16K elements)
and **gpu** (one 2^28-element tensor, a 1.01e9-parameter GPT-like model with d=2048, 18 layers and vocab
50304, 1,000 tensors of 4K-64K elements); ``scale`` shrinks either.  Only shapes are made here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

WORKLOAD_NAMES = ("single", "transformer", "many")


@dataclass(frozen=True)
class Workload:
    """Parameter shapes of one benchmark case."""

    name: str
    description: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def n_params(self) -> int:
        """Total elements."""
        return sum(numel(s) for s in self.shapes)


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _round8(x: float) -> int:
    return max(8, round(x / 8) * 8)


def _gpt_shapes(d: int, vocab: int, ctx: int, layers: int) -> list[tuple[int, ...]]:
    """A GPT-like model's parameters: embeddings, per layer 12 tensors (qkv, out, fc1, fc2 weights and biases,
    2 layer norms), a final layer norm."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [*shapes, (d,), (d,)]


def make_workloads(scale: float = 1.0, seed: int = 0, kind: str = "cpu") -> dict[str, Workload]:
    """The three workloads: one big tensor, a transformer's parameters, many small tensors (scaled).

    ``kind`` picks the set: ``cpu`` (16M elements, 19M params, 2000 x 1K-16K) or ``gpu`` (2^28 elements,
    1.01e9 params, 1000 x 4K-64K); only shapes are made here, nothing is allocated.
    """
    if kind == "gpu":
        return _gpu_workloads(scale, seed)
    single = (max(256, int(16 * 2**20 * scale)),)
    # GPT-like: 5 layers x 12 tensors (qkv, out, fc1, fc2 weights and biases, 2 layer norms) + 4 others.
    r = scale**0.5
    d, vocab, ctx, layers = _round8(512 * r), _round8(6144 * r), _round8(1024 * r), 5
    tshapes = _gpt_shapes(d, vocab, ctx, layers)
    g = torch.Generator().manual_seed(seed)
    count = max(1, round(2000 * scale))
    many = tuple((int(n),) for n in torch.randint(1024, 16 * 1024 + 1, (count,), generator=g))
    out = [
        Workload("single", "one fp32 tensor", (single,)),
        Workload("transformer", f"GPT-like, d={d}, {layers} layers, vocab {vocab}", tuple(tshapes)),
        Workload("many", "tensors of 1K-16K elements", many),
    ]
    return {w.name: w for w in out}


def _gpu_workloads(scale: float, seed: int) -> dict[str, Workload]:
    """The gpu set: one 2^28-element tensor, a ~1B-parameter GPT, 1000 tensors of 4K-64K elements."""
    single = (max(256, int(2**28 * scale)),)
    r = scale**0.5
    d, vocab, ctx, layers = _round8(2048 * r), _round8(50304 * r), _round8(2048 * r), 18
    g = torch.Generator().manual_seed(seed)
    count = max(1, round(1000 * scale))
    many = tuple((int(n),) for n in torch.randint(4096, 64 * 1024 + 1, (count,), generator=g))
    out = [
        Workload("single", "one fp32 tensor", (single,)),
        Workload(
            "transformer",
            f"GPT-like, d={d}, {layers} layers, vocab {vocab}, ctx {ctx}",
            tuple(_gpt_shapes(d, vocab, ctx, layers)),
        ),
        Workload("many", "tensors of 4K-64K elements", many),
    ]
    return {w.name: w for w in out}
