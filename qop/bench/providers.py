"""The optimizers a benchmark compares: torch.optim's fastest variants, qop, bitsandbytes and torchao.

Optional libraries are imported when present; :func:`missing_providers` names the ones that are not, so a
run says what it left out instead of failing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import qop

BASELINE = "torch AdamW(fused)"
PROVIDERS = ("torch", "qop", "bnb", "torchao")
#: The module each optional provider imports.
_MODULES = {"bnb": "bitsandbytes", "torchao": "torchao"}
#: bitsandbytes/qop class-name stems of each family, and the hyper-parameters every provider gets.
FAMILIES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "adam": (("Adam", "AdamW"), {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    "sgd": (("SGD",), {"lr": 1e-2, "momentum": 0.9}),
    "lion": (("Lion",), {"lr": 1e-4, "betas": (0.9, 0.99)}),
    "rmsprop": (("RMSprop",), {"lr": 1e-3, "alpha": 0.99, "eps": 1e-8}),
    "adagrad": (("Adagrad",), {"lr": 1e-2, "eps": 1e-10}),
    "ademamix": (("AdEMAMix",), {"lr": 1e-3, "betas": (0.9, 0.999, 0.9999), "alpha": 5.0}),
    "lamb": (("LAMB",), {"lr": 1e-3, "betas": (0.9, 0.999)}),
    "lars": (("LARS",), {"lr": 1e-2, "momentum": 0.9}),
}
#: torch.optim counterparts: (label suffix, class name, extra kwargs), fastest variant first.
TORCH_VARIANTS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "adam": [("AdamW(fused)", "AdamW", {"fused": True}), ("AdamW(foreach)", "AdamW", {"foreach": True})],
    "sgd": [("SGD(fused)", "SGD", {"fused": True}), ("SGD(foreach)", "SGD", {"foreach": True})],
    "rmsprop": [("RMSprop(foreach)", "RMSprop", {"foreach": True})],
    "adagrad": [("Adagrad(fused)", "Adagrad", {"fused": True}), ("Adagrad(foreach)", "Adagrad", {"foreach": True})],
    "lion": [("Lion(fused)", "Lion", {"fused": True})],  # only where a future torch ships one
}


@dataclass(frozen=True)
class OptSpec:
    """One optimizer to time: its row label, provider, family and how to build it on a parameter list."""

    label: str
    provider: str
    family: str
    bits: int
    build: Callable[[list[Tensor]], torch.optim.Optimizer] = field(compare=False, repr=False)
    skip_workloads: tuple[tuple[str, str], ...] = ()  # (workload, reason)


#: qop's Adam rows beyond 8 and 32 bits: (label, class, bits for the byte tables, extra arguments).
LOWBIT_ADAM: tuple[tuple[str, str, int, dict[str, Any]], ...] = (
    ("AdamW4bit", "AdamW4bit", 4, {}),
    ("AdamWFp8", "AdamWFp8", 8, {}),
    ("AdamW bf16 states", "AdamW", 16, {"optim_bits": 16}),
)


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``cls.__init__`` accepts (families differ in small ways)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _builder(cls: type, kwargs: dict[str, Any]) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    kw = _accepted(cls, kwargs)
    return lambda params: cls(params, **kw)


def import_optional(name: str) -> Any:
    """Import an optional library; None when it is missing (reported by :func:`missing_providers`) or broken
    (reported here)."""
    if importlib.util.find_spec(_MODULES[name]) is None:
        return None
    try:
        if name == "bnb":
            import bitsandbytes

            return bitsandbytes.optim
        if name == "torchao":
            try:
                from torchao import optim as ao_optim
            except ImportError:
                from torchao.prototype import low_bit_optim as ao_optim  # older torchao
            return ao_optim
    except Exception as exc:  # a broken install must not stop the benchmark
        print(f"[bench] {name} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    return None


def library_version(distribution: str) -> str | None:
    """An installed distribution's version from its metadata (no import: torchao alone takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def discover(
    families: Sequence[str], providers: Sequence[str], device: str, percentile_clipping: int = 100
) -> list[OptSpec]:
    """Every optimizer of the chosen families and providers that exists in this environment.

    ``percentile_clipping`` < 100 is passed to the qop and bitsandbytes classes; a class that does not take
    it (recent bitsandbytes releases, 0.50 among them) runs without, and its label says so."""
    specs: list[OptSpec] = []
    libs = {"qop": qop.optim, **{p: import_optional(p) for p in ("bnb", "torchao") if p in providers}}
    for family in families:
        stems, hp = FAMILIES[family]
        if "torch" in providers:
            for suffix, name, extra in TORCH_VARIANTS.get(family, []):
                cls = getattr(torch.optim, name, None)
                if cls is None or (extra.get("fused") and not _fused_ok(cls, device)):
                    continue
                kw = dict(hp, **extra)
                if name == "AdamW":
                    kw["weight_decay"] = 1e-2
                specs.append(OptSpec(f"torch {suffix}", "torch", family, 32, _builder(cls, kw)))
        for provider in ("qop", "bnb"):
            lib = libs.get(provider)
            if provider not in providers or lib is None:
                continue
            for stem in stems:
                for bits in (8, 32):
                    cls = getattr(lib, f"{stem}{bits}bit", None)
                    if cls is None:
                        continue
                    kw = dict(hp, weight_decay=1e-2 if stem == "AdamW" else 0.0)
                    label = f"{provider} {stem}{bits}bit"
                    if percentile_clipping < 100:
                        kw["percentile_clipping"] = percentile_clipping
                        label += "" if "percentile_clipping" in _accepted(cls, kw) else " (no pct clip)"
                    specs.append(OptSpec(label, provider, family, bits, _builder(cls, kw)))
        if family == "adam" and "qop" in providers:  # the state formats beyond 8 bits (fp8: 1 B + a scale per 256)
            for label, cls_name, bits, extra in LOWBIT_ADAM:
                kw = dict(hp, weight_decay=1e-2, **extra)
                specs.append(OptSpec(f"qop {label}", "qop", family, bits, _builder(getattr(qop.optim, cls_name), kw)))
        if family == "adam" and "torchao" in providers and libs.get("torchao") is not None:
            for label, bits in (("AdamW8bit", 8), ("AdamW4bit", 4), ("AdamWFp8", 8)):
                cls = getattr(libs["torchao"], label, None)
                if cls is None:
                    continue
                specs.append(
                    OptSpec(
                        f"torchao {label}",
                        "torchao",
                        family,
                        bits,
                        _builder(cls, dict(hp, weight_decay=1e-2)),
                        skip_workloads=(("many", "torch.compile(dynamic=False) recompiles for each of ~2000 shapes"),),
                    )
                )
    return specs


def missing_providers(providers: Sequence[str]) -> dict[str, str]:
    """The optional providers asked for that this environment lacks, each with how to get it."""
    how = {"bnb": "pip install bitsandbytes", "torchao": "pip install torchao"}
    return {p: how[p] for p in providers if p in how and importlib.util.find_spec(_MODULES[p]) is None}


def _fused_ok(cls: type, device: str) -> bool:
    """Whether ``cls(fused=True)`` runs on this device (CPU support differs between torch versions)."""
    p = torch.zeros(8, device=device, requires_grad=True)
    p.grad = torch.zeros_like(p)
    try:
        cls([p], fused=True).step()
    except (RuntimeError, ValueError, TypeError):
        return False
    return True
