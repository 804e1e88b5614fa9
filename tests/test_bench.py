"""Smoke tests of the user-facing tools: the benchmark harness, ``python -m qop doctor`` and the demo.

They check structure and behaviour only; no timing is asserted (the benchmark is not a test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_optim.py"


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qop ...`` from the repository root with qop importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "qop", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def keep_threads() -> Iterator[None]:
    """The demo sets torch's thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(not BENCH.is_file(), reason="benchmarks/ ships with the source tree only")
def test_bench_quick_writes_table_and_json(tmp_path: Path) -> None:
    proc = _run("bench", "--quick", "--scale", "0.002", "--workloads", "single,many", "--families", "adam",
                "--providers", "torch,qop", "--repeats", "2", "--warmup", "1", "--budget", "0.05",
                "--out", str(tmp_path), "--name", "smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "smoke.md").read_text()
    assert "| optimizer | median ms | min ms | Mparam/s | x AdamW(fused) | x bnb | state B/param |" in table
    assert "### single:" in table and "### many:" in table
    assert "| torch AdamW(fused) |" in table and "| qop Adam8bit |" in table
    data = json.loads((tmp_path / "smoke.json").read_text())
    meta, results = data["meta"], data["results"]
    for key in ("cpu", "torch", "qop_commit", "qop_cpu_kernels", "qop_cpu_step_kernel", "workloads", "command"):
        assert key in meta
    assert set(meta["workloads"]) == {"single", "many"}
    labels = {(r["workload"], r["label"]) for r in results}
    assert ("single", "torch AdamW(fused)") in labels and ("many", "qop Adam32bit") in labels
    assert all(r["provider"] in ("torch", "qop") and r["family"] == "adam" for r in results)
    ok = [r for r in results if r["status"] == "ok"]
    assert ok, results
    for r in ok:
        assert r["ms_median"] > 0 and r["mparam_s"] > 0 and 1 <= r["repeats"] <= 2
        assert r["x_fused"] is not None and r["state_bytes_per_param"] > 0
    by = {(r["workload"], r["label"]): r for r in ok}
    assert by[("single", "torch AdamW(fused)")]["x_fused"] == pytest.approx(1.0)
    if ("single", "qop Adam8bit") in by:
        assert by[("single", "qop Adam8bit")]["state_bytes_per_param"] < 2.5
        assert by[("single", "torch AdamW(fused)")]["state_bytes_per_param"] >= 8.0


@pytest.mark.skipif(not BENCH.is_file(), reason="benchmarks/ ships with the source tree only")
def test_step_ns_times_every_listed_optimizer() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_ns.py"), "--numel", "4097",
                           "--optimizers", "Adam8bit,SGD8bit,Adam32bit"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("threads=1 numel=4097")
    assert "torch AdamW(fused)" in lines[1]
    assert [line.split()[1] for line in lines[2:]] == ["Adam8bit", "SGD8bit", "Adam32bit"]
    assert all("ns/element" in line and "x fused" in line for line in lines[2:])


def test_doctor_reports_versions_and_kernels() -> None:
    proc = _run("doctor", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in ("torch", "bitsandbytes", "HAS_CPU_KERNELS", "CUDA available", "step_8bit", "step_32bit", "Meta"):
        assert needle in out, out


def test_unknown_command_prints_usage() -> None:
    from qop.__main__ import main

    assert main(["nope"]) == 2
    assert main(["--help"]) == 0


def test_demo_learns_with_8bit_states(keep_threads: None, capsys: pytest.CaptureFixture[str]) -> None:
    from qop import _demo

    result = _demo.cli(["--steps", "24", "--log-every", "8"])
    out = capsys.readouterr().out
    assert "torch AdamW" in out and "qop Adam8bit" in out and "B/param" in out
    full, q8 = result.curves
    assert q8.state_bytes / result.n_params < 2.5
    assert full.state_bytes / result.n_params >= 8.0
    for curve in result.curves:
        assert [s for s, _ in curve.points] == [1, 8, 16, 24]
        assert curve.points[-1][1] < curve.points[0][1], curve.points
        assert curve.final_loss < curve.points[0][1]


def test_demo_plot(keep_threads: None, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from qop import _demo

    _demo.cli(["--steps", "2", "--log-every", "1", "--plot", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 1000
