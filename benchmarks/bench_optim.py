"""Optimizer step throughput: qop (8/32-bit) beside torch.optim, bitsandbytes and torchao, in one process.

Every optimizer runs on the same parameters with the same fixed, pre-allocated gradients.  A cell (one
optimizer on one workload) builds the optimizer, runs warm-up steps (state creation, compilation), then
times single steps and reports their median; repeats stop early once a cell has used its time budget,
so slow baselines (bitsandbytes' CPU path) cannot stretch a run.  Speed is reported in Mparam/s and as a
ratio to ``torch.optim.AdamW(fused=True)`` in float32 on the same workload; memory as optimizer-state
bytes per parameter (from the state tensors) and the peak RSS growth while the state is built and used.

    python benchmarks/bench_optim.py                      # everything, ~25 min on 2 cores
    python -m qop bench --quick                           # 1/16-size workloads, 2-5 min; filters shorten it
    python -m qop bench --workloads single --families adam --providers torch,qop,bnb --plot
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Compile torchao's step in this process: inductor's pool of compile workers would otherwise keep warming
# up in the background and slow the cells timed after it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a source tree without installing qop

import qop  # noqa: E402
from qop._demo import optimizer_state_bytes  # noqa: E402

BASELINE = "torch AdamW(fused)"
PROVIDERS = ("torch", "qop", "bnb", "torchao")
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
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ------------------------------------------------------------------------------------------ workloads
@dataclass(frozen=True)
class Workload:
    """Parameter shapes of one benchmark case."""

    name: str
    description: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def n_params(self) -> int:
        """Total elements."""
        return sum(_numel(s) for s in self.shapes)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _round8(x: float) -> int:
    return max(8, round(x / 8) * 8)


def make_workloads(scale: float = 1.0, seed: int = 0) -> dict[str, Workload]:
    """The three workloads: one big tensor, a transformer's parameters, many small tensors (scaled)."""
    single = (max(256, int(16 * 2**20 * scale)),)
    # GPT-like: 5 layers x 12 tensors (qkv, out, fc1, fc2 weights and biases, 2 layer norms) + 4 others.
    r = scale**0.5
    d, vocab, ctx, layers = _round8(512 * r), _round8(6144 * r), _round8(1024 * r), 5
    tshapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        tshapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    tshapes += [(d,), (d,)]
    g = torch.Generator().manual_seed(seed)
    count = max(1, round(2000 * scale))
    many = tuple((int(n),) for n in torch.randint(1024, 16 * 1024 + 1, (count,), generator=g))
    out = [
        Workload("single", "one fp32 tensor", (single,)),
        Workload("transformer", f"GPT-like, d={d}, {layers} layers, vocab {vocab}", tuple(tshapes)),
        Workload("many", "tensors of 1K-16K elements", many),
    ]
    return {w.name: w for w in out}


# ------------------------------------------------------------------------------------------ optimizers
@dataclass(frozen=True)
class OptSpec:
    """One optimizer to time: its row label, provider, family and how to build it on a parameter list."""

    label: str
    provider: str
    family: str
    bits: int
    build: Callable[[list[Tensor]], torch.optim.Optimizer] = field(compare=False, repr=False)
    skip_workloads: tuple[tuple[str, str], ...] = ()  # (workload, reason)


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


def _import_optional(name: str) -> Any:
    """Import an optional library quietly; None when it is missing or broken."""
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


