"""Optimizer step throughput: qop (8/32-bit) beside torch.optim, bitsandbytes and torchao, in one process.

Every optimizer runs on the same parameters with the same fixed, pre-allocated gradients.  A cell (one
optimizer on one workload) builds the optimizer, runs warm-up steps (state creation, compilation), then
times single steps and reports their median; repeats stop early once a cell has used its time budget,
so slow baselines (bitsandbytes' CPU path) cannot stretch a run.  Speed is reported in Mparam/s and as a
ratio to ``torch.optim.AdamW(fused=True)`` in float32 on the same workload; memory as optimizer-state
bytes per parameter (from the state tensors) and the peak RSS growth while the state is built and used
(on CUDA: the peak growth of ``torch.cuda.max_memory_allocated``).

Workload sets (``--workload-set``, by default ``gpu`` with ``--device cuda`` and ``cpu`` otherwise; ``--scale``
shrinks either): **cpu**: one 16M-element tensor, a 19M-parameter GPT-like model, 2,000 tensors of 1K-16K
elements.  **gpu**: one 2^28-element tensor, a 1.01e9-parameter GPT-like model (d=2048, 18 layers, vocab
50304), 1,000 tensors of 4K-64K elements.  On CUDA a step is timed by the wall clock between a synchronize
before it and one after it, so host-side launch overhead counts, as it does in training.

Bandwidth.  Each row also reports GB/s = bytes one step moves / step time, and that as a share of the
device's peak.  The bytes come from the optimizer's live tensors: every parameter read and written, its
gradient read, every distinct state storage (moments, 8-bit codes, absmax scales, step counters, code
books) read and written once; for the qop and bitsandbytes LAMB/LARS rows, whose step takes a first pass for
the trust-ratio norms, the parameters, gradients and states read once more.  For fp32 params that is the
family table (``table_step_bytes``, recorded beside it in the JSON): 12 B/param for param r+w and grad read,
plus per state 8 B (32-bit) or 2 B + 8 B per 256-element absmax block (8-bit; tensors under
``min_8bit_size`` = 4096 keep 32-bit states), with adam 2 states, ademamix 3, lamb 2, sgd/lars (momentum)
1, lion 1, rmsprop 1, adagrad 1: AdamW fp32 28 B/param, Adam8bit 16.06.  This is the minimum traffic of
the algorithm; temporaries an implementation adds (foreach) are not counted, so they show as lower GB/s.
The peak is the nominal bandwidth of known GPUs (``NOMINAL_BW``) and otherwise a ``copy_`` measured at
start (``--peak-mib`` per buffer, read+write bytes, best of several); both are in the metadata.

    python benchmarks/bench_optim.py                      # everything, ~25 min on 2 cores
    python -m qop bench --quick                           # 1/16-size workloads, 2-5 min; filters shorten it
    python -m qop bench --workloads single --families adam --providers torch,qop,bnb --plot
    python benchmarks/bench_optim.py --device cuda --families adam --providers torch,qop,bnb --plot
    python benchmarks/bench_optim.py --workload-set gpu --scale 1e-3 --quick   # the GPU shapes, small, on CPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import inspect
import json
import math
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
#: Elements per absmax scale of an 8-bit state (qop's BLOCKSIZE, bitsandbytes' blockwise default).
ABSMAX_BLOCK = 256
#: Tensors below this many elements keep 32-bit states in 8-bit optimizers (qop's and bitsandbytes' default).
MIN_8BIT_SIZE = 4096
#: Per-element optimizer states of each family (SGD and LARS run with momentum).
N_STATES = {"adam": 2, "ademamix": 3, "sgd": 1, "lars": 1, "lion": 1, "rmsprop": 1, "adagrad": 1, "lamb": 2}
#: Families whose qop and bitsandbytes steps read params, grads and states in a first pass (trust-ratio norms).
TWO_PASS = ("lamb", "lars")
#: Nominal memory bandwidth in bytes/s by substrings of ``torch.cuda.get_device_name`` (first match; None:
#: unknown).  Datasheet figures; GH200 comes in several memory configurations, so it is left to the copy test.
NOMINAL_BW: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("GH200",), None),
    (("H200",), 4.8e12),
    (("H100", "NVL"), 3.9e12),
    (("H100", "PCIE"), 2.0e12),
    (("H100", "HBM3"), 3.35e12),
    (("H100", "SXM"), 3.35e12),
    (("A100", "SXM4", "80GB"), 2.039e12),
    (("A100", "80GB", "PCIE"), 1.935e12),
    (("A100", "40GB"), 1.555e12),
)


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


def _gpt_shapes(d: int, vocab: int, ctx: int, layers: int) -> list[tuple[int, ...]]:
    """A GPT-like model's parameters: embeddings, per layer 12 tensors (qkv, out, fc1, fc2 weights and biases,
    2 layer norms), a final layer norm."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [*shapes, (d,), (d,)]


