"""Generated parts of ``docs/``: the optimizer table and the op reference, built from the code itself.

``python -m qop docs-table`` prints them, ``--write DOCS_DIR`` refreshes them in place and ``--check DOCS_DIR``
fails when a committed page is stale; ``tests/test_docs.py`` runs the check, so the docs cannot drift from
the classes' signatures or from ``qop/_schema.py``.  Each generated part sits between two HTML comments
(``<!-- generated: NAME -->`` ... ``<!-- end generated: NAME -->``); the prose around it is hand-written.
"""

from __future__ import annotations

import argparse
import ast
import enum
import importlib.resources
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

#: Generated sections: (page, section name) -> the function that writes the section's Markdown.
SECTIONS: dict[tuple[str, str], Callable[[], str]] = {}


def _section(page: str, name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        SECTIONS[(page, name)] = fn
        return fn

    return register


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated: {name} (python -m qop docs-table --write docs) -->", f"<!-- end generated: {name} -->"


def _fmt_default(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    return f"`{value!r}`"


# ------------------------------------------------------------------------------------------ optimizers
def _families() -> list[tuple[type, list[type]]]:
    """Each optimizer base class written as a class statement, with the classes generated from it by ``variant``."""
    from . import optim

    classes = [getattr(optim, n) for n in optim.__all__]
    classes = [
        c for c in classes if isinstance(c, type) and issubclass(c, optim.QopOptimizer) and c is not optim.QopOptimizer
    ]
    bases = [c for c in classes if not vars(c).get("_forces_format", False)]
    out = []
    for base in sorted(bases, key=lambda c: (c.__module__, _position(c))):
        variants = [c for c in classes if c not in bases and c.__bases__[0] is base]
        variants.sort(key=lambda c: (c.__name__.startswith("Paged"), "32bit" in c.__name__, c.__name__))
        out.append((base, [base, *variants]))
    return out


def _position(cls: type) -> int:
    """Where ``cls`` is defined in its module (Adam before AdamW, SGD before LARS)."""
    module = sys.modules[cls.__module__]
    names = [n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__]
    return names.index(cls.__name__)


def _effective(cls: type, **kwargs: Any) -> tuple[Any, bool]:
    """``(optim_bits, is_paged)`` a class really runs with: built on one CPU tensor and read back."""
    required = {
        n: 1e-3
        for n, p in inspect.signature(cls).parameters.items()
        if p.default is inspect.Parameter.empty and n != "params"
    }
    opt = cls([torch.zeros(1, requires_grad=True)], **required, **kwargs)
    group = opt.param_groups[0]
    return group["optim_bits"], bool(group["is_paged"])


def _states(cls: type) -> str:
    """``8-bit``/``32-bit`` for a class with fixed states, else its ``optim_bits`` default."""
    bits, _ = _effective(cls)
    if "optim_bits" in inspect.signature(cls).parameters:
        try:
            other, _ = _effective(cls, optim_bits=40 - bits)
        except ValueError:
            other = bits
        if other != bits:
            return f"`optim_bits` ({bits})"
    return "fp8" if bits == "fp8" else f"{bits}-bit"


def _arguments(cls: type) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls).parameters.items() if n != "params"}


def _hp_names(cls: Any) -> str:
    from .optim.optimizer import SR_SEED_KEY  # every optimizer's; documented once, with bf16_stochastic_round

    return ", ".join(f"`{k}`" for k in cls.hp_keys if k != SR_SEED_KEY)


