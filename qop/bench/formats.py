"""Optimizers named on a command line: ``Name`` or ``Name:key=value,...`` (a ``qop.optim`` class and keyword
arguments, e.g. ``AdamW:optim_bits=16``), resolved to the class or to why it is absent (a class this build of qop
does not have), so that the demo and the quality benchmark can list formats side by side."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Format:
    """One named optimizer: its label, class (None when absent, with the reason) and keyword arguments."""

    label: str
    cls: type | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    absent: str = ""

    def build(self, params: Any, **common: Any) -> torch.optim.Optimizer:
        """The optimizer over ``params``: ``common`` arguments (lr, ...) overridden by the format's own."""
        if self.cls is None:
            raise ValueError(f"qop: {self.label} is absent: {self.absent}")
        return self.cls(params, **{**common, **self.kwargs})


def _value(text: str) -> Any:
    """A Python literal (``16``, ``True``, ``1e-3``), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse(spec: str) -> Format:
    """``Name[:key=value,...]`` as a :class:`Format` labelled ``qop <spec>``; an unknown class is absent, bad
    syntax raises ``ValueError`` naming the spec."""
    import qop.optim

    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", rest))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"qop: optimizer {spec!r}: {item!r} is not key=value")
        kwargs[key.strip()] = _value(value.strip())
    cls = getattr(qop.optim, name.strip(), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return Format(f"qop {spec}", None, kwargs, absent=f"qop.optim has no {name.strip()} in this build")
    return Format(f"qop {spec}", cls, kwargs)
