"""The training-quality benchmark (``benchmarks/bench_quality.py``) and the demo's ``--formats``, in short runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import qop
from qop.bench import formats, quality

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_formats_parse_names_and_arguments() -> None:
    f = formats.parse("AdamW:optim_bits=16,bf16_stochastic_round=True,betas=(0.9, 0.95)")
    assert f.cls is qop.optim.AdamW and not f.absent
    assert f.kwargs == {"optim_bits": 16, "bf16_stochastic_round": True, "betas": (0.9, 0.95)}
    missing = formats.parse("NoSuchAdam")
    assert missing.cls is None and "NoSuchAdam" in missing.absent
    with pytest.raises(ValueError, match="key=value"):
        formats.parse("AdamW:16")


def test_quick_run_writes_the_table(tmp_path: Path, keep_threads: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quality.md"
    assert quality.main(["--quick", "--steps", "3", "--out", str(out), "--optimizers", "Lion:lr=1e-4"]) == 0
    table = out.read_text()
    assert table.strip() == capsys.readouterr().out.strip()
    assert "| optimizer | final eval loss | vs fp32 AdamW | state B/param | step ms | x fused AdamW |" in table
    for label in (
        quality.REFERENCE,
        "qop AdamW ",
        "qop AdamW:optim_bits=16 ",
        "qop AdamW8bit ",
        "qop AdamW bf16 params, nearest rounding",
        "qop AdamW bf16 params, stochastic rounding",
        "qop Lion:lr=1e-4",
    ):
        assert f"| {label}" in table, label
    rows = {r.label: r for r in quality.run(["tinylm"], 2, quick=True)}
    assert rows["qop AdamW:optim_bits=16"].state_bytes_per_param == pytest.approx(4.0, rel=0.01)
    assert rows[quality.REFERENCE].state_bytes_per_param == pytest.approx(8.0, rel=0.01)
    assert all(math_ok(r.final_loss) for r in rows.values() if not r.absent)
    if importlib.util.find_spec("sklearn") is None:
        assert "absent: needs scikit-learn" in table
    else:
        assert "### digits" in table and "needs scikit-learn" not in table


def test_torchao_rows_on_request() -> None:
    """``--torchao`` adds torchao's classes of the same names (absent, with the reason, where not installed)."""
    plain = [r.label for r in quality.providers()]
    rows = {r.label: r for r in quality.providers(torchao=True)}
    assert not any(label.startswith("torchao") for label in plain)
    for name in quality.TORCHAO_CLASSES:
        row = rows[f"torchao {name}"]
        if importlib.util.find_spec("torchao") is None:
            assert row.build is None and "not installed" in row.absent
        else:
            assert row.build is not None and not row.absent


def math_ok(x: float) -> bool:
    return x == x and 0 < x < 10


def test_script_is_a_thin_entry_point() -> None:
    text = (ROOT / "benchmarks" / "bench_quality.py").read_text()
    assert "from qop.bench.quality import main" in text and len(text.splitlines()) < 30


def test_demo_shows_formats_side_by_side(keep_threads: None, capsys: pytest.CaptureFixture[str]) -> None:
    from qop import _demo

    result = _demo.cli(
        ["--steps", "2", "--no-compile", "--no-bnb", "--formats", "AdamW:optim_bits=16", "NoSuchAdam", "--threads", "1"]
    )
    bf16 = result.curve("qop AdamW:optim_bits=16")
    assert bf16 is not None and bf16.state_bytes / result.n_params == pytest.approx(4.0, rel=0.01)
    text = capsys.readouterr().out
    assert "qop NoSuchAdam" in text and "has no NoSuchAdam" in text


def test_fp8_vanishing_gradients_script(capsys: pytest.CaptureFixture[str]) -> None:
    """The fp8 script trains its ReLU MLP: qop's AdamWFp8 moves the parameters about as far as fp32 AdamW."""
    import runpy

    script = runpy.run_path(str(ROOT / "benchmarks" / "fp8_vanishing_gradients.py"), run_name="fp8_script")
    assert script["main"](["--steps", "6", "--no-torchao"]) == 0
    moved = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  "):
            label, value = line.strip().rsplit(" ", 1)
            moved[label.strip()] = float(value)
    assert abs(moved["qop AdamWFp8"] - moved["torch AdamW fp32"]) < 0.01, moved
