"""Hyper-parameters as device tensors: each group's ``hp`` vector and the 0-d views its keys hold.

A group's ``lr``, ``betas``, ``eps``... are views of one float32 vector ``hp`` (layout ``qop.HP``) on the group's
device, which the step ops read.  Schedulers fill the views in place; a value *assigned* to a key (a number, a
one-element tensor, a tuple of them) is checked, then copied into ``hp`` at the next step, and the key gets its
view back.  In eager mode the displaced view is first detached from ``hp`` (it keeps its value), so code that
puts it back later, as ``torch.distributed.checkpoint``'s state-dict helpers do with ``lr`` around a step,
restores that value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._schema import HP, HP_SIZE
from ._args import number

HPSlot = HP | tuple[HP, ...]
#: OneCycleLR/CyclicLR keep their momentum bounds in each group; as device tensors they make OneCycleLR's
#: annealed momentum a tensor, which the next step copies into ``hp`` with no recompile (see :func:`sync`).
MOMENTUM_BOUNDS = ("max_momentum", "base_momentum")


def check_values(hp_keys: Mapping[str, HPSlot], group: Mapping[str, Any]) -> None:
    """The group's hyper-parameters as numbers: betas-like tuples in [0, 1), the others >= 0."""
    for key, slot in hp_keys.items():
        if key not in group:
            continue
        value = group[key]
        if isinstance(slot, tuple):
            check_tuple(key, value, len(slot))
            for i, v in enumerate(value):
                check_hp(f"{key}[{i}]", number(f"{key}[{i}]", v), unit=True)
        else:
            check_hp(key, number(key, value), unit=False)


def new_vector(hp_keys: Mapping[str, HPSlot], group: Mapping[str, Any], device: torch.device) -> Tensor:
    """A group's ``hp`` vector, from its (checked) hyper-parameters."""
    values = [0.0] * HP_SIZE
    for key, slot in hp_keys.items():
        if key not in group:
            continue
        if isinstance(slot, tuple):
            for s, v in zip(slot, group[key]):
                values[s] = number(key, v)
        else:
            values[slot] = number(key, group[key])
    return torch.tensor(values, dtype=torch.float32).to(device)


