"""Argument checks shared by the per-optimizer files; every error names the argument."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


def check_sr_seed(name: str, value: Any, limit: int) -> None:
    """A seed of stochastic rounding: a whole number in [0, limit) (float32 holds it exactly)."""
    v = number(name, value)
    if not (0 <= v < limit and v == int(v)):
        raise ValueError(f"qop: {name} must be a whole number in [0, {limit}), got {v}")


def number(name: str, value: Any) -> float:
    """``value`` as a finite float (a Python number or a one-element tensor)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"qop: {name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.detach().float().cpu().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"qop: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"qop: {name} must be finite, got {value}")
    return value


def check_range(group: dict[str, Any], name: str, lo: float, hi: float) -> None:
    """``lo <= group[name] <= hi`` when the group has ``name``."""
    if name in group:
        v = number(name, group[name])
        if not lo <= v <= hi:
            raise ValueError(f"qop: {name} must be in [{lo}, {hi}], got {v}")


def warmup_steps(name: str, value: Any) -> float:
    """AdEMAMix's ``t_alpha``/``t_beta3``: None (off) becomes 0; a given value must be > 0."""
    if value is None:
        return 0.0
    v = number(name, value)
    if v <= 0:
        raise ValueError(f"qop: {name} must be > 0 (or None to disable the warm-up), got {v}")
    return v
