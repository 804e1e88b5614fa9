"""Smoke tests of the user-facing tools: the benchmark (``qop.bench``), ``python -m qop doctor`` and the demo.

They check structure and behaviour only; no timing is asserted (the benchmark is not a test).  The benchmark
ships with the package: it runs from a directory outside the source tree, importing qop from where it is
installed, and reads nothing relative to the repository.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import qop
import qop.bench

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_optim.py"


def _run(*args: str, timeout: float = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qop ...`` from ``cwd`` (the repository root by default) with qop importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-m", "qop", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def keep_threads() -> Iterator[None]:
    """The demo sets torch's thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_quick_writes_table_and_json(tmp_path: Path) -> None:
    proc = _run(
        "bench",
        "--quick",
        "--scale",
        "0.002",
        "--workloads",
        "single,many",
        "--families",
        "adam",
        "--providers",
        "torch,qop",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--budget",
        "0.05",
        "--out",
        str(tmp_path),
        "--name",
        "smoke",
    )
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


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark package."""
    return qop.bench


def test_gpu_workload_set_shapes(bench: ModuleType) -> None:
    """The GPU set's shapes, checked without allocating them; the CPU set is unchanged."""
    w = bench.make_workloads(kind="gpu")
    assert list(w) == ["single", "transformer", "many"]
    assert w["single"].shapes == ((2**28,),)
    assert 0.95e9 <= w["transformer"].n_params <= 1.1e9
    assert len(w["transformer"].shapes) == 2 + 18 * 12 + 2
    sizes = [bench.numel(s) for s in w["many"].shapes]
    assert len(sizes) == 1000 and all(4096 <= n <= 65536 for n in sizes) and len(set(sizes)) > 900
    assert bench.make_workloads(kind="gpu") == w  # seeded
    small = bench.make_workloads(1e-3, kind="gpu")  # --scale shrinks the GPU set too
    assert small["single"].n_params == int(2**28 * 1e-3) and len(small["many"].shapes) == 1
    assert small["transformer"].n_params < 0.01 * w["transformer"].n_params
    cpu = bench.make_workloads()
    assert cpu["single"].n_params == 16 * 2**20 and cpu["transformer"].n_params == 19_432_960
    assert len(cpu["many"].shapes) == 2000 and cpu["many"].n_params == 17_335_426


