"""Builds the ``*8bit``, ``*32bit`` and ``Paged*`` classes of an optimizer from its base class."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any


def variant(
    base: type,
    name: str,
    *,
    bits: int | None = None,
    paged: bool = False,
    doc: str = "",
    drop: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> type:
    """A subclass of ``base`` that forces ``optim_bits`` and/or ``is_paged``.

    Its signature is the base's, less the arguments named in ``drop`` (bitsandbytes' ``*8bit`` classes of
    most optimizers have no ``optim_bits``, its ``Paged*`` classes of Lion and AdEMAMix no ``is_paged``) and
    with the defaults in ``defaults`` replaced. Like bitsandbytes, a fixed-bits class that keeps
    ``optim_bits`` in its signature accepts only its default there (any other value has no effect, so it raises).
    """
    base_sig = inspect.signature(base.__init__)
    dropped = set(drop)
    unknown = dropped.union(defaults or {}) - set(base_sig.parameters)
    if unknown:
        raise TypeError(f"qop: {base.__name__} has no argument(s) {sorted(unknown)}")
    sig = base_sig.replace(parameters=[
        p.replace(default=(defaults or {}).get(n, p.default))
        for n, p in base_sig.parameters.items() if n not in dropped
    ])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        if bits is not None and "optim_bits" in arguments:
            given, default = arguments["optim_bits"], sig.parameters["optim_bits"].default
            if given != default or isinstance(given, bool):
                raise ValueError(f"qop: {name} runs with {bits}-bit states; its optim_bits is kept for "
                                 f"compatibility and only takes its default {default}, got {given!r}")
        extra = {}
        if bits is not None:
            extra["optim_bits"] = bits
        if paged:
            extra["is_paged"] = True
        base.__init__(self, **{k: v for k, v in arguments.items() if k not in extra}, **extra)

    __init__.__signature__ = sig  # type: ignore[attr-defined]
    __init__.__doc__ = base.__init__.__doc__
    cls = type(name, (base,), {"__init__": __init__, "__doc__": doc or f"{name}: {base.__doc__}",
                               "__module__": base.__module__})
    return cls

