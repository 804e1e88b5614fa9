"""The training-quality benchmark, run from a source checkout: ``python benchmarks/bench_quality.py [options]``.

The benchmark ships with the package as ``qop.bench.quality``; this entry point imports qop from this tree even
when it is not installed.  The digits task needs scikit-learn (``pip install scikit-learn``; without it the task
is reported absent).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a source tree without installing qop

from qop.bench.quality import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
