"""LAMB: the Adam rule plus the update-norm clip (trust ratio), in 8/32-bit forms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._schema import HP, Flag, Rule
from ._variants import variant
from .optimizer import QopOptimizer, engine_args


class LAMB(QopOptimizer):
    """LAMB: Adam's update ``u`` scaled down to ``max_unorm * ||p||`` when ``||u||`` is larger.

    ``bias_correction=False`` drops Adam's bias corrections, ``adam_w_mode=False`` turns the decoupled weight
    decay into L2 (``g += wd * p``), ``amsgrad=True`` keeps ``vmax`` as a third state. bitsandbytes accepts
    these three but ignores them; qop honours them (their defaults agree with bitsandbytes). ``block_wise``
    defaults to False as in bitsandbytes (per-tensor 8-bit states there); qop's 8-bit states are block-wise
    whatever its value.
    """

    rule = Rule.ADAM
    hp_keys = {
        "lr": HP.LR,
        "betas": (HP.BETA1, HP.BETA2),
        "eps": HP.EPS,
        "weight_decay": HP.WEIGHT_DECAY,
        "max_unorm": HP.MAX_UNORM,
    }
    state_signed = (True, False, False)
    block_wise_default = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        adam_w_mode: bool = True,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = False,
        max_unorm: float = 1.0,
        bf16_stochastic_round: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            bias_correction=bool(bias_correction),
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=bool(amsgrad),
            adam_w_mode=bool(adam_w_mode),
            max_unorm=max_unorm,
        )
        super().__init__(params, defaults, **engine_args(locals()))

    def flags(self, group: dict[str, Any]) -> Flag:
        flags = Flag.UNORM_CLIP
        if group["amsgrad"]:
            flags |= Flag.AMSGRAD
        if not group["bias_correction"]:
            flags |= Flag.NO_BIAS_CORRECTION
        if not group["adam_w_mode"]:
            flags |= Flag.L2_WEIGHT_DECAY
        return flags


@variant(bits=8, drop=("optim_bits",))
class LAMB8bit(LAMB):
    """8-bit LAMB."""


@variant(bits=32, drop=("optim_bits",))
class LAMB32bit(LAMB):
    """32-bit LAMB."""