def test_bytes_model_by_hand(bench: ModuleType) -> None:
    n = 2**28
    # AdamW fp32: param r+w 8, grad r 4, two states r+w 2 x 8
    assert bench.table_step_bytes("adam", "torch", 32, [(n,)]) == 28 * n
    # Adam8bit: param r+w 8, grad r 4, two 8-bit states r+w 2 x 2, their absmax (4 B per 256 elements) r+w
    adam8 = (8 + 4 + 2 * 2) * n + 2 * (2 * 4 * n // 256)
    assert bench.table_step_bytes("adam", "qop", 8, [(n,)]) == adam8
    assert adam8 / n == pytest.approx(16.0625)
    assert bench.table_step_bytes("adam", "qop", 8, [(4095,)]) == 28 * 4095  # under min_8bit_size: 32-bit
    assert bench.table_step_bytes("sgd", "torch", 32, [(n,)]) == 20 * n
    assert bench.table_step_bytes("ademamix", "bnb", 8, [(n,)]) == 12 * n + 3 * (2 * n + 8 * n // 256)
    # LAMB/LARS of qop and bitsandbytes: a first pass reads params, grads and states once more
    assert bench.table_step_bytes("lamb", "qop", 32, [(n,)]) == (28 + 4 + 4 + 8) * n
    assert bench.table_step_bytes("lamb", "bnb", 8, [(n,)]) == adam8 + 8 * n + 2 * n + 8 * n // 256


def test_measured_bytes_follow_the_live_state(bench: ModuleType) -> None:
    """From the optimizer's own state tensors: the table plus a few bytes of step counters."""
    import qop

    p = torch.zeros(8192, requires_grad=True)
    p.grad = torch.full_like(p, 1e-3)
    for opt, provider, bits in (
        (torch.optim.AdamW([p], fused=True), "torch", 32),
        (qop.optim.Adam8bit([p]), "qop", 8),
        (qop.optim.LAMB8bit([p]), "qop", 8),
        (qop.optim.AdamW4bit([p]), "qop", 4),
        (qop.optim.AdamWFp8([p]), "qop", 8),
        (qop.optim.AdamW([p], optim_bits=16), "qop", 16),
    ):
        family = "lamb" if "LAMB" in type(opt).__name__ else "adam"
        opt.step()
        extra = bench.measured_step_bytes(opt, family, provider) - bench.table_step_bytes(
            family, provider, bits, [p.shape]
        )
        assert 0 <= extra <= 64, (type(opt).__name__, extra)


def test_bandwidth_peaks_and_memory_guard(bench: ModuleType) -> None:
    assert bench.nominal_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.nominal_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.nominal_bandwidth("NVIDIA GH200 480GB") is None
    assert bench.nominal_bandwidth("Tesla T4") is None
    w = bench.make_workloads(kind="gpu")["transformer"]
    spec = {s.label: s for s in bench.discover(["adam"], ["torch", "qop"], "cpu")}
    fused, foreach, q8 = (
        bench.row_memory_estimate(spec[k], w) for k in ("torch AdamW(fused)", "torch AdamW(foreach)", "qop Adam8bit")
    )
    assert 8 * w.n_params < fused < 12 * w.n_params  # two fp32 states, with a margin
    assert fused < foreach < 2 * fused and q8 < fused / 2


def test_percentile_clipping_reaches_the_optimizers(bench: ModuleType) -> None:
    specs = {s.label: s for s in bench.discover(["adam"], ["torch", "qop", "bnb"], "cpu", percentile_clipping=5)}
    p = torch.zeros(300, requires_grad=True)
    assert specs["qop Adam8bit"].build([p]).param_groups[0]["percentile_clipping"] == 5
    assert "percentile_clipping" not in specs["torch AdamW(fused)"].build([p]).param_groups[0]
    for label, spec in specs.items():  # a bitsandbytes class without the argument runs without, and says so
        if spec.provider == "bnb":
            cls = getattr(bench.import_optional("bnb"), label.split()[1])
            takes = "percentile_clipping" in inspect.signature(cls).parameters
            assert label.endswith("(no pct clip)") != takes, label
    with pytest.raises(SystemExit):
        bench.parse_args(["--percentile-clipping", "0"])


def test_bench_gpu_workload_set_on_cpu_reports_bandwidth(tmp_path: Path) -> None:
    proc = _run(
        "bench",
        "--workload-set",
        "gpu",
        "--scale",
        "1e-4",
        "--families",
        "adam",
        "--providers",
        "torch,qop",
        "--filter",
        "qop Adam8bit",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--budget",
        "0.05",
        "--retries",
        "0",
        "--peak-mib",
        "8",
        "--out",
        str(tmp_path),
        "--name",
        "gpuset",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "gpuset.md").read_text()
    assert "| state B/param | moved B/param | GB/s | % peak | peak RSS +MiB | reps | CPU wait |" in table
    assert "Bandwidth: " in table and "measured copy_" in table
    assert "### transformer: GPT-like, d=24, 18 layers" in table and "### many: tensors of 4K-64K elements" in table
    data = json.loads((tmp_path / "gpuset.json").read_text())
    meta, results = data["meta"], data["results"]
    assert meta["settings"]["workload_set"] == "gpu" and meta["settings"]["peak_mib"] == 8
    assert meta["bandwidth"]["copy_gbps"] > 0 and meta["bandwidth"]["peak_source"] == "measured copy_"
    ok = {(r["workload"], r["label"]): r for r in results if r["status"] == "ok"}
    assert {label for _, label in ok} == {"torch AdamW(fused)", "qop Adam8bit"}, results
    for r in ok.values():
        assert r["step_bytes"] > 0 and r["gbps"] > 0 and r["pct_peak"] > 0 and r["step_bytes_table"] > 0
        assert r["gbps"] == pytest.approx(r["step_bytes"] / r["ms"] / 1e6)
    assert ok[("single", "torch AdamW(fused)")]["step_bytes_per_param"] == pytest.approx(28.0, abs=0.01)
    assert ok[("single", "qop Adam8bit")]["step_bytes_per_param"] == pytest.approx(16.0625, abs=0.01)


@pytest.mark.skipif(not BENCH.is_file(), reason="benchmarks/ ships with the source tree only")
def test_step_ns_times_every_listed_optimizer() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "step_ns.py"),
            "--numel",
            "4097",
            "--optimizers",
            "Adam8bit,SGD8bit,Adam32bit",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
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
    for needle in ("torch", "bitsandbytes", "HAS_CPU_KERNELS", "CUDA available", "Meta"):
        assert needle in out, out
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"step", "percentile_clip", "quantize_blockwise"} <= rows, out  # one row per op


def test_unknown_command_prints_usage() -> None:
    from qop.__main__ import main

    assert main(["nope"]) == 2
    assert main(["--help"]) == 0


