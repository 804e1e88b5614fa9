"""What a benchmark row measures besides time: optimizer state bytes, memory (RSS, device memory) and bytes
moved per step.

Bytes moved (GB/s).  From the optimizer's live tensors: every parameter read and written, its gradient read,
every distinct state storage (moments, 8-bit codes, absmax scales, step counters, code books) read and
written once; for the qop and bitsandbytes LAMB/LARS rows, whose step takes a first pass for the
trust-ratio norms, the parameters, gradients and states read once more.  For fp32 params that is the family
table (:func:`table_step_bytes`): 12 B/param for param r+w and grad read, plus per state 8 B (32-bit) or
2 B + 8 B per 256-element absmax block (8-bit; tensors under ``min_8bit_size`` = 4096 keep 32-bit states),
with adam 2 states, ademamix 3, lamb 2, sgd/lars (momentum) 1, lion 1, rmsprop 1, adagrad 1: AdamW fp32
28 B/param, Adam8bit 16.06.  This is the minimum traffic of the algorithm; temporaries an implementation
adds (foreach) are not counted, so they show as lower GB/s.  The peak is the nominal bandwidth of known GPUs
(``NOMINAL_BW``) and otherwise a ``copy_`` measured at start.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .providers import OptSpec
from .workloads import Workload, numel

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


def _inner_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors holding a (possibly subclassed, e.g. torchao's 8-bit state) tensor's data."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (Tensor, nn.Parameter):
        return [t]
    names, _ = flatten()
    out: list[Tensor] = []
    for name in names:
        out.extend(_inner_tensors(getattr(t, name)))
    return out


def _collect(obj: Any, out: list[Tensor]) -> None:
    """Every tensor reachable from ``obj`` through dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        out.extend(_inner_tensors(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, out)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's per-parameter state, each storage counted once (shared code books too)."""
    tensors: list[Tensor] = []
    _collect(list(opt.state.values()), tensors)
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cpu_model() -> str:
    """The CPU's model name (lscpu, then /proc/cpuinfo, then platform)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def release_memory() -> None:
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
    """Bytes of a tensor's optimizer states by the family table: 4 B/element per state; 2 B (bfloat16 states,
    every tensor); or, from ``min_8bit_size`` elements, 1 B plus an absmax per 256 (8-bit, fp8) or half a byte
    plus one per 128 (4-bit)."""
    if bits == 16:
        return N_STATES[family] * 2 * numel
    if bits == 8 and numel >= min_8bit_size:
        return N_STATES[family] * (numel + 4 * -(-numel // ABSMAX_BLOCK))
    if bits == 4 and numel >= min_8bit_size:
        return N_STATES[family] * ((numel + 1) // 2 + 4 * -(-numel // (ABSMAX_BLOCK // 2)))
    return N_STATES[family] * 4 * numel


def table_step_bytes(
    family: str,
    provider: str,
    bits: int,
    shapes: Sequence[Sequence[int]],
    param_size: int = 4,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> int:
    """Bytes one step moves by the family table (module docstring): params r+w, grads r, states r+w, and
    for qop's and bitsandbytes' LAMB/LARS a first pass reading params, grads and states."""
    total = 0
    for shape in shapes:
        n = numel(shape)
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
    sync(device)
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
    release_memory()
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
    states = sum(_state_bytes_table(spec.family, spec.bits, numel(s)) for s in w.shapes)
    temps = 8 * w.n_params if "foreach" in spec.label else 0
    largest = max(numel(s) for s in w.shapes)
    return int(1.2 * (states + temps + 8 * largest)) + 256 * 2**20