def bind_views(
    hp_keys: Mapping[str, HPSlot], group: dict[str, Any], values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Make each hyper-parameter key of the group a 0-d view of ``group["hp"]`` (after copying ``values``);
    returns the views by key."""
    hp = group["hp"]
    views: dict[str, Any] = {}
    for key, slot in hp_keys.items():
        if key not in group:
            continue
        views[key] = tuple(hp[s] for s in slot) if isinstance(slot, tuple) else hp[slot]
        if values is not None and key in values:
            store(hp, key, slot, values[key], views[key])
        group[key] = views[key]
    return views


def check_assigned_in(hp_keys: Mapping[str, HPSlot], views: Mapping[str, Any], group: Mapping[str, Any]) -> None:
    """Every value assigned to a key of the group (in place of its view) is one ``hp`` accepts."""
    for key, view in views.items():
        if not holds(group[key], view):
            check_assigned(key, hp_keys[key], group[key], view)


def sync(hp_keys: Mapping[str, HPSlot], views: dict[str, Any], group: dict[str, Any]) -> None:
    """Copy values assigned to the group's keys into ``hp`` in place and put views back.

    A key still holding its view costs an identity test (a guard when compiled).  An assigned tensor is copied on
    the device (no recompile when compiled); an assigned Python number is a constant of the first compiled graph,
    so its first change recompiles once (dynamo then makes it a graph input).  OneCycleLR's momentum bounds are
    turned into tensors on ``hp``'s device so that the momentum it assigns at every step is a tensor.  A captured
    CUDA graph sees in-place changes only.
    """
    hp = group["hp"]
    for key, view in views.items():
        value = group[key]
        if holds(value, view):
            continue
        slot = hp_keys[key]
        if not torch.compiler.is_compiling():
            view = views[key] = detach_displaced(hp, slot, value, view)
        store(hp, key, slot, value, view)
        group[key] = view
    for key in MOMENTUM_BOUNDS:
        value = group.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            group[key] = torch.full((), value, dtype=torch.float32, device=hp.device)


def load(
    hp_keys: Mapping[str, HPSlot], views: Mapping[str, Any], ours: dict[str, Any], theirs: Mapping[str, Any]
) -> None:
    """Take a loaded (checked) group's values: hyper-parameters into ``hp`` (the keys keep their views), the rest
    as they are."""
    hp = ours["hp"]
    for key, value in theirs.items():
        if key in ("params", "hp"):
            continue
        slot = hp_keys.get(key)
        if slot is None or key not in views:
            ours[key] = value
            continue
        with torch.no_grad():
            for s, v in zip(slot, value) if isinstance(slot, tuple) else [(slot, value)]:
                hp[s].fill_(number(key, v))
        ours[key] = views[key]


def export(hp_keys: Mapping[str, HPSlot], group: dict[str, Any]) -> None:
    """A saved group: hyper-parameters as plain numbers, no ``hp`` vector."""
    group.pop("hp", None)
    for key, slot in hp_keys.items():
        if key in group:
            v = group[key]
            group[key] = tuple(float(x) for x in v) if isinstance(slot, tuple) else float(v)
    for key in MOMENTUM_BOUNDS:
        if isinstance(group.get(key), Tensor):
            group[key] = float(group[key])


def holds(value: Any, view: Any) -> bool:
    """Whether a group key still holds its view(s) of ``hp`` (nothing was assigned to it)."""
    if isinstance(view, tuple):
        return isinstance(value, tuple) and len(value) == len(view) and all(v is w for v, w in zip(value, view))
    return value is view


def detach_displaced(hp: Tensor, slot: HPSlot, value: Any, view: Any) -> Any:
    """Give each view displaced by ``value`` its own storage (keeping its value) and return fresh views for them."""
    if isinstance(slot, tuple):
        if not isinstance(value, tuple) or len(value) != len(slot):
            return view  # store() refuses it
        return tuple(detach_displaced(hp, s, v, w) for s, v, w in zip(slot, value, view))
    if value is view:
        return view
    with torch.no_grad():
        view.set_(view.clone())
    return hp[slot]


def changed(key: str, slot: HPSlot, value: Any, view: Any) -> list[tuple[str, int, Any]]:
    """(name, hp slot, value) of each element of an assigned hyper-parameter that no longer holds its view."""
    if isinstance(slot, tuple):
        check_tuple(key, value, len(slot))
        items = [(f"{key}[{i}]", s, v, w) for i, (s, v, w) in enumerate(zip(slot, value, view))]
    else:
        items = [(key, slot, value, view)]
    return [(name, s, v) for name, s, v, w in items if v is not w]


def check_assigned(key: str, slot: HPSlot, value: Any, view: Any) -> None:
    """An assigned hyper-parameter that ``hp`` accepts."""
    for name, _, v in changed(key, slot, value, view):
        if isinstance(v, Tensor):
            if v.numel() != 1 or v.is_complex():
                raise ValueError(
                    f"qop: {name} must be a number or a one-element real tensor, got {v.dtype} of shape "
                    f"{tuple(v.shape)}"
                )
        else:
            check_hp(name, number(name, v), unit=isinstance(slot, tuple))


def check_tuple(key: str, value: Any, n: int) -> None:
    if isinstance(value, Tensor) or not isinstance(value, (tuple, list)) or len(value) != n:
        raise ValueError(f"qop: {key} must be a tuple of {n} numbers, got {value!r}")


def check_hp(name: str, value: float, unit: bool) -> None:
    if unit and not 0.0 <= value < 1.0:
        raise ValueError(f"qop: {name} must be in [0, 1), got {value}")
    if not unit and value < 0:
        raise ValueError(f"qop: {name} must be >= 0, got {value}")


def store(hp: Tensor, key: str, slot: HPSlot, value: Any, view: Any) -> None:
    """Write an assigned hyper-parameter (checked by :func:`check_assigned` in eager mode) into ``hp``."""
    for _, s, v in changed(key, slot, value, view):
        if isinstance(v, Tensor):
            # fill_ reads a 0-d CPU value on the host and a device one on the device: no sync either way
            hp[s].fill_(v.detach().reshape(()))
            continue
        # not fill_(v): once dynamo makes a changing number a graph input, AOTAutograd turns it into a tensor
        # for add_ but specializes it (recompiling at every change) for fill_
        hp[s].zero_().add_(v)
