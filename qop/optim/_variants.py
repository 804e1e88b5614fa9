"""Builds the ``*8bit``, ``*32bit`` and ``Paged*`` classes of an optimizer from its base class."""

from __future__ import annotations

import inspect
from typing import Any


def variant(base: type, name: str, *, bits: int | None = None, paged: bool = False, doc: str = "") -> type:
    """A subclass of ``base`` with the same signature that forces ``optim_bits`` and/or ``is_paged``.

    Like bitsandbytes, a fixed-bits class accepts (and validates) ``optim_bits`` but uses its own.
    """
    sig = inspect.signature(base.__init__)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        if bits is not None and "optim_bits" in arguments:
            given = arguments["optim_bits"]
            if given not in (8, 32) or isinstance(given, bool):
                raise ValueError(f"qop: optim_bits must be 8 or 32, got {given!r}")
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