def _library_version(distribution: str) -> str | None:
    """An installed distribution's version from its metadata (no import: torchao alone takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def discover(families: Sequence[str], providers: Sequence[str], device: str) -> list[OptSpec]:
    """Every optimizer of the chosen families and providers that exists in this environment."""
    specs: list[OptSpec] = []
    libs = {"qop": qop.optim, **{p: _import_optional(p) for p in ("bnb", "torchao") if p in providers}}
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
                    specs.append(OptSpec(f"{provider} {stem}{bits}bit", provider, family, bits, _builder(cls, kw)))
        if family == "adam" and "torchao" in providers and libs.get("torchao") is not None:
            cls = getattr(libs["torchao"], "AdamW8bit", None)
            if cls is not None:
                specs.append(OptSpec(
                    "torchao AdamW8bit", "torchao", family, 8, _builder(cls, dict(hp, weight_decay=1e-2)),
                    skip_workloads=(("many", "torch.compile(dynamic=False) recompiles for each of ~2000 shapes"),),
                ))
    return specs


def _fused_ok(cls: type, device: str) -> bool:
    """Whether ``cls(fused=True)`` runs on this device (CPU support differs between torch versions)."""
    p = torch.zeros(8, device=device, requires_grad=True)
    p.grad = torch.zeros_like(p)
    try:
        cls([p], fused=True).step()
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


# ------------------------------------------------------------------------------------------ memory
def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS so RSS deltas start from a clean floor."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples RSS in a background thread (the GIL is released inside torch kernels) to find its peak."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Result:
    """One cell of the table: an optimizer on a workload."""

    workload: str
    label: str
    provider: str
    family: str
    bits: int
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    ms: float | None = None  # the statistic (median or min, --stat) behind Mparam/s and the ratios
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    repeats: int = 0
    warmup: int = 0
    mparam_s: float | None = None
    x_fused: float | None = None
    x_bnb: float | None = None
    state_bytes: int | None = None
    state_bytes_per_param: float | None = None
    rss_delta_mib: float | None = None
    peak_rss_delta_mib: float | None = None
    baseline_ms: float | None = None  # same statistic of the AdamW(fused) steps interleaved with this row's
    cpu_wait: float | None = None  # PSI CPU "some" stall time / wall time while timing: > 0.1 means contention
    cell_s: float | None = None  # wall time the whole cell took (build, warm-up, timing, clean-up)


@dataclass
class Settings:
    """How long each cell may run."""

    warmup: int = 3
    repeats: int = 20
    min_repeats: int = 3
    budget_s: float = 2.0
    device: str = "cpu"
    paired: bool = True
    stat: str = "median"
    wait_quiet_s: float = 0.0
    retries: int = 2
    clock: str = "wall"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_params(w: Workload, device: str, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Parameters (leaf tensors with ``.grad`` set) and their initial values, generated once per workload."""
    g = torch.Generator().manual_seed(seed)
    params, init = [], []
    for shape in w.shapes:
        x = (torch.rand(shape, generator=g) * 0.2 - 0.1).to(device)
        p = x.clone().requires_grad_(True)
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
        params.append(p)
        init.append(x)
    return params, init


def cpu_wait_us() -> int | None:
    """Microseconds some task spent waiting for a CPU (Linux PSI); rises when other work shares the cores."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def wait_until_quiet(timeout: float, threshold: float = 0.05, window: float = 0.5) -> float:
    """Wait (up to ``timeout`` seconds) for a window in which tasks waited for a CPU < ``threshold`` of the time."""
    deadline = time.perf_counter() + timeout
    share = 1.0
    while True:
        w0, t0 = cpu_wait_us(), time.perf_counter()
        if w0 is None:
            return 0.0
        time.sleep(window)
        w1 = cpu_wait_us()
        share = ((w1 or w0) - w0) / 1e6 / (time.perf_counter() - t0)
        if share < threshold or time.perf_counter() >= deadline:
            return share


def _step(opt: torch.optim.Optimizer, s: Settings) -> float:
    """One timed optimizer step in seconds: wall time, or this process's CPU time (``--clock cpu``)."""
    clock = time.process_time if s.clock == "cpu" else time.perf_counter
    t0 = clock()
    opt.step()
    _sync(s.device)
    return clock() - t0