def make_workloads(scale: float = 1.0, seed: int = 0, kind: str = "cpu") -> dict[str, Workload]:
    """The three workloads: one big tensor, a transformer's parameters, many small tensors (scaled).

    ``kind`` picks the set: ``cpu`` (16M elements, 19M params, 2000 x 1K-16K) or ``gpu`` (2^28 elements,
    1.01e9 params, 1000 x 4K-64K); only shapes are made here, nothing is allocated.
    """
    if kind == "gpu":
        return _gpu_workloads(scale, seed)
    single = (max(256, int(16 * 2**20 * scale)),)
    # GPT-like: 5 layers x 12 tensors (qkv, out, fc1, fc2 weights and biases, 2 layer norms) + 4 others.
    r = scale**0.5
    d, vocab, ctx, layers = _round8(512 * r), _round8(6144 * r), _round8(1024 * r), 5
    tshapes = _gpt_shapes(d, vocab, ctx, layers)
    g = torch.Generator().manual_seed(seed)
    count = max(1, round(2000 * scale))
    many = tuple((int(n),) for n in torch.randint(1024, 16 * 1024 + 1, (count,), generator=g))
    out = [
        Workload("single", "one fp32 tensor", (single,)),
        Workload("transformer", f"GPT-like, d={d}, {layers} layers, vocab {vocab}", tuple(tshapes)),
        Workload("many", "tensors of 1K-16K elements", many),
    ]
    return {w.name: w for w in out}