def test_demo_learns_with_8bit_states_compiled_and_beside_bnb(
    keep_threads: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every run learns; 8-bit states take ~2 B/param; the compiled step is one graph with no recompile while the
    lr changes at every step, and tracks the eager one; bitsandbytes runs beside when installed, else is named."""
    from qop import _demo

    result = _demo.cli(["--steps", "30", "--log-every", "10", "--backend", "aot_eager"])
    out = capsys.readouterr().out
    for needle in ("torch AdamW", "qop Adam8bit", "qop Adam8bit compiled", "bnb Adam8bit", "B/param"):
        assert needle in out, out
    full, q8, compiled = (result.curve(n) for n in (_demo.TORCH, _demo.QOP, _demo.COMPILED))
    assert full is not None and q8 is not None and compiled is not None
    assert q8.state_bytes / result.n_params < 2.5 and compiled.state_bytes == q8.state_bytes
    assert full.state_bytes / result.n_params >= 8.0
    assert compiled.graphs == 1 and compiled.recompiles == 0
    assert "1 graph, 0 recompiles in 30 steps" in out
    bnb = next(c for c in result.curves if c.name == _demo.BNB)
    assert bool(bnb.absent) == (importlib.util.find_spec("bitsandbytes") is None)
    for curve in (c for c in result.curves if not c.absent):
        assert [s for s, _ in curve.points] == [1, 10, 20, 30]
        assert curve.points[-1][1] < curve.points[0][1] - 0.1, (curve.name, curve.points)
        assert curve.final_loss < curve.points[0][1]
    for (_, a), (_, b) in zip(compiled.points, q8.points):
        assert abs(a - b) < 0.02, (compiled.points, q8.points)
    # the schedule really changed the lr at every step, and every run followed it
    lrs = [_demo.lr_lambda(30)(i) for i in range(30)]
    assert len(set(lrs)) >= 25


def test_demo_without_optional_runs(keep_threads: None, capsys: pytest.CaptureFixture[str]) -> None:
    from qop import _demo

    result = _demo.cli(["--steps", "3", "--log-every", "1", "--no-compile", "--no-bnb"])
    assert [c.name for c in result.curves] == [_demo.TORCH, _demo.QOP]
    assert "compiled" not in capsys.readouterr().out


def test_demo_plot(keep_threads: None, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from qop import _demo

    _demo.cli(["--steps", "2", "--log-every", "1", "--no-compile", "--plot", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 1000


_AUDIT = """
import json, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and isinstance(args[0], str) else None)
from qop.__main__ import main
rc = main(sys.argv[2:])
json.dump({"rc": rc, "opened": opened}, open(sys.argv[1], "w"))
"""


def test_bench_runs_outside_the_source_tree(tmp_path: Path) -> None:
    """From a directory outside the checkout, with qop imported from where it is installed: the benchmark
    runs, writes to ./qop-bench-out, names the optional libraries it could not time, and opens no file of
    the source tree outside the package itself (an editable install maps the package into the tree)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [
        "bench",
        "--quick",
        "--scale",
        "0.002",
        "--workloads",
        "single",
        "--families",
        "adam",
        "--providers",
        "torch,qop,bnb,torchao",
        "--filter",
        "qop Adam8bit",
        "--repeats",
        "2",
        "--budget",
        "0.05",
        "--peak-mib",
        "4",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _AUDIT, str(tmp_path / "audit.json"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["rc"] == 0
    table = (tmp_path / "qop-bench-out" / "bench_optim.md").read_text()
    assert "| qop Adam8bit |" in table and "| torch AdamW(fused) |" in table
    for module, provider in (("bitsandbytes", "bnb"), ("torchao", "torchao")):
        if importlib.util.find_spec(module) is None:
            assert f"{provider} (`pip install" in table and "not installed" in proc.stderr
    package = Path(qop.__file__).resolve().parent
    allowed = [package, ROOT / "meta", ROOT / ".venv", ROOT / "build"]
    tree_files = [p for p in ((tmp_path / s).resolve() for s in audit["opened"]) if p.is_relative_to(ROOT)]
    stray = [str(p) for p in tree_files if not any(p.is_relative_to(a) for a in allowed)]
    assert not stray, stray


def test_bench_script_in_the_tree_is_a_thin_entry_point() -> None:
    """``benchmarks/bench_optim.py`` only forwards to the package (the commands of RESULTS.md keep working)."""
    text = BENCH.read_text()
    assert "from qop.bench import main" in text and len(text.splitlines()) < 40
    assert all(len(p.read_text().splitlines()) < 400 for p in Path(qop.bench.__file__).parent.glob("*.py"))
