"""Adagrad, in 8/32-bit forms (the accumulator uses the unsigned map)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._schema import HP, Rule
from ._args import number
from ._variants import variant
from .optimizer import QopOptimizer, engine_args


class Adagrad(QopOptimizer):
    """Adagrad: ``g += wd * p``; ``s += g * g``; ``p -= clr * g / (sqrt(s) + eps)``,
    ``clr = lr / (1 + (t - 1) * lr_decay)``, ``s`` starting at ``initial_accumulator_value``.

    bitsandbytes rejects a non-zero ``lr_decay`` or ``initial_accumulator_value``; qop honours both, as
    ``torch.optim.Adagrad`` does.
    """

    rule = Rule.ADAGRAD
    hp_keys = {"lr": HP.LR, "lr_decay": HP.LR_DECAY, "weight_decay": HP.WEIGHT_DECAY, "eps": HP.EPS}
    state_signed = (False, False, False)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        bf16_stochastic_round: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
        )
        super().__init__(params, defaults, **engine_args(locals()))

    def initial_state(self, group: dict[str, Any], index: int) -> float:
        return number("initial_accumulator_value", group["initial_accumulator_value"])

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        if "initial_accumulator_value" in group:
            v = number("initial_accumulator_value", group["initial_accumulator_value"])
            if v < 0:
                raise ValueError(f"qop: initial_accumulator_value must be >= 0, got {v}")


@variant(bits=8, defaults={"optim_bits": 8})
class Adagrad8bit(Adagrad):
    """8-bit Adagrad."""


@variant(bits=32)
class Adagrad32bit(Adagrad):
    """32-bit Adagrad."""
