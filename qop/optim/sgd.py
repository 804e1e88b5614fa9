"""SGD with momentum and LARS (SGD plus the update-norm clip), in 8/32-bit forms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._schema import HP, Flag, Rule
from ._args import check_range, number
from ._variants import variant
from .optimizer import MOMENTUM_BUFFER, QopOptimizer, engine_args


class SGD(QopOptimizer):
    """SGD: ``g += wd * p``; ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g`` at the first step);
    ``p -= lr * buf`` (``lr * (g + momentum * buf)`` with ``nesterov=True``), as ``torch.optim.SGD``.

    ``momentum == 0`` (when the group is added) is plain SGD with no state. bitsandbytes rejects it and
    ignores ``dampening`` and ``nesterov``; qop honours all three.
    """

    rule = Rule.MOMENTUM
    hp_keys = {"lr": HP.LR, "momentum": HP.BETA1, "dampening": HP.DAMPENING, "weight_decay": HP.WEIGHT_DECAY}
    state_signed = (True, True, True)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        bf16_stochastic_round: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=bool(nesterov)
        )
        super().__init__(params, defaults, **engine_args(locals()))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Whether a group has state is structural (it decides the op's arguments), so it is fixed here from
        # the Python value rather than read back from the device hyper-parameter at every step.
        momentum = param_group.get("momentum", self.defaults["momentum"])
        param_group[MOMENTUM_BUFFER] = number("momentum", momentum) != 0
        super().add_param_group(param_group)

    def flags(self, group: dict[str, Any]) -> Flag:
        return Flag.NESTEROV if group["nesterov"] else Flag.NONE

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_range(group, "dampening", 0.0, 1.0)
        if group.get("nesterov"):
            momentum = number("momentum", group.get("momentum", 0))
            dampening = number("dampening", group.get("dampening", 0))
            if momentum <= 0 or dampening != 0:
                raise ValueError(
                    "qop: nesterov=True requires momentum > 0 and dampening == 0, "
                    f"got momentum={momentum}, dampening={dampening}"
                )


class LARS(SGD):
    """LARS: the SGD rule, with the update (``buf``) scaled down to ``max_unorm * ||p||`` when its norm is larger.

    bitsandbytes rejects ``momentum == 0``; qop runs it (the update is then the gradient).
    """

    hp_keys = {**SGD.hp_keys, "max_unorm": HP.MAX_UNORM}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        max_unorm: float = 0.02,
        bf16_stochastic_round: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=bool(nesterov),
            max_unorm=max_unorm,
        )
        QopOptimizer.__init__(self, params, defaults, **engine_args(locals()))

    def flags(self, group: dict[str, Any]) -> Flag:
        return super().flags(group) | Flag.UNORM_CLIP


@variant(bits=8, drop=("optim_bits",))
class SGD8bit(SGD):
    """8-bit SGD."""


@variant(bits=32, drop=("optim_bits",))
class SGD32bit(SGD):
    """32-bit SGD."""


@variant(bits=8, drop=("optim_bits",))
class LARS8bit(LARS):
    """8-bit LARS."""


@variant(bits=32, drop=("optim_bits",))
class LARS32bit(LARS):
    """32-bit LARS."""
