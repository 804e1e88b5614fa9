"""``GlobalOptimManager``: per-parameter overrides of optimizer arguments, as in bitsandbytes.

Overrides are keyed by the parameter object itself (weakly), so they survive ``model.cuda()`` and may be
registered before or after the optimizer is built (they apply when the parameter's state is created).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._formats import check_optim_bits

#: Override keys that select how state is kept; all others must be hyper-parameters of the optimizer.
STRUCTURAL_KEYS = frozenset({"optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "is_paged"})


class GlobalOptimManager:
    """Singleton registry of per-parameter optimizer overrides (``get_instance()``)."""

    _instance: ClassVar[GlobalOptimManager | None] = None

    def __init__(self) -> None:
        raise RuntimeError("qop: use GlobalOptimManager.get_instance()")

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        if cls._instance is None:
            inst = cls.__new__(cls)
            inst.initialize()
            cls._instance = inst
        return cls._instance

    def initialize(self) -> None:
        """Forget every registration and override."""
        # Keyed by identity: a WeakKeyDictionary compares colliding keys with ``==``, elementwise for tensors.
        self._config: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._module_overrides: list[tuple[weakref.ref[torch.nn.Module], str, dict[str, Any]]] = []

    def register_parameters(self, params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> None:
        """Kept for bitsandbytes compatibility; overrides key on the parameter object, so nothing to record."""
        for p in params:
            if isinstance(p, dict):
                self.register_parameters(p["params"])
            elif not isinstance(p, Tensor):
                raise TypeError(f"qop: register_parameters expects tensors, got {type(p).__name__}")

    def override_config(
        self,
        parameters: Tensor | Iterable[Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: dict[str, Any] | None = None,
    ) -> None:
        """Override ``key=value`` (or every entry of ``key_value_dict``) for the given parameter(s)."""
        if key is None and not key_value_dict:
            raise ValueError("qop: override_config needs key and value, or key_value_dict")
        updates = dict(key_value_dict or {})
        if key is not None:
            updates[key] = value
        if "optim_bits" in updates:
            check_optim_bits(updates["optim_bits"])
        if updates.get("block_wise", True) is not True:
            raise ValueError("qop: block_wise=False is not supported: qop's 8-bit states are always block-wise")
        if isinstance(parameters, Tensor):
            parameters = [parameters]
        for p in parameters:
            self._config.setdefault(p, {}).update(updates)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict[str, Any]) -> None:
        """Override ``config`` for ``getattr(module, param_name)``, resolved when a state is created."""
        self._module_overrides.append((weakref.ref(module), param_name, dict(config)))

    def _resolve_modules(self) -> None:
        pending = []
        for ref, name, cfg in self._module_overrides:
            module = ref()
            if module is None:
                continue
            p = getattr(module, name, None)
            if isinstance(p, Tensor):
                self._config.setdefault(p, {}).update(cfg)
            pending.append((ref, name, cfg))
        self._module_overrides = pending

    def config_for(self, p: Tensor) -> dict[str, Any]:
        """Every override registered for ``p`` (empty dict when none)."""
        if self._module_overrides:
            self._resolve_modules()
        return self._config.get(p, {})

    def hp_override(self, p: Tensor, hp_keys: dict[str, Any]) -> dict[int, float]:
        """Overridden hyper-parameters of ``p`` as {HP slot: value}."""
        out: dict[int, float] = {}
        for key, value in self.config_for(p).items():
            if key in STRUCTURAL_KEYS or key not in hp_keys:
                continue
            slot = hp_keys[key]
            if isinstance(slot, tuple):
                out.update({int(s): float(v) for s, v in zip(slot, value)})
            else:
                out[int(slot)] = float(value)
        return out

    def _attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by each optimizer at construction; module overrides resolve against current params."""
        if self._module_overrides:
            self._resolve_modules()
