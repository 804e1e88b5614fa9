"""Stochastic rounding of bfloat16 parameters in the engine: the group keys, the seed and the flag per bucket.

A group with ``bf16_stochastic_round=True`` writes its bfloat16 params with ``Flag.STOCHASTIC_ROUND`` (params of
other dtypes are written as usual).  Its seed, the group key ``bf16_sr_seed`` (slot ``HP.SR_SEED`` of ``hp``, so a
device value that state dicts save like the other hyper-parameters), is drawn from torch's default generator when
the group is added, unless given; groups that do not round stochastically hold 0 and draw nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from .._schema import SR_SEED_LIMIT, Flag
from ._args import check_sr_seed

#: The group key that turns stochastic rounding on.
SR_KEY = "bf16_stochastic_round"
#: The group key of its seed.
SR_SEED_KEY = "bf16_sr_seed"


def with_seed(group: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``group`` with a ``bf16_sr_seed`` (a copy when one is added): drawn if the group rounds stochastically."""
    if group.get(SR_SEED_KEY) is not None:
        return group
    sr = group.get(SR_KEY, defaults.get(SR_KEY, False))
    return {**group, SR_SEED_KEY: int(torch.randint(0, SR_SEED_LIMIT, ()).item()) if sr is True else 0}


def check_group(group: dict[str, Any]) -> None:
    """``bf16_stochastic_round`` a bool, ``bf16_sr_seed`` a whole number in [0, 2^24)."""
    if not isinstance(group.get(SR_KEY, False), bool):
        raise TypeError(f"qop: {SR_KEY} must be a bool, got {group[SR_KEY]!r}")
    if group.get(SR_SEED_KEY) is not None:
        check_sr_seed(SR_SEED_KEY, group[SR_SEED_KEY], SR_SEED_LIMIT)


def flags(group: dict[str, Any], flags: int, dtype: torch.dtype) -> int:
    """The op's flags for a bucket of params of ``dtype``: with ``STOCHASTIC_ROUND`` for bfloat16 ones."""
    if group.get(SR_KEY, False) and dtype == torch.bfloat16:
        return flags | int(Flag.STOCHASTIC_ROUND)
    return flags