def _timed_steps(
    opt: torch.optim.Optimizer, baseline: torch.optim.Optimizer | None, s: Settings
) -> tuple[list[float], list[float], float | None]:
    """Timed steps of ``opt`` (each followed by one of ``baseline``) until the budget; and the CPU-wait share."""
    times: list[float] = []
    paired: list[float] = []
    spent = 0.0
    wait0, wall0 = cpu_wait_us(), time.perf_counter()
    for _ in range(s.repeats):
        times.append(_step(opt, s))
        spent += times[-1]
        if baseline is not None:
            paired.append(_step(baseline, s))
        if (spent >= s.budget_s and len(times) >= s.min_repeats) or spent >= 4 * s.budget_s:
            break
    wait1, wall1 = cpu_wait_us(), time.perf_counter()
    wait = None if wait0 is None or wait1 is None else (wait1 - wait0) / 1e6 / (wall1 - wall0)
    return times, paired, wait


def time_cell(
    spec: OptSpec,
    w: Workload,
    params: list[Tensor],
    init: list[Tensor],
    s: Settings,
    baseline: torch.optim.Optimizer | None = None,
) -> tuple[Result, torch.optim.Optimizer | None]:
    """Build ``spec`` on ``params``, warm it up and time single steps (median), within the time budget.

    With ``baseline`` (a warmed-up torch AdamW(fused) on the same parameters) every timed step is followed
    by a timed baseline step, so the speed ratio compares steps taken under the same machine load.  Returns
    the result and the warmed-up optimizer (None on error or skip; the caller keeps the baseline's).
    """
    r = Result(w.name, spec.label, spec.provider, spec.family, spec.bits)
    for name, reason in spec.skip_workloads:
        if name == w.name:
            r.status, r.reason = "skipped", reason
            return r, None
    with torch.no_grad():
        for p, x in zip(params, init):
            p.copy_(x)
    _release_memory()
    if s.wait_quiet_s > 0:
        wait_until_quiet(s.wait_quiet_s)
    base = rss_bytes()
    opt = None
    times: list[float] = []
    paired: list[float] = []
    try:
        with PeakRSS() as peak:
            opt = spec.build(params)
            start = time.perf_counter()
            while r.warmup < max(1, s.warmup):
                opt.step()
                _sync(s.device)
                r.warmup += 1
                if time.perf_counter() - start > s.budget_s:
                    break
        r.peak_rss_delta_mib = (peak.peak - base) / 2**20
        r.rss_delta_mib = (rss_bytes() - base) / 2**20
        r.state_bytes = optimizer_state_bytes(opt)
        r.state_bytes_per_param = r.state_bytes / w.n_params
        for attempt in range(1 + s.retries):
            t, b, wait = _timed_steps(opt, baseline, s)
            if attempt == 0 or (wait or 0.0) < (r.cpu_wait or 0.0):
                times, paired, r.cpu_wait = t, b, wait
            # A shared machine stretches OpenMP steps unevenly: re-time cheap cells once the CPUs are free.
            if r.cpu_wait is None or r.cpu_wait < 0.1 or statistics.median(times) > s.budget_s / 4:
                break
            wait_until_quiet(max(s.wait_quiet_s, 5.0))
    except Exception as exc:  # one broken optimizer must not end the run
        r.status, r.reason = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        opt = None
        return r, None
    finally:
        _release_memory()
    r.repeats = len(times)
    stat = min if s.stat == "min" else statistics.median
    r.ms_median = statistics.median(times) * 1e3
    r.ms_min, r.ms_max = min(times) * 1e3, max(times) * 1e3
    r.ms = stat(times) * 1e3
    r.mparam_s = w.n_params / (r.ms * 1e-3) / 1e6
    if paired:
        r.baseline_ms = stat(paired) * 1e3
        r.x_fused = r.baseline_ms / r.ms
    return r, opt


