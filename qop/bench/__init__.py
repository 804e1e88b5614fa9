"""Optimizer step throughput: qop (8/32-bit) beside torch.optim, bitsandbytes and torchao, in one process.

``python -m qop bench`` (also ``python benchmarks/bench_optim.py`` in a source checkout).  Every optimizer
runs on the same parameters with the same fixed, pre-allocated gradients; speed is reported in Mparam/s and
as a ratio to ``torch.optim.AdamW(fused=True)`` in float32 on the same workload; memory as optimizer-state
bytes per parameter and the peak RSS (on CUDA: device memory) growth while the state is built and used;
bandwidth as GB/s of the bytes one step must move and its share of the device's peak.  bitsandbytes and
torchao are timed when installed and named as absent otherwise.

    python -m qop bench --quick                           # 1/16-size workloads, a few minutes on 2 cores
    python -m qop bench                                   # everything, ~25 min on 2 cores
    python -m qop bench --workloads single --families adam --providers torch,qop,bnb --plot
    python -m qop bench --device cuda --families adam --providers torch,qop,bnb --plot
    python -m qop bench --workload-set gpu --scale 1e-3 --quick   # the GPU shapes, small, on CPU

Modules: ``workloads`` (shapes), ``providers`` (the optimizers compared), ``measure`` (memory, bytes moved,
bandwidth), ``harness`` (timing one cell), ``report`` (metadata, tables, chart), ``cli`` (options, the run).
"""

from __future__ import annotations

from .cli import main, parse_args, run
from .harness import Result, Settings, add_ratios, time_cell
from .measure import measured_step_bytes, nominal_bandwidth, row_memory_estimate, table_step_bytes
from .providers import BASELINE, FAMILIES, PROVIDERS, OptSpec, discover, import_optional, missing_providers
from .workloads import Workload, make_workloads, numel

__all__ = [
    "BASELINE",
    "FAMILIES",
    "PROVIDERS",
    "OptSpec",
    "Result",
    "Settings",
    "Workload",
    "add_ratios",
    "discover",
    "import_optional",
    "main",
    "make_workloads",
    "measured_step_bytes",
    "missing_providers",
    "nominal_bandwidth",
    "numel",
    "parse_args",
    "row_memory_estimate",
    "run",
    "table_step_bytes",
    "time_cell",
]
