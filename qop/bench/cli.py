"""``python -m qop bench``: options, the run over workloads and optimizers, and the files it writes."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .harness import Result, Settings, add_ratios, make_params, time_cell
from .measure import bandwidth_info, release_memory
from .providers import BASELINE, FAMILIES, PROVIDERS, OptSpec, discover, missing_providers
from .report import markdown, metadata, plot
from .workloads import WORKLOAD_NAMES, Workload, make_workloads


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


#: Where results go by default: ``benchmarks/out`` when run from a source checkout's root, else this folder.
DEFAULT_OUT_IN_TREE = Path("benchmarks") / "out"
DEFAULT_OUT = Path("qop-bench-out")


def default_out() -> Path:
    """``benchmarks/out`` in a source checkout's root (where its docs expect results), else ``qop-bench-out``."""
    return DEFAULT_OUT_IN_TREE if DEFAULT_OUT_IN_TREE.parent.is_dir() else DEFAULT_OUT


def parse_args(argv: Sequence[str] | None, prog: str = "python -m qop bench") -> argparse.Namespace:
    """Command-line options (``--quick`` shrinks workloads, repeats and the time budget)."""
    p = argparse.ArgumentParser(prog=prog, description="qop optimizer step benchmark (CPU or CUDA).")
    p.add_argument(
        "--workloads",
        type=_csv,
        default=list(WORKLOAD_NAMES),
        help="comma list of single,transformer,many (default all)",
    )
    p.add_argument("--families", type=_csv, default=list(FAMILIES), help=f"comma list of {','.join(FAMILIES)}")
    p.add_argument("--providers", type=_csv, default=list(PROVIDERS), help="comma list of torch,qop,bnb,torchao")
    p.add_argument("--filter", default="", help="only optimizers whose label contains this (baseline always kept)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per cell (default 3, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="max timed steps per cell (default 20, quick 5)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed steps per cell (default 2, quick 0.3)")
    p.add_argument("--scale", type=float, default=None, help="workload size factor (default 1, quick 1/16)")
    p.add_argument(
        "--percentile-clipping",
        type=int,
        default=100,
        metavar="K",
        help="qop/bitsandbytes percentile_clipping (default 100: off); the baseline never clips",
    )
    p.add_argument("--quick", action="store_true", help="small workloads and a short budget: a smoke run")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--workload-set",
        choices=("cpu", "gpu"),
        default=None,
        help="workload shapes: gpu (2^28 elements, 1.01e9-param GPT, 1000 x 4K-64K) or cpu (16M, 19M, "
        "2000 x 1K-16K); default by --device; --scale shrinks either",
    )
    p.add_argument(
        "--peak-mib",
        type=int,
        default=None,
        metavar="MIB",
        help="MiB per buffer of the copy_ that measures the device's bandwidth (default 1024 on CUDA, "
        "256 on CPU; 0: do not measure)",
    )
    p.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="statistic of the timed steps behind Mparam/s and the ratios (min resists a shared machine)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each cell wait up to SECONDS for the CPUs to be idle (PSI CPU wait < 5%%)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time steps by wall clock (default) or by this process's CPU time: with --threads 1 the "
        "latter is robust to other work sharing the CPUs",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=None,
        help="re-time a cheap cell up to N times while other work shares the CPUs (default 2, quick 0)",
    )
    p.add_argument(
        "--no-paired",
        dest="paired",
        action="store_false",
        help="do not interleave a baseline AdamW(fused) step after each timed step (ratios then compare "
        "rows timed at different moments)",
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"directory for the .md/.json/.png (default {DEFAULT_OUT_IN_TREE} when the current "
        f"directory has benchmarks/, else {DEFAULT_OUT})",
    )
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
    args.out = args.out or str(default_out())
    for name, allowed in (("workloads", WORKLOAD_NAMES), ("families", tuple(FAMILIES)), ("providers", PROVIDERS)):
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
    wanted = [
        s
        for s in specs
        if s.label != BASELINE and s.family in args.families and s.provider in args.providers and args.filter in s.label
    ]
    missing = missing_providers([p for p in args.providers if p in ("bnb", "torchao")])
    for name, how in missing.items():
        print(f"[bench] {name}: not installed, not timed ({how})", file=sys.stderr)
    bandwidth = bandwidth_info(args.device, args.peak_mib)
    print(f"[bench] bandwidth: {bandwidth}", file=sys.stderr)
    settings = Settings(
        args.warmup,
        args.repeats,
        min(3, args.repeats),
        args.budget,
        args.device,
        args.paired,
        args.stat,
        args.wait_quiet,
        args.retries,
        args.clock,
        bandwidth["peak_gbps"],
    )
    meta = metadata(args, workloads, bandwidth)
    meta["missing_providers"] = missing
    results: list[Result] = []
    try:
        for w in workloads.values():
            _run_workload(w, baseline + wanted, settings, results)
    except KeyboardInterrupt:  # a stage timeout (SIGINT): keep and write the rows timed so far
        meta["interrupted"] = True
        print("[bench] interrupted: writing the rows timed so far", file=sys.stderr)
        release_memory()
    add_ratios(results)
    return results, meta


def _run_workload(w: Workload, specs: list[OptSpec], settings: Settings, results: list[Result]) -> None:
    """Time ``specs`` (the baseline first) on one workload's parameters, allocated once and freed at the end."""
    params, init = make_params(w, settings.device)
    print(
        f"[bench] {w.name}: {w.description}, {len(w.shapes)} tensors, {w.n_params / 1e6:.2f}M params", file=sys.stderr
    )
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
            msg = (
                f"{r.ms:9.3f} ms  {r.mparam_s:8.1f} Mparam/s  {r.gbps:7.1f} GB/s  x{r.x_fused or 1:.2f} fused  "
                f"cpu-wait {100 * (r.cpu_wait or 0):3.0f}%"
                if r.status == "ok"
                else f"{r.status}: {r.reason}"
            )
            print(f"[bench]   {spec.label:<24} {msg}", file=sys.stderr)
    finally:
        del params, init, reference
        release_memory()


def main(argv: Sequence[str] | None = None, prog: str = "python -m qop bench") -> int:
    """Run the benchmark, print the markdown table and write it with the JSON (and PNG) under ``--out``."""
    args = parse_args(argv, prog)
    # Compile torchao's step in this process: inductor's pool of compile workers would otherwise keep warming
    # up in the background and slow the cells timed after it.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    results, meta = run(args)
    table = markdown(results, meta)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(table + "\n")
    (out / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1) + "\n"
    )
    written = [out / f"{args.name}.md", out / f"{args.name}.json"]
    if args.plot:
        (out / f"{args.name}.png").unlink(missing_ok=True)
        plot(results, meta, out / f"{args.name}.png")
        if (out / f"{args.name}.png").exists():
            written.append(out / f"{args.name}.png")
    print("[bench] wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