@_section("optimizers.md", "optimizers")
def optimizer_tables() -> str:
    """One section per optimizer family: its arguments and defaults, then every class built from it."""
    lines: list[str] = []
    for base, variants in _families():
        doc = inspect.getdoc(base) or ""
        summary = " ".join(doc.split("\n\n", 1)[0].split())
        lines += [
            f"### {base.__name__}",
            "",
            summary,
            "",
            f"Hyper-parameters held as tensors (schedulable): {_hp_names(base)}.",
            "",
            "| argument | default |",
            "|---|---|",
        ]
        base_args = _arguments(base)
        lines += [f"| `{n}` | {_fmt_default(p.default)} |" for n, p in base_args.items()]
        lines += ["", "| class | states | paged | signature differs from the base |", "|---|---|---|---|"]
        for cls in variants:
            _, paged = _effective(cls)
            states = _states(cls)
            args = _arguments(cls)
            diffs = [f"no `{n}`" for n in base_args if n not in args]
            diffs += [
                f"`{n}={args[n].default!r}`" for n in args if n in base_args and args[n].default != base_args[n].default
            ]
            lines.append(
                f"| `qop.optim.{cls.__name__}` | {states} | {'yes' if paged else 'no'} | {', '.join(diffs) or '-'} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ ops
def _enum_comments(enum_cls: type[enum.Enum]) -> dict[str, str]:
    """The trailing ``# comment`` of each member in ``qop/_schema.py``'s source: the enums' one documentation."""
    from . import _schema

    source = inspect.getsource(_schema)
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == enum_cls.__name__:
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                    text = lines[stmt.lineno - 1]
                    out[stmt.targets[0].id] = text.split("#", 1)[1].strip() if "#" in text else ""
    return out


def _enum_table(enum_cls: type[enum.Enum], extra: Callable[[Any], str] | None = None, head: str = "") -> list[str]:
    comments = _enum_comments(enum_cls)
    cols = "| name | value | meaning |" + (f" {head} |" if extra else "")
    lines = [cols, "|---|--:|---|" + ("---|" if extra else "")]
    for member in enum_cls:
        meaning = comments.get(member.name, "").replace("|", "\\|")
        row = f"| `{enum_cls.__name__}.{member.name}` | {int(member.value)} | {meaning} |"
        lines.append(row + (f" {extra(member)} |" if extra else ""))
    return lines


def _group_keys() -> dict[Any, list[str]]:
    """For each ``qop.HP`` slot, the param-group keys of every optimizer that write it (``betas[1]`` for a tuple)."""
    out: dict[Any, list[str]] = {}
    for base, _ in _families():
        for key, slot in cast(Any, base).hp_keys.items():
            slots = slot if isinstance(slot, tuple) else (slot,)
            for i, s in enumerate(slots):
                name = f"{key}[{i}]" if isinstance(slot, tuple) else key
                if name not in out.setdefault(s, []):
                    out[s].append(name)
    return out


def _triton_ops() -> list[str]:
    """Op names that ``qop/triton`` registers for CUDA, read from its source (importing it needs a GPU)."""
    try:
        source = (importlib.resources.files("qop.triton") / "__init__.py").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id == "_OPS" and isinstance(node.value, ast.Dict):
                return [str(k.value) for k in node.value.keys if isinstance(k, ast.Constant)]
    return []


def _backend_cell(present: bool, what: str) -> str:
    return what if present else "-"


@_section("ops.md", "ops")
def op_reference() -> str:
    """Schemas, enums, state counts and backends of every ``qop`` op, from ``qop._schema`` and the registrations."""
    from . import _checks, _schema, export
    from .__main__ import kernel_origin

    lines = ["### Schemas", "", "| op | schema |", "|---|---|"]
    for name, schema in _schema.SCHEMAS.items():
        lines.append(f"| `qop::{name}` | `{schema}` |")
    lines += [
        "",
        f"Constants: `BLOCKSIZE = {_schema.BLOCKSIZE}` elements per absmax, "
        f"`BLOCKSIZE4 = {_schema.BLOCKSIZE4}` per 4-bit absmax, `FP8_BLOCKSIZE = {_schema.FP8_BLOCKSIZE}` per fp8 "
        "scale, "
        f"`HISTORY = {_schema.HISTORY}` gradient norms per percentile-clipped parameter, "
        f"`HP_SIZE = {_schema.HP_SIZE}` slots in `hp`.",
        "",
        "### Rules (`qop.Rule`)",
        "",
    ]

    def states(rule: _schema.Rule) -> str:
        base = _checks.n_states(int(rule), 0, True)
        extra = [
            f"{_checks.n_states(int(rule), int(f), True)} with `{f.name}`"
            for f in _schema.Flag
            if f and _checks.n_states(int(rule), int(f), True) != base
        ]
        return ", ".join([str(base), *extra])

    lines += _enum_table(_schema.Rule, states, "states per parameter")
    lines += ["", "### Flags (`qop.Flag`)", "", *_enum_table(_schema.Flag)]
    lines += ["", "### State formats (`qop._schema.StateFormat`)", ""]
    lines += _enum_table(
        _schema.StateFormat,
        lambda m: str(_schema.FORMAT_BLOCKSIZE.get(m, "-")) + " / " + str(_schema.CODE_SIZE.get(m, "-")),
        "block size / code book entries",
    )
    keys = _group_keys()
    lines += ["", "### Hyper-parameter slots of `hp` (`qop.HP`)", ""]
    lines += _enum_table(_schema.HP, lambda m: ", ".join(f"`{k}`" for k in keys.get(m, [])), "param-group keys")
    triton = set(_triton_ops())
    decomposed = {op.name().split("::", 1)[1] for op in export.decompositions()}
    lines += [
        "",
        "### Backends",
        "",
        "| op | fake (`meta/`) | CPU | CUDA | other devices | core ATen decomposition (`qop.export`) |",
        "|---|---|---|---|---|---|",
    ]
    for name in _schema.SCHEMAS:
        cpu = kernel_origin(name, "CPU")
        cpu = {"C++": "C++ (`csrc/cpu/`)", "reference": "reference"}.get(cpu, cpu)
        lines.append(
            f"| `qop::{name}` | {_backend_cell(kernel_origin(name, 'Meta') == 'fake', 'yes')} | {cpu} | "
            f"{_backend_cell(name in triton, 'Triton (`qop/triton/`)')} | reference (`qop/reference.py`) | "
            f"{_backend_cell(name in decomposed, 'yes')} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ splicing
def splice(text: str, name: str, body: str) -> str:
    """``text`` with the generated section ``name`` replaced by ``body``; raises if its markers are missing."""
    begin, end = _markers(name)
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"docs: no generated section {name!r} (expected the line {begin!r} and a closing {end!r})")
    return pattern.sub(lambda _: f"{begin}\n{body}{end}", text)


def stale_pages(docs: Path, write: bool = False) -> list[str]:
    """Pages of ``docs`` whose generated sections differ from the code (rewritten when ``write``)."""
    stale = []
    for (page, name), make in SECTIONS.items():
        path = docs / page
        text = path.read_text()
        new = splice(text, name, make())
        if new != text:
            stale.append(f"{page} [{name}]")
            if write:
                path.write_text(new)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qop docs-table``: print the generated sections, or check / rewrite them in a docs folder."""
    parser = argparse.ArgumentParser(
        prog="python -m qop docs-table", description="Generated parts of docs/: optimizer table and op reference."
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="DOCS_DIR", help="rewrite the generated sections of the pages in DOCS_DIR")
    group.add_argument("--check", metavar="DOCS_DIR", help="exit 1 if a page of DOCS_DIR is stale")
    args = parser.parse_args(argv)
    if args.write or args.check:
        stale = stale_pages(Path(args.write or args.check), write=bool(args.write))
        verb = "rewrote" if args.write else "stale"
        print(f"{verb}: {', '.join(stale)}" if stale else "docs: generated sections are up to date")
        return 1 if stale and args.check else 0
    for (page, name), make in SECTIONS.items():
        print(f"<!-- {page}: {name} -->\n{make()}")
    return 0