def _gpu_workloads(scale: float, seed: int) -> dict[str, Workload]:
    """Issue 7's shapes: one 2^28-element tensor, a ~1B-parameter GPT, 1000 tensors of 4K-64K elements."""
    single = (max(256, int(2**28 * scale)),)
    r = scale**0.5
    d, vocab, ctx, layers = _round8(2048 * r), _round8(50304 * r), _round8(2048 * r), 18
    g = torch.Generator().manual_seed(seed)
    count = max(1, round(1000 * scale))
    many = tuple((int(n),) for n in torch.randint(4096, 64 * 1024 + 1, (count,), generator=g))
    out = [
        Workload("single", "one fp32 tensor", (single,)),
        Workload("transformer", f"GPT-like, d={d}, {layers} layers, vocab {vocab}, ctx {ctx}",
                 tuple(_gpt_shapes(d, vocab, ctx, layers))),
        Workload("many", "tensors of 4K-64K elements", many),
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


def discover(families: Sequence[str], providers: Sequence[str], device: str,
             percentile_clipping: int = 100) -> list[OptSpec]:
    """Every optimizer of the chosen families and providers that exists in this environment.

    ``percentile_clipping`` < 100 is passed to the qop and bitsandbytes classes; a class that does not take
    it (recent bitsandbytes releases, 0.50 among them) runs without, and its label says so."""
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
                    label = f"{provider} {stem}{bits}bit"
                    if percentile_clipping < 100:
                        kw["percentile_clipping"] = percentile_clipping
                        label += "" if "percentile_clipping" in _accepted(cls, kw) else " (no pct clip)"
                    specs.append(OptSpec(label, provider, family, bits, _builder(cls, kw)))
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
    """Collect garbage and hand freed heap pages (and CUDA cached blocks) back so memory deltas start clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


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


# ------------------------------------------------------------------------------------------ bandwidth
def _state_bytes_table(family: str, bits: int, numel: int, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of a tensor's optimizer states by the family table: 4 B/element per state, or 1 B plus absmax."""
    if bits == 8 and numel >= min_8bit_size:
        return N_STATES[family] * (numel + 4 * -(-numel // ABSMAX_BLOCK))
    return N_STATES[family] * 4 * numel


def table_step_bytes(family: str, provider: str, bits: int, shapes: Sequence[Sequence[int]], param_size: int = 4,
                     min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes one step moves by the family table (module docstring): params r+w, grads r, states r+w, and
    for qop's and bitsandbytes' LAMB/LARS a first pass reading params, grads and states."""
    total = 0
    for shape in shapes:
        n = _numel(shape)
        state = _state_bytes_table(family, bits, n, min_8bit_size)
        total += 3 * param_size * n + 2 * state
        if family in TWO_PASS and provider in ("qop", "bnb"):
            total += 2 * param_size * n + state
    return total


def measured_step_bytes(opt: torch.optim.Optimizer, family: str, provider: str) -> int:
    """Bytes one step of ``opt`` moves, from its live tensors: params r+w and grads r, every distinct state
    storage r+w (``optimizer_state_bytes``), and the LAMB/LARS first pass of qop and bitsandbytes."""
    params_grads = first_pass = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            pb, gb = p.numel() * p.element_size(), p.grad.numel() * p.grad.element_size()
            params_grads += 2 * pb + gb
            first_pass += pb + gb
    state = optimizer_state_bytes(opt)
    total = params_grads + 2 * state
    if family in TWO_PASS and provider in ("qop", "bnb"):
        total += first_pass + state
    return total


def nominal_bandwidth(device_name: str) -> float | None:
    """The datasheet memory bandwidth (bytes/s) of a GPU named like ``torch.cuda.get_device_name``; None if unknown."""
    name = device_name.upper()
    for keys, bw in NOMINAL_BW:
        if all(k in name for k in keys):
            return bw
    return None


def copy_bandwidth(device: str, mib: int, repeats: int = 10) -> float:
    """Bytes/s of the best of ``repeats`` ``dst.copy_(src)`` of ``mib`` MiB on ``device``, read+write counted."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch, allocator and kernel warm-up
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    del src, dst
    _release_memory()
    return 2 * mib * 2**20 / best


def bandwidth_info(device: str, mib: int) -> dict[str, Any]:
    """The device's name, its nominal and measured (copy) bandwidth, and the peak that "% peak" divides by."""
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(torch.device(device)) if cuda else cpu_model()
    nominal = nominal_bandwidth(name) if cuda else None
    copy = copy_bandwidth(device, mib, 10 if cuda else 5) if mib > 0 else None
    peak = nominal or copy
    return {
        "device_name": name,
        "nominal_gbps": None if nominal is None else nominal / 1e9,
        "copy_gbps": None if copy is None else round(copy / 1e9, 1),
        "copy_mib": mib,
        "peak_gbps": None if peak is None else round(peak / 1e9, 1),
        "peak_source": "nominal (datasheet)" if nominal else ("measured copy_" if copy else "none"),
    }


def cuda_free_bytes() -> int:
    """Device memory a new allocation can get: free memory plus what the caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def row_memory_estimate(spec: OptSpec, w: Workload) -> int:
    """A conservative guess of the device memory a row adds: its states by the family table, temporaries of
    foreach steps (two state-sized lists) and of per-tensor norms or casts (two of the largest tensor)."""
    states = sum(_state_bytes_table(spec.family, spec.bits, _numel(s)) for s in w.shapes)
    temps = 8 * w.n_params if "foreach" in spec.label else 0
    largest = max(_numel(s) for s in w.shapes)
    return int(1.2 * (states + temps + 8 * largest)) + 256 * 2**20


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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
    _sync(s.device)  # the device is idle when the clock starts
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
                _sync(s.device)
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
        r.step_bytes_table = table_step_bytes(spec.family, spec.provider, spec.bits, w.shapes,
                                              params[0].element_size())
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
        _release_memory()
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
        dump = torch._C._dispatch_dump("qop::step")
    except RuntimeError:
        return "unknown"
    for line in dump.splitlines():
        if line.startswith("CPU:"):
            return "reference (python)" if ".py:" in line else "native (C++)"
    return "none"


def _gpu_info(device: str) -> dict[str, Any]:
    """The CUDA device's name, memory and toolkit, and Triton's version (empty off CUDA)."""
    if not device.startswith("cuda"):
        return {}
    props = torch.cuda.get_device_properties(torch.device(device))
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sms": props.multi_processor_count, "cuda": torch.version.cuda, "triton": _library_version("triton")}


def _bnb_version() -> str | None:
    """bitsandbytes' version: from its metadata, else from the module (a copy on PYTHONPATH may have none)."""
    module = sys.modules.get("bitsandbytes")
    return _library_version("bitsandbytes") or (getattr(module, "__version__", None) if module else None)


def metadata(args: argparse.Namespace, workloads: dict[str, Workload],
             bandwidth: dict[str, Any] | None = None) -> dict[str, Any]:
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
        **_gpu_info(args.device),
        "bandwidth": bandwidth or {},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": _bnb_version(),
        "torchao": _library_version("torchao"),
        "qop": qop.__version__,
        # a copy of the tree without .git (a GPU machine) can name its commit in QOP_COMMIT
        "qop_commit": _git("rev-parse", "--short", "HEAD") or os.environ.get("QOP_COMMIT"),
        "qop_tree_dirty": bool(dirty),
        "qop_cpu_kernels": bool(qop.HAS_CPU_KERNELS),
        "qop_cpu_step_kernel": _cpu_kernel_source(),
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "budget_s": args.budget, "scale": args.scale,
                     "paired": args.paired, "stat": args.stat, "wait_quiet_s": args.wait_quiet,
                     "retries": args.retries, "clock": args.clock, "workload_set": args.workload_set,
                     "peak_mib": args.peak_mib},
        "workloads": {n: {"description": w.description, "tensors": len(w.shapes), "params": w.n_params}
                      for n, w in workloads.items()},
    }


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _ms(x: float | None) -> str:
    """Milliseconds with 3 significant decimals below 1 ms (GPU steps of small workloads), else 2."""
    return "" if x is None else format(x, ".3f" if x < 1 else ".2f")


def _bandwidth_line(meta: dict[str, Any]) -> str:
    """The header's sentence on GB/s and what "% peak" divides by."""
    bw = meta.get("bandwidth") or {}
    copy = (f"a {bw['copy_mib']} MiB `copy_` measured {bw['copy_gbps']:.0f} GB/s (read+write, best of several)"
            if bw.get("copy_gbps") else "no copy measured")
    nominal = f"nominal {bw['nominal_gbps']:.0f} GB/s" if bw.get("nominal_gbps") else "nominal peak unknown"
    peak = f"{bw['peak_gbps']:.0f} GB/s ({bw['peak_source']})" if bw.get("peak_gbps") else "unknown"
    return (f"Bandwidth: {bw.get('device_name', meta['device'])}: {nominal}; {copy}. GB/s: bytes a step moves "
            "(moved B/param: params r+w, grads r, states r+w, LAMB/LARS first pass; see bench_optim.py) over the "
            f"step time; % peak: of {peak}.")


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    """One table per workload, plus a header naming the machine, the device and its bandwidth, and kernel state."""
    cuda = "gpu" in meta
    host = (f"{meta['cpu']}, {meta['logical_cpus']} logical CPUs, {meta['memory_gib']} GiB, "
            f"torch threads {meta['torch_threads']}, device {meta['device']}")
    if cuda:
        host = (f"{meta['gpu']} ({meta['gpu_memory_gib']} GiB, {meta['gpu_sms']} SMs), CUDA {meta['cuda']}, "
                f"triton {meta['triton']}; host: {host}")
    lines = [
        f"qop {meta['qop']} @ {meta['qop_commit']}{' (dirty tree)' if meta['qop_tree_dirty'] else ''}, "
        f"CPU step kernel: {meta['qop_cpu_step_kernel']}; torch {meta['torch']}, "
        f"bitsandbytes {meta['bitsandbytes']}, torchao {meta['torchao']}",
        host,
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
        _bandwidth_line(meta),
        "",
    ]
    if meta.get("interrupted"):
        lines += ["**Interrupted** (SIGINT/timeout): the rows after the last one below were not run.", ""]
    mem = "peak GPU +MiB" if cuda else "peak RSS +MiB"
    head = ("| optimizer | median ms | min ms | Mparam/s | x AdamW(fused) | x bnb | state B/param | moved B/param "
            f"| GB/s | % peak | {mem} | reps | CPU wait |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, w in meta["workloads"].items():
        rows = [r for r in results if r.workload == name]
        if not rows:
            continue
        lines += [f"### {name}: {w['description']} ({w['tensors']} tensors, {w['params'] / 1e6:.2f}M params)", "",
                  head]
        for r in rows:
            if r.status != "ok":
                lines.append(f"| {r.label} | {r.status}: {r.reason.replace('|', '/')} |" + "  |" * 11)
                continue
            wait = "" if r.cpu_wait is None else f"{100 * r.cpu_wait:.0f}%"
            peak_mem = r.peak_cuda_delta_mib if cuda else r.peak_rss_delta_mib
            lines.append(
                f"| {r.label} | {_ms(r.ms_median)} | {_ms(r.ms_min)} | {_fmt(r.mparam_s, '.0f')} | "
                f"{_fmt(r.x_fused, '.2f')} | {_fmt(r.x_bnb, '.1f')} | {_fmt(r.state_bytes_per_param, '.2f')} | "
                f"{_fmt(r.step_bytes_per_param, '.2f')} | {_fmt(r.gbps, '.1f')} | {_fmt(r.pct_peak, '.0f')} | "
                f"{_fmt(peak_mem, '.0f')} | {r.repeats} | {wait} |")
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
    where = meta.get("gpu") or f"{meta['cpu']}, {meta['torch_threads']} threads"
    fig.suptitle(f"{where}; qop CPU kernel: {meta['qop_cpu_step_kernel']}")
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
    p.add_argument("--percentile-clipping", type=int, default=100, metavar="K",
                   help="qop/bitsandbytes percentile_clipping (default 100: off); the baseline never clips")
    p.add_argument("--quick", action="store_true", help="small workloads and a short budget: a smoke run")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--workload-set", choices=("cpu", "gpu"), default=None,
                   help="workload shapes: gpu (2^28 elements, 1.01e9-param GPT, 1000 x 4K-64K) or cpu (16M, 19M, "
                        "2000 x 1K-16K); default by --device; --scale shrinks either")
    p.add_argument("--peak-mib", type=int, default=None, metavar="MIB",
                   help="MiB per buffer of the copy_ that measures the device's bandwidth (default 1024 on CUDA, "
                        "256 on CPU; 0: do not measure)")
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
    cuda = args.device.startswith("cuda")
    args.workload_set = args.workload_set or ("gpu" if cuda else "cpu")
    args.peak_mib = args.peak_mib if args.peak_mib is not None else (1024 if cuda else 256)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times host CPU work only; use the wall clock on a GPU")
    if not 1 <= args.percentile_clipping <= 100:
        p.error(f"--percentile-clipping must be in 1..100, got {args.percentile_clipping}")
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
    all_workloads = make_workloads(args.scale, kind=args.workload_set)
    workloads = {n: all_workloads[n] for n in args.workloads}
    families = list(dict.fromkeys(["adam", *args.families]))
    providers = list(dict.fromkeys(["torch", *args.providers]))
    specs = discover(families, providers, args.device, args.percentile_clipping)
    baseline = [s for s in specs if s.label == BASELINE]
    wanted = [s for s in specs if s.label != BASELINE and s.family in args.families and s.provider in args.providers
              and args.filter in s.label]
    bandwidth = bandwidth_info(args.device, args.peak_mib)
    print(f"[bench] bandwidth: {bandwidth}", file=sys.stderr)
    settings = Settings(args.warmup, args.repeats, min(3, args.repeats), args.budget, args.device, args.paired,
                        args.stat, args.wait_quiet, args.retries, args.clock, bandwidth["peak_gbps"])
    meta = metadata(args, workloads, bandwidth)
    results: list[Result] = []
    try:
        for w in workloads.values():
            _run_workload(w, baseline + wanted, settings, results)
    except KeyboardInterrupt:  # a stage timeout (SIGINT): keep and write the rows timed so far
        meta["interrupted"] = True
        print("[bench] interrupted: writing the rows timed so far", file=sys.stderr)
        _release_memory()
    add_ratios(results)
    return results, meta


def _run_workload(w: Workload, specs: list[OptSpec], settings: Settings, results: list[Result]) -> None:
    """Time ``specs`` (the baseline first) on one workload's parameters, allocated once and freed at the end."""
    params, init = make_params(w, settings.device)
    print(f"[bench] {w.name}: {w.description}, {len(w.shapes)} tensors, {w.n_params / 1e6:.2f}M params",
          file=sys.stderr)
    reference: torch.optim.Optimizer | None = None  # the warmed-up baseline, stepped between timed steps
    try:
        for spec in specs:
            t0 = time.perf_counter()
            r, opt = time_cell(spec, w, params, init, settings, reference)
            r.cell_s = time.perf_counter() - t0
            if spec.label == BASELINE and settings.paired:
                reference = opt
            del opt
            results.append(r)
            msg = (f"{r.ms:9.3f} ms  {r.mparam_s:8.1f} Mparam/s  {r.gbps:7.1f} GB/s  x{r.x_fused or 1:.2f} fused  "
                   f"cpu-wait {100 * (r.cpu_wait or 0):3.0f}%" if r.status == "ok" else f"{r.status}: {r.reason}")
            print(f"[bench]   {spec.label:<24} {msg}", file=sys.stderr)
    finally:
        del params, init, reference
        _release_memory()


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
