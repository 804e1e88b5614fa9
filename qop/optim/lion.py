"""Lion, in 8/32-bit and paged forms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._schema import HP, Rule
from ._variants import variant
from .optimizer import QopOptimizer, engine_args


class Lion(QopOptimizer):
    """Lion: ``p *= 1 - lr * wd``; ``p -= lr * sign(b1 * m + (1 - b1) * g)``; then ``m = b2 * m + (1 - b2) * g``."""

    rule = Rule.LION
    hp_keys = {"lr": HP.LR, "betas": (HP.BETA1, HP.BETA2), "weight_decay": HP.WEIGHT_DECAY}
    state_signed = (True, True, True)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        bf16_stochastic_round: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, defaults, **engine_args(locals()))


@variant(bits=8, drop=("optim_bits",))
class Lion8bit(Lion):
    """8-bit Lion."""


@variant(bits=32, drop=("optim_bits",))
class Lion32bit(Lion):
    """32-bit Lion."""


@variant(paged=True, drop=("is_paged",))
class PagedLion(Lion):
    """Paged Lion (states in CUDA unified memory)."""


@variant(bits=8, paged=True, drop=("optim_bits", "is_paged"))
class PagedLion8bit(Lion):
    """8-bit paged Lion."""


@variant(bits=32, paged=True, drop=("optim_bits", "is_paged"))
class PagedLion32bit(Lion):
    """32-bit paged Lion."""
