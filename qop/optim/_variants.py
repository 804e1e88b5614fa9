"""Builds the ``*8bit``, ``*32bit`` and ``Paged*`` classes of an optimizer from its base class.

Each is written as a real class (so type checkers and documentation tools see a class) and decorated::

    @variant(bits=8, drop=("optim_bits",))
    class Lion8bit(Lion):
        \"\"\"8-bit Lion.\"\"\"
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def variant(
    *,
    bits: int | str | None = None,
    paged: bool = False,
    drop: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> Callable[[T], T]:
    """A class decorator: the class's ``__init__`` becomes its base's, forcing ``optim_bits`` and/or ``is_paged``.

    Its signature is the base's, less the arguments named in ``drop`` (bitsandbytes' ``*8bit`` classes of most
    optimizers have no ``optim_bits``, its ``Paged*`` classes of Lion and AdEMAMix no ``is_paged``) and with the
    defaults in ``defaults`` replaced. Like bitsandbytes, a fixed-bits class that keeps ``optim_bits`` in its
    signature accepts only its default there (any other value has no effect, so it raises).
    """
    dropped = set(drop)

    def decorate(cls: T) -> T:
        base = cls.__mro__[1]
        base_init = base.__init__  # type: ignore[misc]
        base_sig = inspect.signature(base_init)
        unknown = dropped.union(defaults or {}) - set(base_sig.parameters)
        if unknown:
            raise TypeError(f"qop: {base.__name__} has no argument(s) {sorted(unknown)}")
        sig = base_sig.replace(
            parameters=[
                p.replace(default=(defaults or {}).get(n, p.default))
                for n, p in base_sig.parameters.items()
                if n not in dropped
            ]
        )
        name = cls.__name__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop("self")
            if bits is not None and "optim_bits" in arguments:
                given, default = arguments["optim_bits"], sig.parameters["optim_bits"].default
                if given != default or isinstance(given, bool):
                    raise ValueError(
                        f"qop: {name} runs with {bits}-bit states; its optim_bits is kept for "
                        f"compatibility and only takes its default {default}, got {given!r}"
                    )
            extra: dict[str, Any] = {}
            if bits is not None:
                extra["optim_bits"] = bits
            if paged:
                extra["is_paged"] = True
            base_init(self, **{k: v for k, v in arguments.items() if k not in extra}, **extra)

        __init__.__signature__ = sig  # type: ignore[attr-defined]
        __init__.__doc__ = base_init.__doc__
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = __init__  # type: ignore[misc]
        # a class that only changes defaults (AdamW) is a family of its own in the docs; one that forces bits or
        # paging is listed under its base
        cls._forces_format = bits is not None or paged  # type: ignore[attr-defined]
        return cls

    return decorate
