"""What one call of the step op updates (a bucket of a param group), and the gradient check before it."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._schema import StateFormat


@dataclass
class Clip:
    """The tensors of a bucket clipped at one percentile: one ``qop.percentile_clip`` call."""

    percentile: int
    positions: list[int]  # in the bucket
    index: Tensor  # the same positions, on the bucket's device
    histories: list[Tensor]
    steps: list[Tensor]


@dataclass
class Bucket:
    """Tensors of one param group that one op call updates (same device, dtype and state format)."""

    fmt: StateFormat
    device: torch.device
    params: list[Tensor] = field(default_factory=list)
    states: list[list[Tensor]] = field(default_factory=list)
    absmax: list[list[Tensor]] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    codes: list[Tensor] = field(default_factory=list)
    index: list[int] = field(default_factory=list)  # positions of ``params`` in the group's params
    hp_slots: Tensor | None = None  # GlobalOptimManager overrides: hp slots and values, on the device
    hp_values: Tensor | None = None
    histories: list[Tensor | None] = field(default_factory=list)
    percentiles: list[int] = field(default_factory=list)
    clips: list[Clip] = field(default_factory=list)  # the tensors clipped, one entry per percentile
    paged: list[Tensor] = field(default_factory=list)
    shard: Any = None  # DTensor params: the bucket key's (mesh, placements), then a _distributed.ShardPlan

    def tensors(self) -> Iterable[Tensor]:
        """The optimizer's own tensors (not the params, which dynamo marks static itself)."""
        yield from itertools.chain(
            *self.states,
            *self.absmax,
            self.steps,
            self.codes,
            (t for t in self.histories if t is not None),
            (c.index for c in self.clips),
        )
        if self.hp_slots is not None and self.hp_values is not None:
            yield from (self.hp_slots, self.hp_values)


def check_grad(where: str, p: Tensor, g: Any) -> None:
    """A gradient the step op accepts for ``p`` (what its checks would refuse mid-step, refused up front)."""
    if not isinstance(g, Tensor):
        raise TypeError(f"qop: {where}.grad must be a tensor, got {type(g).__name__}")
    if g.layout != torch.strided:
        raise RuntimeError(
            f"qop: {where} (shape {tuple(p.shape)}) has a {g.layout} gradient; qop optimizers need dense gradients"
        )
    if g.shape != p.shape:
        raise RuntimeError(f"qop: {where}.grad has shape {tuple(g.shape)}, its parameter {tuple(p.shape)}")
    if g.dtype != p.dtype:
        raise RuntimeError(f"qop: {where}.grad is {g.dtype}, its parameter {p.dtype}")
    if g.device != p.device:
        raise RuntimeError(f"qop: {where}.grad is on {g.device}, its parameter on {p.device}")
