"""Adam and AdamW (decoupled weight decay in both, as in bitsandbytes), in 32/8/4-bit, fp8 and paged forms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._schema import HP, Flag, Rule
from . import _state_dict
from ._variants import variant
from .optimizer import QopOptimizer, engine_args


class Adam(QopOptimizer):
    """Adam: m, v moments; ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with ``p *= 1 - lr * wd`` first.

    ``amsgrad=True`` keeps ``vmax = max(vmax, v)`` as a third state (8-bit with the unsigned map).
    States are 32-bit unless ``optim_bits`` is 8, 4 or ``"fp8"`` (then so for tensors of at least ``min_8bit_size``
    elements).
    """

    rule = Rule.ADAM
    hp_keys = {"lr": HP.LR, "betas": (HP.BETA1, HP.BETA2), "eps": HP.EPS, "weight_decay": HP.WEIGHT_DECAY}
    state_signed = (True, False, False)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        bf16_stochastic_round: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad))
        super().__init__(params, defaults, **engine_args(locals()))

    def flags(self, group: dict[str, Any]) -> Flag:
        return Flag.AMSGRAD if group["amsgrad"] else Flag.NONE

    def _preprocess_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Also accepts torch.optim's and torchao's Adam/AdamW state dicts (``exp_avg``, ``exp_avg_sq``,
        ``max_exp_avg_sq``): their states load as values, in this optimizer's format."""
        return _state_dict.from_torch_names(state_dict, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


@variant(defaults={"weight_decay": 1e-2})
class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay, default ``weight_decay=1e-2``."""


@variant(bits=8)
class Adam8bit(Adam):
    """8-bit Adam."""


@variant(bits=32)
class Adam32bit(Adam):
    """32-bit Adam."""


@variant(paged=True)
class PagedAdam(Adam):
    """Paged Adam (states in CUDA unified memory)."""


@variant(bits=8, paged=True)
class PagedAdam8bit(Adam):
    """8-bit paged Adam."""


@variant(bits=32, paged=True)
class PagedAdam32bit(Adam):
    """32-bit paged Adam."""


@variant(bits=8)
class AdamW8bit(AdamW):
    """8-bit AdamW."""


@variant(bits=32)
class AdamW32bit(AdamW):
    """32-bit AdamW."""


@variant(paged=True)
class PagedAdamW(AdamW):
    """Paged AdamW."""


@variant(bits=8, paged=True)
class PagedAdamW8bit(AdamW):
    """8-bit paged AdamW."""


@variant(bits=32, paged=True)
class PagedAdamW32bit(AdamW):
    """32-bit paged AdamW."""


@variant(bits=4, drop=("optim_bits",))
class Adam4bit(Adam):
    """4-bit Adam (torchao's name): packed 4-bit states in blocks of 128, for tensors of at least ``min_8bit_size``
    elements.  Weight decay is decoupled, as in every qop Adam."""


@variant(bits=4, drop=("optim_bits",))
class AdamW4bit(AdamW):
    """4-bit AdamW (torchao's name), default ``weight_decay=1e-2``."""


@variant(bits="fp8", drop=("optim_bits",))
class AdamFp8(Adam):
    """Adam with float8_e4m3fn states and one scale per 256-block (torchao's name)."""


@variant(bits="fp8", drop=("optim_bits",))
class AdamWFp8(AdamW):
    """AdamW with float8_e4m3fn states and one scale per 256-block (torchao's name), default ``weight_decay=1e-2``."""
