"""Nanoseconds per element of one raw qop step op next to torch's fused AdamW kernel.

Calls the op the optimizer would call (captured from one ``opt.step()``), with no Python-side work
around it, so per-element kernel cost can be compared in cache and out of it:

    python benchmarks/step_ns.py --threads 1 --numel 262144      # in cache (L2/L3)
    python benchmarks/step_ns.py --threads 2 --numel 16777216    # the "single" workload
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

import qop  # noqa: F401  (loads the kernels)
from qop import ops
from qop.optim import Adam8bit, Adam32bit, AdamW8bit, Lion8bit, RMSprop8bit, SGD8bit

CLASSES = {c.__name__: c for c in (Adam8bit, Adam32bit, AdamW8bit, SGD8bit, Lion8bit, RMSprop8bit)}


def _capture(cls: type, p: torch.nn.Parameter) -> Callable[[], None]:
    """Run two steps of ``cls`` on ``p`` and return a closure replaying its step op."""
    seen: dict[str, Any] = {}
    original = ops.step

    def spy(*args: Any, **kwargs: Any) -> None:
        seen["call"] = (original, args, kwargs)
        original(*args, **kwargs)

    ops.step = spy
    try:
        kwargs = {"momentum": 0.9} if cls is SGD8bit else {}
        opt = cls([p], lr=1e-3, min_8bit_size=0, **kwargs)
        opt.step()
        opt.step()
    finally:
        ops.step = original
    fn, args, kw = seen["call"]
    return lambda: fn(*args, **kw)


def _median_s(fn: Callable[[], None], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--numel", type=int, default=1 << 18)
    ap.add_argument("--optimizers", default="Adam8bit,Adam32bit", help=f"comma list of {','.join(CLASSES)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.numel
    reps = max(5, int(1e8 // n))
    grad = torch.randn(n) * 0.01

    q = torch.randn(n)
    exp_avg, exp_avg_sq, step = torch.zeros(n), torch.zeros(n), torch.zeros(())

    def fused() -> None:
        torch._fused_adamw_(
            [q],
            [grad],
            [exp_avg],
            [exp_avg_sq],
            [],
            [step],
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.01,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )

    t_fused = _median_s(fused, reps)
    print(f"threads={args.threads} numel={n} median of {reps} steps")
    print(f"  torch AdamW(fused) {t_fused / n * 1e9:7.3f} ns/element")
    for name in args.optimizers.split(","):
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = grad
        t = _median_s(_capture(CLASSES[name], p), reps)
        print(f"  qop {name:<14} {t / n * 1e9:7.3f} ns/element  ({t_fused / t:.2f}x fused)")


if __name__ == "__main__":
    main()