def add_ratios(results: list[Result]) -> None:
    """Fill missing speed ratios (unpaired runs) and qop's ratio to bitsandbytes' class of the same name.

    Ratios to bitsandbytes go through each row's own (paired) baseline: ``x_bnb = x_fused(qop) / x_fused(bnb)``,
    so a change of machine load between the two rows cancels out.
    """
    by_key = {(r.workload, r.label): r for r in results if r.status == "ok"}
    for r in results:
        if r.status != "ok" or r.ms is None or r.x_fused is not None:
            continue
        base = by_key.get((r.workload, BASELINE))
        if base is not None and base.ms:
            r.x_fused = base.ms / r.ms
    for r in results:
        if r.status == "ok" and r.provider == "qop" and r.x_fused:
            bnb = by_key.get((r.workload, "bnb " + r.label.split(" ", 1)[1]))
            if bnb is not None and bnb.x_fused:
                r.x_bnb = r.x_fused / bnb.x_fused


# ------------------------------------------------------------------------------------------ reporting
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str:
    """The CPU's model name (lscpu, then /proc/cpuinfo, then platform)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _cpu_kernel_source() -> str:
    """Where qop's CPU step kernel comes from: the C++ extension or the Python reference."""
    try:
        dump = torch._C._dispatch_dump("qop::step_8bit")
    except RuntimeError:
        return "unknown"
    for line in dump.splitlines():
        if line.startswith("CPU:"):
            return "reference (python)" if ".py:" in line else "native (C++)"
    return "none"


