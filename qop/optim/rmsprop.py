"""RMSprop (no momentum, not centered, as in bitsandbytes), in 8/32-bit forms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._schema import HP, Rule
from ._args import check_range, number
from ._variants import variant
from .optimizer import QopOptimizer, engine_args


class RMSprop(QopOptimizer):
    """RMSprop: ``g += wd * p``; ``s = alpha * s + (1 - alpha) * g * g``; ``p -= lr * g / (sqrt(s) + eps)``.

    ``momentum`` and ``centered`` are in the signature for compatibility; like bitsandbytes, qop raises
    ``NotImplementedError`` unless they are 0 and False.
    """

    rule = Rule.RMSPROP
    hp_keys = {"lr": HP.LR, "alpha": HP.ALPHA, "eps": HP.EPS, "weight_decay": HP.WEIGHT_DECAY}
    state_signed = (False, False, False)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        bf16_stochastic_round: bool = False,
    ) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered)
        super().__init__(params, defaults, **engine_args(locals()))

    def check_group(self, group: dict[str, Any]) -> None:
        momentum = number("momentum", group.get("momentum", 0))
        if momentum != 0:
            raise NotImplementedError(f"qop: RMSprop with momentum != 0 is not supported, got momentum={momentum}")
        if group.get("centered", False):
            raise NotImplementedError("qop: RMSprop with centered=True is not supported")
        super().check_group(group)
        check_range(group, "alpha", 0.0, 1.0)


@variant(bits=8, drop=("optim_bits",))
class RMSprop8bit(RMSprop):
    """8-bit RMSprop."""


@variant(bits=32, drop=("optim_bits",))
class RMSprop32bit(RMSprop):
    """32-bit RMSprop."""
