"""AdEMAMix (a fast and a slow EMA of the gradient), in 8/32-bit and paged forms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .._schema import HP, Rule
from ._args import warmup_steps
from ._state_dict import BNB_QUANT_KEY
from ._variants import variant
from .optimizer import QopOptimizer, engine_args

_WARMUPS = ("t_alpha", "t_beta3")


class AdEMAMix(QopOptimizer):
    """AdEMAMix: fast EMA ``m1`` (b1), second moment ``nu`` (b2), slow EMA ``m2`` (b3); ``p *= 1 - lr * wd``;
    ``p -= lr * (m1 / c1 + alpha * m2) / (sqrt(nu) / c2 + eps)``.

    ``t_alpha`` / ``t_beta3`` (None: off) warm alpha and b3 up over that many steps, as in the AdEMAMix paper.
    States: ``state1`` m1 and ``state3`` m2 (signed map), ``state2`` nu (unsigned map). ``percentile_clipping``
    and ``block_wise`` are qop's additions to bitsandbytes' signature.
    """

    rule = Rule.ADEMAMIX
    hp_keys = {
        "lr": HP.LR,
        "betas": (HP.BETA1, HP.BETA2, HP.BETA3),
        "alpha": HP.ALPHA,
        "t_alpha": HP.T_ALPHA,
        "t_beta3": HP.T_BETA3,
        "eps": HP.EPS,
        "weight_decay": HP.WEIGHT_DECAY,
    }
    state_signed = (True, False, True)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        bf16_stochastic_round: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            alpha=alpha,
            t_alpha=warmup_steps("t_alpha", t_alpha),
            t_beta3=warmup_steps("t_beta3", t_beta3),
            eps=eps,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults, **engine_args(locals()))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # The kernels read the warm-ups from the hp vector, where 0 means off.
        for key in _WARMUPS:
            if key in param_group:
                param_group[key] = warmup_steps(key, param_group[key])
        super().add_param_group(param_group)

    def _preprocess_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Also accepts bitsandbytes' AdEMAMix state dicts: m1 and m2 stacked in one ``(2, *shape)`` state1
        (and a ``(2, blocks)`` absmax1), ``t_alpha``/``t_beta3`` saved as None (they load as 0: off)."""
        if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list):
            groups = [
                {k: (0.0 if k in _WARMUPS and v is None else v) for k, v in g.items()} if isinstance(g, dict) else g
                for g in state_dict["param_groups"]
            ]
            state = state_dict.get("state")
            if isinstance(state, dict):
                state = {k: _split_bnb_state(v) if isinstance(v, dict) else v for k, v in state.items()}
            state_dict = {**state_dict, "state": state, "param_groups": groups}
        return state_dict


def _split_bnb_state(st: dict[str, Any]) -> dict[str, Any]:
    """bitsandbytes keeps m1 and m2 stacked in state1 (and their absmax in absmax1); qop has m2 in state3."""
    st = dict(st)
    nested = st.get(BNB_QUANT_KEY)
    src = dict(nested) if isinstance(nested, dict) else st
    s1, s2 = src.get("state1"), src.get("state2")
    if (
        isinstance(s1, Tensor)
        and isinstance(s2, Tensor)
        and "state3" not in src
        and s1.dim() == s2.dim() + 1
        and s1.shape[0] == 2
        and s1.numel() == 2 * s2.numel()
    ):
        src["state1"], src["state3"] = s1[0], s1[1]
        a1 = src.get("absmax1")
        if isinstance(a1, Tensor) and a1.dim() == 2 and a1.shape[0] == 2:
            src["absmax1"], src["absmax3"] = a1[0], a1[1]
        if "qmap1" in src:
            src["qmap3"] = src["qmap1"]
    if isinstance(nested, dict):
        st[BNB_QUANT_KEY] = src
    return st


@variant(bits=8, drop=("optim_bits",))
class AdEMAMix8bit(AdEMAMix):
    """8-bit AdEMAMix."""


@variant(bits=32, drop=("optim_bits",))
class AdEMAMix32bit(AdEMAMix):
    """32-bit AdEMAMix."""


@variant(paged=True, drop=("is_paged",))
class PagedAdEMAMix(AdEMAMix):
    """Paged AdEMAMix (states in CUDA unified memory)."""


@variant(bits=8, paged=True, drop=("optim_bits", "is_paged"))
class PagedAdEMAMix8bit(AdEMAMix):
    """8-bit paged AdEMAMix."""


@variant(bits=32, paged=True, drop=("optim_bits", "is_paged"))
class PagedAdEMAMix32bit(AdEMAMix):
    """32-bit paged AdEMAMix."""
