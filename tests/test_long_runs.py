"""Long runs: the C++ step kernels and ``qop.reference`` side by side for 10,000 steps do not drift apart.

Both start from the same parameter and zero states and get the same seeded gradient sequence; each keeps
its own trajectory.  Their difference after 10,000 steps must be no larger than after 10 steps, up to
``FACTOR``, in units of the float32 spacing at the tensors' scale (``ulp(max |x|)``, at least one such
unit).  Why this scale and factor: both round every new value to float32 on their own, and they differ
only where a per-tensor scalar rounds differently (the bias corrections' powers), so their difference
is a walk of rounding flips, measured at 1 unit after 10,000 steps for Adam (0 for momentum: identical);
a systematic difference grows with the step count instead, e.g. an update 1e-6 larger relative on every
step (lr * (1 + 1e-6)) puts SGD with momentum 12 units apart after 10,000 steps against 2 after 10.
States are compared the same way (8-bit: codes at most one index apart, no more of them differing than
after 10 steps plus a handful).  One run costs ~1 ms per reference step (8-bit), ~0.25 ms (32-bit).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

import qop
from qop import HP, Rule, reference

pytestmark = [
    pytest.mark.skipif(not qop.HAS_CPU_KERNELS, reason="qop C++ CPU kernels not built"),
    pytest.mark.usefixtures("one_thread"),  # small tensors (tests/conftest.py)
]

STEPS = 10_000
N = 300  # one full 256-block and a partial one
FACTOR = 4.0
CHECKPOINTS = (10, STEPS)


@dataclasses.dataclass
class Run:
    """One trajectory: parameter, states (8-bit: codes and absmax) and step count."""

    params: list[Tensor]
    states: list[list[Tensor]]
    absmax: list[list[Tensor]]
    steps: list[Tensor]


def start(signed: tuple[bool, ...], bits: int) -> Run:
    p = torch.randn(N, generator=torch.Generator().manual_seed(0))
    if bits == 32:
        return Run([p], [[torch.zeros(N)] for _ in signed], [], [torch.zeros(())])
    states = [[torch.zeros(N, dtype=torch.uint8)] for _ in signed]
    return Run([p], states, [[torch.zeros(2)] for _ in signed], [torch.zeros(())])


def scaled_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| in units of the float32 spacing at max(|a|, |b|) (the tensors' scale)."""
    scale = torch.maximum(a.abs().max(), b.abs().max()).float()
    spacing = torch.nextafter(scale, torch.tensor(float("inf"))) - scale
    return float((a.float() - b.float()).abs().max() / spacing)


def differences(ours: Run, ref: Run, bits: int) -> dict[str, float]:
    """The parameter's and each state's difference; 8-bit: also codes apart, their count, absmax."""
    d = {"param": scaled_diff(ours.params[0], ref.params[0])}
    for j, (so, sr) in enumerate(zip(ours.states, ref.states)):
        if bits == 32:
            d[f"state{j + 1}"] = scaled_diff(so[0], sr[0])
        else:
            apart = (so[0].int() - sr[0].int()).abs()
            d[f"state{j + 1} codes apart"] = float(apart.max())
            d[f"state{j + 1} codes differing"] = float((apart > 0).sum())
            d[f"absmax{j + 1}"] = scaled_diff(ours.absmax[j][0], ref.absmax[j][0])
    return d


CASES = [
    # (id, rule, signed map of each state, bits, hyper-parameters)
    ("adam-32", Rule.ADAM, (True, False), 32, dict(LR=1e-3, BETA1=0.9, BETA2=0.999, EPS=1e-8, WEIGHT_DECAY=1e-2)),
    ("adam-8", Rule.ADAM, (True, False), 8, dict(LR=1e-3, BETA1=0.9, BETA2=0.999, EPS=1e-8, WEIGHT_DECAY=1e-2)),
    ("sgd-momentum-32", Rule.MOMENTUM, (True,), 32, dict(LR=1e-2, BETA1=0.9, WEIGHT_DECAY=1e-2)),
]


@pytest.mark.parametrize("name,rule,signed,bits,values", CASES, ids=[c[0] for c in CASES])
def test_no_drift_over_10k_steps(name: str, rule: Rule, signed: tuple[bool, ...], bits: int, values: dict) -> None:
    """C++ and reference after 10,000 steps: no farther apart than after 10 (see the module docstring)."""
    hp = torch.zeros(len(HP))
    for key, value in values.items():
        hp[HP[key]] = value
    codes = [qop.dynamic_map(sg) for sg in signed] if bits == 8 else []
    ours, ref = start(signed, bits), start(signed, bits)
    gen = torch.Generator().manual_seed(1)
    seen: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for t in range(1, STEPS + 1):
            grads = [torch.randn(N, generator=gen)]
            for run, impl in ((ours, torch.ops.qop), (ref, reference)):
                states = [t for s in run.states for t in s]  # state j of tensor i at j * n + i
                absmax = [t for s in run.absmax for t in s] if bits == 8 else []
                impl.step(int(rule), 0, run.params, grads, states, absmax, codes, run.steps, hp, None, None)
            if t in CHECKPOINTS:
                seen[t] = differences(ours, ref, bits)
    assert float(ours.steps[0]) == float(ref.steps[0]) == STEPS
    early, late = seen[CHECKPOINTS[0]], seen[STEPS]
    for key, value in late.items():
        if key.endswith("codes apart"):
            assert value <= 1, f"{name}: {key} {value} after {STEPS} steps"
        elif key.endswith("codes differing"):
            assert value <= early[key] + 8, f"{name}: {key} {value} after {STEPS} steps, {early[key]} after 10"
        else:
            assert value <= FACTOR * max(early[key], 1.0), (
                f"{name}: {key} {value} units apart after {STEPS} steps, {early[key]} after 10"
            )
