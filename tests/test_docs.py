"""Every ```python block of README.md and docs/*.md runs, and the generated parts of docs/ match the code.

How a page runs: its blocks execute in order in one namespace (a page reads like a notebook), from a temporary
working directory, with this preamble already in the namespace (blocks may use it without defining it):

* ``torch``, ``qop``;
* ``MyModel``: a 64 -> 128 -> 10 MLP (9,610 parameters; its first weight, 8,192 elements, gets 8-bit states);
* ``data``: four batches ``(x, y)`` of 16 inputs of 64 features and class labels in 0..9;
* ``loss_fn``: ``torch.nn.functional.cross_entropy``.

Skipped: ``docs/distributed.md`` (its examples need several processes and are tested with them), blocks with
``<!-- not run: REASON -->`` on the line above them, and blocks that import an optional library (bitsandbytes,
torchao) that is not installed.  ``torch.compile`` in a block uses dynamo's ``aot_eager`` backend unless the
block names one: the same tracing, functionalization and graph-break and recompile behaviour as inductor
without its C++ code generation (~25 s a graph on 2 cores); set ``QOP_DOCS_BACKEND=inductor`` to run inductor.
``tests/test_compile.py`` runs inductor on the same training step.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import qop
from qop import _docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Pages whose examples are tested elsewhere (several processes).
ELSEWHERE = {"distributed.md"}
OPTIONAL = {"bitsandbytes": "bitsandbytes", "torchao": "torchao"}
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->\s*$")


@dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    lang: str
    code: str
    not_run: str | None


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the reason of a ``<!-- not run: ... -->`` right above each."""
    text = page.read_text()
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = _NOT_RUN.search(before)
        out.append(
            Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2), reason.group(1) if reason else None)
        )
    return out


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in DOCS.glob("*.md") if p.name not in ELSEWHERE)]


class MyModel(torch.nn.Module):
    """The small model the examples train."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def preamble() -> dict[str, Any]:
    """The namespace every page starts from."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    torch.manual_seed(0)
    return {
        "__name__": "__docs__",
        "torch": torch,
        "qop": qop,
        "MyModel": MyModel,
        "data": data,
        "loss_fn": torch.nn.functional.cross_entropy,
    }


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _missing_optional(code: str) -> str | None:
    for module in OPTIONAL:
        if re.search(rf"^\s*(import|from)\s+{module}\b", code, re.M) and not _installed(module):
            return module
    return None


@pytest.fixture
def docs_backend() -> Iterator[None]:
    """``torch.compile`` without a backend runs ``aot_eager`` (see the module docstring); dynamo starts clean."""
    backend = os.environ.get("QOP_DOCS_BACKEND", "aot_eager")
    original = torch.compile

    def compile_(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", backend)
        return original(*args, **kwargs)

    torch._dynamo.reset()
    flag = torch._dynamo.config.trace_autograd_ops
    torch.compile = compile_  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original  # type: ignore[assignment]
        torch._dynamo.config.trace_autograd_ops = flag
        torch._dynamo.reset()


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docs_backend: None) -> None:
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    namespace = preamble()
    ran = 0
    try:
        for block in blocks(page):
            if block.lang != "python" or block.not_run or _missing_optional(block.code):
                continue
            try:
                exec(compile(block.code, f"{page.name}:{block.line}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page.relative_to(ROOT)}, block at line {block.line} failed: {exc!r}") from exc
            ran += 1
    finally:
        torch.set_num_threads(threads)
        qop.optim.GlobalOptimManager.get_instance().initialize()
    has_python = any(b.lang == "python" for b in blocks(page))
    assert ran or not has_python or all(b.not_run for b in blocks(page) if b.lang == "python")


def test_not_run_blocks_are_rare_and_explained() -> None:
    python = [b for p in pages() for b in blocks(p) if b.lang == "python"]
    skipped = [b for b in python if b.not_run]
    assert len(python) >= 20, len(python)
    assert len(skipped) <= len(python) // 5, [(b.page.name, b.line, b.not_run) for b in skipped]
    assert all(len(b.not_run or "") > 10 for b in skipped)


def test_block_parser_sees_markers_and_languages(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- not run: needs a CUDA device -->\n```python\n"
        "y = 2\n```\n\n```bash\nls\n```\n"
    )
    found = blocks(page)
    assert [(b.lang, b.line, b.not_run) for b in found] == [
        ("python", 3, None),
        ("python", 8, "needs a CUDA device"),
        ("bash", 12, None),
    ]
    assert found[1].code == "y = 2\n"


def test_generated_sections_match_the_code() -> None:
    if not qop.HAS_CPU_KERNELS:
        pytest.skip("the op reference names the C++ CPU kernels, which are not built here")
    assert _docs.stale_pages(DOCS) == [], "run `python -m qop docs-table --write docs`"


def test_generated_tables_follow_the_classes() -> None:
    """The optimizer table is derived, not typed: every exported class appears with its real defaults."""
    table = _docs.optimizer_tables()
    for name in qop.optim.__all__:
        if name not in ("QopOptimizer", "GlobalOptimManager"):
            assert f"`qop.optim.{name}`" in table, name
    lion = table.split("### Lion", 1)[1].split("###", 1)[0]
    assert "| `lr` | `0.0001` |" in lion and "| `betas` | `(0.9, 0.99)` |" in lion
    assert "| `qop.optim.PagedLion8bit` | 8-bit | yes | no `optim_bits`, no `is_paged` |" in lion
    assert "| `qop.optim.Adagrad8bit` | 8-bit | no | `optim_bits=8` |" in table
    ops = _docs.op_reference()
    for name, schema in qop._schema.SCHEMAS.items():
        assert f"| `qop::{name}` | `{schema}` |" in ops
    assert "| `Rule.ADAM` | 1 |" in ops and "3 with `AMSGRAD`" in ops


def test_splice_replaces_only_its_section() -> None:
    begin, end = _docs._markers("x")
    text = f"intro\n{begin}\nold\n{end}\noutro\n"
    assert _docs.splice(text, "x", "new\n") == f"intro\n{begin}\nnew\n{end}\noutro\n"
    with pytest.raises(ValueError, match="no generated section"):
        _docs.splice("nothing here", "x", "new\n")


def test_docs_index_links_every_page() -> None:
    index = (DOCS / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"({page.name})" in index, page.name
    assert "(distributed.md)" in index
    readme = (ROOT / "README.md").read_text()
    assert "docs/README.md" in readme
    for link in re.findall(r"\]\(((?:docs/)?[\w-]+\.md)(?:#[\w-]+)?\)", index + readme):
        target = (DOCS / link) if not link.startswith("docs/") else ROOT / link
        if target.name != "distributed.md":
            assert target.is_file() or (ROOT / link).is_file(), link
