"""Timing one benchmark cell: build an optimizer on a workload's parameters, warm it up, time single steps.

A cell builds the optimizer, runs warm-up steps (state creation, compilation), then times single steps and
reports their median (or min); repeats stop early once the cell has used its time budget, so slow baselines
(bitsandbytes' CPU path) cannot stretch a run.  With pairing, every timed step is followed by a timed step of
the ``torch.optim.AdamW(fused=True)`` baseline, so speed ratios compare steps taken under the same load.  On
CUDA a step is timed by the wall clock between a synchronize before it and one after it, so host-side launch
overhead counts, as it does in training.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .measure import (
    PeakRSS,
    cuda_free_bytes,
    measured_step_bytes,
    optimizer_state_bytes,
    release_memory,
    row_memory_estimate,
    rss_bytes,
    sync,
    table_step_bytes,
)
from .providers import BASELINE, OptSpec
from .workloads import Workload


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
    cuda_delta_mib: float | None = None  # device memory the row still holds after timing (its state)
    peak_cuda_delta_mib: float | None = None  # peak device memory growth from building to the last timed step
    step_bytes: int | None = None  # bytes one step moves, from the live tensors (module docstring)
    step_bytes_per_param: float | None = None
    step_bytes_table: int | None = None  # the same by the family table, for comparison
    gbps: float | None = None  # step_bytes / the statistic's step time
    pct_peak: float | None = None  # gbps as a percentage of the peak in the metadata
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
    peak_gbps: float | None = None  # what "% peak" divides by


def make_params(w: Workload, device: str, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Parameters (leaf tensors with ``.grad`` set) and their initial values, generated once per workload
    (on a CUDA device by its own generator: a 1B-parameter workload would take long on the host)."""
    cuda = device.startswith("cuda")
    g = torch.Generator(device=device if cuda else "cpu").manual_seed(seed)
    params, init = [], []
    for shape in w.shapes:
        if cuda:
            x = torch.rand(shape, generator=g, device=device).mul_(0.2).sub_(0.1)
            grad = torch.randn(shape, generator=g, device=device).mul_(1e-3)
        else:
            x = (torch.rand(shape, generator=g) * 0.2 - 0.1).to(device)
            grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
        p = x.clone().requires_grad_(True)
        p.grad = grad
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
    sync(s.device)  # the device is idle when the clock starts
    t0 = clock()
    opt.step()
    sync(s.device)
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
    release_memory()
    cuda = s.device.startswith("cuda")
    if cuda:
        need, free = row_memory_estimate(spec, w), cuda_free_bytes()
        if free < need:
            r.status = "skipped"
            r.reason = f"needs ~{need / 2**30:.1f} GiB of device memory, {free / 2**30:.1f} GiB free"
            return r, None
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
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
                sync(s.device)
                r.warmup += 1
                # on CUDA at least 2: Triton compiles on the first step, a second would show a late compile
                if time.perf_counter() - start > s.budget_s and r.warmup >= (2 if cuda else 1):
                    break
        r.peak_rss_delta_mib = (peak.peak - base) / 2**20
        r.rss_delta_mib = (rss_bytes() - base) / 2**20
        r.state_bytes = optimizer_state_bytes(opt)
        r.state_bytes_per_param = r.state_bytes / w.n_params
        r.step_bytes = measured_step_bytes(opt, spec.family, spec.provider)
        r.step_bytes_per_param = r.step_bytes / w.n_params
        r.step_bytes_table = table_step_bytes(spec.family, spec.provider, spec.bits, w.shapes, params[0].element_size())
        for attempt in range(1 + s.retries):
            t, b, wait = _timed_steps(opt, baseline, s)
            if attempt == 0 or (wait or 0.0) < (r.cpu_wait or 0.0):
                times, paired, r.cpu_wait = t, b, wait
            # A shared machine stretches OpenMP steps unevenly: re-time cheap cells once the CPUs are free.
            if r.cpu_wait is None or r.cpu_wait < 0.1 or statistics.median(times) > s.budget_s / 4:
                break
            wait_until_quiet(max(s.wait_quiet_s, 5.0))
        if cuda:
            r.cuda_delta_mib = (torch.cuda.memory_allocated() - cuda_base) / 2**20
            r.peak_cuda_delta_mib = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    except Exception as exc:  # one broken optimizer must not end the run
        r.status, r.reason = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        opt = None
        return r, None
    finally:
        release_memory()
    r.repeats = len(times)
    stat = min if s.stat == "min" else statistics.median
    r.ms_median = statistics.median(times) * 1e3
    r.ms_min, r.ms_max = min(times) * 1e3, max(times) * 1e3
    r.ms = stat(times) * 1e3
    r.mparam_s = w.n_params / (r.ms * 1e-3) / 1e6
    r.gbps = r.step_bytes / (r.ms * 1e-3) / 1e9
    if s.peak_gbps:
        r.pct_peak = 100 * r.gbps / s.peak_gbps
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