def metadata(args: argparse.Namespace, workloads: dict[str, Workload]) -> dict[str, Any]:
    """Machine, versions, qop commit and kernel state, and the command line: enough to reproduce a table."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = float("nan")
    dirty = _git("status", "--porcelain", "--", "qop", "csrc", "meta", "setup.py")
    return {
        "command": args.command_line,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": _library_version("bitsandbytes"),
        "torchao": _library_version("torchao"),
        "qop": qop.__version__,
        "qop_commit": _git("rev-parse", "--short", "HEAD"),
        "qop_tree_dirty": bool(dirty),
        "qop_cpu_kernels": bool(qop.HAS_CPU_KERNELS),
        "qop_cpu_step_kernel": _cpu_kernel_source(),
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "budget_s": args.budget, "scale": args.scale,
                     "paired": args.paired, "stat": args.stat, "wait_quiet_s": args.wait_quiet,
                     "retries": args.retries, "clock": args.clock},
        "workloads": {n: {"description": w.description, "tensors": len(w.shapes), "params": w.n_params}
                      for n, w in workloads.items()},
    }


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    """One table per workload, plus a header naming the machine and kernel state."""
    lines = [
        f"qop {meta['qop']} @ {meta['qop_commit']}{' (dirty tree)' if meta['qop_tree_dirty'] else ''}, "
        f"CPU step kernel: {meta['qop_cpu_step_kernel']}; torch {meta['torch']}, "
        f"bitsandbytes {meta['bitsandbytes']}, torchao {meta['torchao']}",
        f"{meta['cpu']}, {meta['logical_cpus']} logical CPUs, {meta['memory_gib']} GiB, "
        f"torch threads {meta['torch_threads']}, device {meta['device']}",
        f"`{meta['command']}`",
        "",
        f"Mparam/s and ratios use the {meta['settings']['stat']} of the timed steps "
        f"({meta['settings'].get('clock', 'wall')} clock); "
        "x AdamW(fused): speed relative to torch.optim.AdamW(fused=True) fp32 "
        + ("from baseline steps interleaved with this row's steps" if meta["settings"]["paired"] else
           "timed in its own row") + "; x bnb: qop's speed relative to bitsandbytes' class of the same name; "
        "CPU wait: share of the timed wall time some task waited for a CPU (PSI), above ~10% the machine was "
        "shared and timings are noisy.",
        "",
    ]
    head = ("| optimizer | median ms | min ms | Mparam/s | x AdamW(fused) | x bnb | state B/param | peak RSS +MiB "
            "| reps | CPU wait |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, w in meta["workloads"].items():
        rows = [r for r in results if r.workload == name]
        if not rows:
            continue
        lines += [f"### {name}: {w['description']} ({w['tensors']} tensors, {w['params'] / 1e6:.2f}M params)", "",
                  head]
        for r in rows:
            if r.status != "ok":
                lines.append(f"| {r.label} | {r.status}: {r.reason.replace('|', '/')} |" + "  |" * 9)
                continue
            wait = "" if r.cpu_wait is None else f"{100 * r.cpu_wait:.0f}%"
            lines.append(
                f"| {r.label} | {_fmt(r.ms_median, '.2f')} | {_fmt(r.ms_min, '.2f')} | {_fmt(r.mparam_s, '.0f')} | "
                f"{_fmt(r.x_fused, '.2f')} | {_fmt(r.x_bnb, '.1f')} | {_fmt(r.state_bytes_per_param, '.2f')} | "
                f"{_fmt(r.peak_rss_delta_mib, '.0f')} | {r.repeats} | {wait} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[Result], meta: dict[str, Any], path: Path) -> None:
    """Horizontal bars of the speed ratio to torch AdamW(fused), one panel per workload (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("[bench] --plot needs matplotlib (pip install matplotlib); no chart written", file=sys.stderr)
        return
    names = [n for n in meta["workloads"] if any(r.workload == n and r.status == "ok" for r in results)]
    if not names:
        return
    colors = {"torch": "tab:gray", "qop": "tab:blue", "bnb": "tab:orange", "torchao": "tab:green"}
    height = max(3.0, 0.28 * max(sum(r.workload == n for r in results) for n in names) + 1.2)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), height), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in results if r.workload == name and r.status == "ok" and r.x_fused]
        bars = ax.barh([r.label for r in rows], [r.x_fused for r in rows], color=[colors[r.provider] for r in rows])
        ax.bar_label(bars, labels=[f"{r.x_fused:.2f}x" for r in rows], padding=2, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_yaxis()
        ax.set_title(f"{name} ({meta['workloads'][name]['params'] / 1e6:.2f}M params)")
        ax.set_xlabel("speed vs torch AdamW(fused) fp32 (higher is faster)")
    fig.suptitle(f"{meta['cpu']}, {meta['torch_threads']} threads; qop CPU kernel: {meta['qop_cpu_step_kernel']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None, prog: str = "python benchmarks/bench_optim.py") -> argparse.Namespace:
    """Command-line options (``--quick`` shrinks workloads, repeats and the time budget)."""
    p = argparse.ArgumentParser(prog=prog, description="qop optimizer step benchmark (CPU or CUDA).")
    p.add_argument("--workloads", type=_csv, default=["single", "transformer", "many"],
                   help="comma list of single,transformer,many (default all)")
    p.add_argument("--families", type=_csv, default=list(FAMILIES), help=f"comma list of {','.join(FAMILIES)}")
    p.add_argument("--providers", type=_csv, default=list(PROVIDERS), help="comma list of torch,qop,bnb,torchao")
    p.add_argument("--filter", default="", help="only optimizers whose label contains this (baseline always kept)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per cell (default 3, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="max timed steps per cell (default 20, quick 5)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed steps per cell (default 2, quick 0.3)")
    p.add_argument("--scale", type=float, default=None, help="workload size factor (default 1, quick 1/16)")
    p.add_argument("--quick", action="store_true", help="small workloads and a short budget: a smoke run")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic of the timed steps behind Mparam/s and the ratios (min resists a shared machine)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each cell wait up to SECONDS for the CPUs to be idle (PSI CPU wait < 5%%)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time steps by wall clock (default) or by this process's CPU time: with --threads 1 the "
                        "latter is robust to other work sharing the CPUs")
    p.add_argument("--retries", type=int, default=None,
                   help="re-time a cheap cell up to N times while other work shares the CPUs (default 2, quick 0)")
    p.add_argument("--no-paired", dest="paired", action="store_false",
                   help="do not interleave a baseline AdamW(fused) step after each timed step (ratios then compare "
                        "rows timed at different moments)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), help="directory for the .md/.json/.png")
    p.add_argument("--name", default="bench_optim", help="file stem of the outputs (default bench_optim)")
    p.add_argument("--plot", action="store_true", help="also write a bar chart PNG (needs matplotlib)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.command_line = " ".join([prog, *argv])
    quick = args.quick
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.repeats = args.repeats if args.repeats is not None else (5 if quick else 20)
    args.budget = args.budget if args.budget is not None else (0.3 if quick else 2.0)
    args.scale = args.scale if args.scale is not None else (1 / 16 if quick else 1.0)
    args.retries = args.retries if args.retries is not None else (0 if quick else 2)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times host CPU work only; use the wall clock on a GPU")
    for name, allowed in (("workloads", ("single", "transformer", "many")), ("families", tuple(FAMILIES)),
                          ("providers", PROVIDERS)):
        bad = [v for v in getattr(args, name) if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
    return args


def run(args: argparse.Namespace) -> tuple[list[Result], dict[str, Any]]:
    """Time every selected optimizer on every selected workload; the baseline first in each workload."""
    torch.set_num_threads(args.threads)
    gc.collect()
    gc.freeze()  # later collections skip the import-time heap: each cell's clean-up costs milliseconds, not 0.25 s
    all_workloads = make_workloads(args.scale)
    workloads = {n: all_workloads[n] for n in args.workloads}
    families = list(dict.fromkeys(["adam", *args.families]))
    providers = list(dict.fromkeys(["torch", *args.providers]))
    specs = discover(families, providers, args.device)
    baseline = [s for s in specs if s.label == BASELINE]
    wanted = [s for s in specs if s.label != BASELINE and s.family in args.families and s.provider in args.providers
              and args.filter in s.label]
    settings = Settings(args.warmup, args.repeats, min(3, args.repeats), args.budget, args.device, args.paired,
                        args.stat, args.wait_quiet, args.retries, args.clock)
    meta = metadata(args, workloads)
    results: list[Result] = []
    for w in workloads.values():
        params, init = make_params(w, args.device)
        print(f"[bench] {w.name}: {w.description}, {len(w.shapes)} tensors, {w.n_params / 1e6:.2f}M params",
              file=sys.stderr)
        reference: torch.optim.Optimizer | None = None  # the warmed-up baseline, stepped between timed steps
        for spec in baseline + wanted:
            t0 = time.perf_counter()
            r, opt = time_cell(spec, w, params, init, settings, reference)
            r.cell_s = time.perf_counter() - t0
            if spec.label == BASELINE and settings.paired:
                reference = opt
            del opt
            results.append(r)
            msg = (f"{r.ms:9.2f} ms  {r.mparam_s:8.1f} Mparam/s  x{r.x_fused or 1:.2f} fused  "
                   f"cpu-wait {100 * (r.cpu_wait or 0):3.0f}%" if r.status == "ok" else f"{r.status}: {r.reason}")
            print(f"[bench]   {spec.label:<24} {msg}", file=sys.stderr)
        del params, init, reference
        _release_memory()
    add_ratios(results)
    return results, meta


def main(argv: Sequence[str] | None = None, prog: str = "python benchmarks/bench_optim.py") -> int:
    """Run the benchmark, print the markdown table and write it with the JSON (and PNG) under ``--out``."""
    args = parse_args(argv, prog)
    results, meta = run(args)
    table = markdown(results, meta)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(table + "\n")
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]},
                                                      indent=1) + "\n")
    written = [out / f"{args.name}.md", out / f"{args.name}.json"]
    if args.plot:
        (out / f"{args.name}.png").unlink(missing_ok=True)
        plot(results, meta, out / f"{args.name}.png")
        if (out / f"{args.name}.png").exists():
            written.append(out / f"{args.name}.png")
    print("[bench] wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
