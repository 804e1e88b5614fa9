"""The optimizer step benchmark, run from a source checkout: ``python benchmarks/bench_optim.py [options]``.

The benchmark itself ships with the package as ``qop.bench`` (``python -m qop bench``, same options); this
entry point keeps the commands of ``RESULTS.md`` and ``gpu_session.sh`` working, imports qop from this tree
even when it is not installed, and writes to ``benchmarks/out`` by default.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a source tree without installing qop

from qop.bench import main  # noqa: E402


def run(argv: list[str]) -> int:
    """``qop.bench.main`` with this script's name and ``--out benchmarks/out`` unless given."""
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv = [*argv, "--out", str(ROOT / "benchmarks" / "out")]
    return main(argv, prog="python benchmarks/bench_optim.py")


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
