"""Reporting a benchmark run: the metadata that makes a table reproducible, the Markdown tables, the chart."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import qop

from .harness import Result
from .measure import cpu_model
from .providers import library_version
from .workloads import Workload


def _source_tree() -> Path | None:
    """The git checkout qop was imported from (an editable install), or None for an installed wheel."""
    package = Path(qop.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=package, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    top = Path(out.stdout.strip())
    return top if top == package.parent else None  # not a site-packages that happens to sit inside a checkout


def _git(*args: str) -> str | None:
    """Output of a git command run in qop's source tree; None when qop is not imported from one."""
    tree = _source_tree()
    if tree is None:
        return None
    try:
        out = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


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
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_sms": props.multi_processor_count,
        "cuda": torch.version.cuda,
        "triton": library_version("triton"),
    }


def _bnb_version() -> str | None:
    """bitsandbytes' version: from its metadata, else from the module (a copy on PYTHONPATH may have none)."""
    module = sys.modules.get("bitsandbytes")
    return library_version("bitsandbytes") or (getattr(module, "__version__", None) if module else None)


def metadata(
    args: argparse.Namespace, workloads: dict[str, Workload], bandwidth: dict[str, Any] | None = None
) -> dict[str, Any]:
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
        "torchao": library_version("torchao"),
        "qop": qop.__version__,
        # a copy of the tree without .git (a GPU machine) can name its commit in QOP_COMMIT
        "qop_commit": _git("rev-parse", "--short", "HEAD") or os.environ.get("QOP_COMMIT"),
        "qop_tree_dirty": bool(dirty),
        "qop_cpu_kernels": bool(qop.HAS_CPU_KERNELS),
        "qop_cpu_step_kernel": _cpu_kernel_source(),
        "settings": {
            "warmup": args.warmup,
            "repeats": args.repeats,
            "budget_s": args.budget,
            "scale": args.scale,
            "paired": args.paired,
            "stat": args.stat,
            "wait_quiet_s": args.wait_quiet,
            "retries": args.retries,
            "clock": args.clock,
            "workload_set": args.workload_set,
            "peak_mib": args.peak_mib,
        },
        "workloads": {
            n: {"description": w.description, "tensors": len(w.shapes), "params": w.n_params}
            for n, w in workloads.items()
        },
    }


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _ms(x: float | None) -> str:
    """Milliseconds with 3 significant decimals below 1 ms (GPU steps of small workloads), else 2."""
    return "" if x is None else format(x, ".3f" if x < 1 else ".2f")


def _bandwidth_line(meta: dict[str, Any]) -> str:
    """The header's sentence on GB/s and what "% peak" divides by."""
    bw = meta.get("bandwidth") or {}
    copy = (
        f"a {bw['copy_mib']} MiB `copy_` measured {bw['copy_gbps']:.0f} GB/s (read+write, best of several)"
        if bw.get("copy_gbps")
        else "no copy measured"
    )
    nominal = f"nominal {bw['nominal_gbps']:.0f} GB/s" if bw.get("nominal_gbps") else "nominal peak unknown"
    peak = f"{bw['peak_gbps']:.0f} GB/s ({bw['peak_source']})" if bw.get("peak_gbps") else "unknown"
    return (
        f"Bandwidth: {bw.get('device_name', meta['device'])}: {nominal}; {copy}. GB/s: bytes a step moves "
        "(moved B/param: params r+w, grads r, states r+w, LAMB/LARS first pass; see qop/bench/measure.py) over the "
        f"step time; % peak: of {peak}."
    )


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    """One table per workload, plus a header naming the machine, the device and its bandwidth, and kernel state."""
    cuda = "gpu" in meta
    host = (
        f"{meta['cpu']}, {meta['logical_cpus']} logical CPUs, {meta['memory_gib']} GiB, "
        f"torch threads {meta['torch_threads']}, device {meta['device']}"
    )
    if cuda:
        host = (
            f"{meta['gpu']} ({meta['gpu_memory_gib']} GiB, {meta['gpu_sms']} SMs), CUDA {meta['cuda']}, "
            f"triton {meta['triton']}; host: {host}"
        )
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
        + (
            "from baseline steps interleaved with this row's steps"
            if meta["settings"]["paired"]
            else "timed in its own row"
        )
        + "; x bnb: qop's speed relative to bitsandbytes' class of the same name; "
        "CPU wait: share of the timed wall time some task waited for a CPU (PSI), above ~10% the machine was "
        "shared and timings are noisy.",
        "",
        _bandwidth_line(meta),
        "",
    ]
    missing = meta.get("missing_providers") or {}
    if missing:
        lines += ["Not installed, so not timed: " + ", ".join(f"{n} (`{how}`)" for n, how in missing.items()), ""]
    if meta.get("interrupted"):
        lines += ["**Interrupted** (SIGINT/timeout): the rows after the last one below were not run.", ""]
    mem = "peak GPU +MiB" if cuda else "peak RSS +MiB"
    head = (
        "| optimizer | median ms | min ms | Mparam/s | x AdamW(fused) | x bnb | state B/param | moved B/param "
        f"| GB/s | % peak | {mem} | reps | CPU wait |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    for name, w in meta["workloads"].items():
        rows = [r for r in results if r.workload == name]
        if not rows:
            continue
        lines += [f"### {name}: {w['description']} ({w['tensors']} tensors, {w['params'] / 1e6:.2f}M params)", "", head]
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
                f"{_fmt(peak_mem, '.0f')} | {r.repeats} | {wait} |"
            )
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
