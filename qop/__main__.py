"""``python -m qop demo | bench | doctor | docs-table``: train a demo model, run the benchmark, check the
installation, print the generated parts of the docs."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: Dispatch keys whose kernels ``doctor`` reports for every qop op.
BACKEND_KEYS = ("CPU", "CUDA", "XPU", "MPS")
DISPATCH_KEYS = (*BACKEND_KEYS, "Meta", "CompositeExplicitAutograd", "CompositeImplicitAutograd")


def _version(distribution: str) -> str:
    """An installed distribution's version, read from its metadata (importing torchao alone takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def kernel_origin(op: str, key: str) -> str:
    """Who registered ``qop::op``'s kernel for ``key``: native C++, Triton, the Python reference, a fake, or none."""
    import torch

    name = f"qop::{op}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
        if key in BACKEND_KEYS and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"):
            return "reference"  # a backend without a kernel of its own runs the composite one
        return "-"
    for line in torch._C._dispatch_dump(name).splitlines():
        if not line.startswith((f"{key}:", f"{key}[alias]:")):
            continue
        where = line.split("registered at", 1)[-1].split("::", 1)[0]
        if ".cpp:" in where or ".cu:" in where:
            return "C++"
        if "triton" in where:
            return "triton"
        if "_register.py" in where:
            return "reference"
        return "fake" if key == "Meta" else "python"
    return "yes"


def kernel_table() -> dict[str, dict[str, str]]:
    """``{op: {dispatch key: origin}}`` for every op of the ``qop`` namespace."""
    from . import _schema

    return {op: {key: kernel_origin(op, key) for key in DISPATCH_KEYS} for op in _schema.SCHEMAS}


def doctor(argv: Sequence[str] | None = None) -> int:
    """Print versions, kernel registrations and threading: what a bug report needs."""
    argparse.ArgumentParser(prog="python -m qop doctor", description="Report qop's installation.").parse_args(argv)
    import platform

    import torch

    import qop

    print(f"qop           {qop.__version__} ({Path(qop.__file__).parent})")
    print(f"python        {platform.python_version()} ({sys.executable})")
    print(f"platform      {platform.platform()}")
    print(f"torch         {torch.__version__} (CUDA build: {torch.version.cuda}, HIP: {torch.version.hip})")
    for module in ("triton", "bitsandbytes", "torchao", "matplotlib"):
        print(f"{module:<13} {_version(module)}")
    print(f"C++ CPU kernels loaded (qop.HAS_CPU_KERNELS): {qop.HAS_CPU_KERNELS}")
    if qop.HAS_CPU_KERNELS:
        forced = os.environ.get("ATEN_CPU_CAPABILITY")
        print(
            f"CPU kernel build (qop.CPU_KERNEL_ISA): {qop.CPU_KERNEL_ISA} (torch CPU capability: "
            f"{torch.backends.cpu.get_cpu_capability()}, ATEN_CPU_CAPABILITY={forced or 'unset'})"
        )
    cuda = torch.cuda.is_available()
    devices = f" ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})" if cuda else ""
    print(f"CUDA available: {cuda}{devices}")
    print(
        f"torch threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, logical CPUs: {os.cpu_count()}"
    )
    backend = [ln.strip() for ln in torch.__config__.parallel_info().splitlines() if "backend" in ln or "OpenMP" in ln]
    print("parallel: " + "; ".join(backend))
    print("\nregistered kernels (C++ | triton | reference | fake | -: none)")
    table = kernel_table()
    width = max(len(op) for op in table)
    print(f"{'op':<{width}}  " + "  ".join(f"{k:<10}" for k in DISPATCH_KEYS))
    for op, row in table.items():
        print(f"{op:<{width}}  " + "  ".join(f"{row[k]:<10}" for k in DISPATCH_KEYS))
    if not qop.HAS_CPU_KERNELS:
        print(
            "\nnote: CPU ops run the pure-PyTorch reference (slow); build the C++ kernels with "
            "`pip install --no-build-isolation -e .` from a source checkout."
        )
    return 0


def bench(argv: Sequence[str]) -> int:
    """Run the optimizer step benchmark (``qop.bench``, shipped with the package)."""
    from .bench import main as bench_main

    return int(bench_main(list(argv), prog="python -m qop bench"))


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``demo``, ``bench``, ``doctor`` and ``docs-table``; each takes its own options (``--help``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "train a small LM with qop Adam8bit beside torch AdamW",
        "bench": "optimizer step benchmark beside torch.optim, bitsandbytes, torchao (--quick: a smoke run)",
        "doctor": "versions, kernels, threads",
        "docs-table": "the generated parts of docs/ (optimizer table, op reference)",
    }
    if not args or args[0] in ("-h", "--help") or args[0] not in commands:
        print("usage: python -m qop {demo,bench,doctor,docs-table} [options]\n")
        for name, text in commands.items():
            print(f"  {name:<10} {text}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from . import _demo

        return _demo.main(rest)
    if command == "bench":
        return bench(rest)
    if command == "docs-table":
        from . import _docs

        return _docs.main(rest)
    return doctor(rest)


if __name__ == "__main__":
    raise SystemExit(main())
