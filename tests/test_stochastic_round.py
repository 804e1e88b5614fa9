"""Stochastic rounding of bfloat16 parameters (``Flag.STOCHASTIC_ROUND``) at the op level.

* the reference against the contract written out on Python integers (``qop._schema``): the hash, the random bits
  of each element, the rounded value for a table of values (zeros, subnormals, the largest finite, inf, NaN);
* the C++ kernel bit for bit against the reference where the float32 update is exact in both, and to one bfloat16
  ulp (nearly always bit for bit) in every rule;
* statistics: the rounded value is x on average where nearest rounding is biased (a small update that nearest
  rounding loses entirely), and over many steps;
* a step is a function of (seed, step, element index): repeatable, different for another seed or step.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
from cases import CASES, SR_CASES, StepCase
from test_ops import assert_params_close, make_grads, make_inputs, needs_kernels

import qop
from qop import HP, Flag, Rule, reference
from qop._schema import MIX32_MULTIPLIERS

M32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------ the contract, on ints
def mix32_spec(x: int) -> int:
    a, b = MIX32_MULTIPLIERS
    x ^= x >> 16
    x = (x * a) & M32
    x ^= x >> 15
    x = (x * b) & M32
    return x ^ (x >> 16)


def sr_spec(x: float, seed: int, t: int, e: int) -> int:
    """The bfloat16 encoding that stochastic rounding gives float32 ``x``, element ``e``, step ``t``."""
    if math.isnan(x):
        return 0x7FC0
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    r = mix32_spec((e & M32) ^ mix32_spec(seed ^ mix32_spec(t))) >> 16
    return ((u + r) >> 16) & 0xFFFF


def bits16(x: torch.Tensor) -> list[int]:
    return [v & 0xFFFF for v in x.view(torch.int16).tolist()]


def test_mix32_is_the_spec() -> None:
    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, M32, *torch.randint(0, 2**32, (200,)).tolist()]
    got = reference.mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [mix32_spec(v) for v in values]
    assert mix32_spec(1) == 1753845952  # lowbias32(1), pinned


VALUES = [
    0.0,
    -0.0,
    1.0,
    0.999,
    -0.999,
    1e-3,
    -3.14159,
    65504.0,
    1e-40,  # subnormal
    -1e-40,
    3.3895e38,  # above the largest finite bfloat16: rounds to it or to inf
    float("inf"),
    float("-inf"),
    float("nan"),
]


@pytest.mark.parametrize("seed,t", [(0, 1), (4321, 7), ((1 << 24) - 1, 123456)])
def test_reference_is_the_spec(seed: int, t: int) -> None:
    n = 70
    for v in VALUES:
        x = torch.full((n,), v, dtype=torch.float32)
        got = bits16(reference.stochastic_round_bf16(x, torch.tensor(float(seed)), torch.tensor(float(t))))
        assert got == [sr_spec(v, seed, t, e) for e in range(n)], v


def test_rounds_to_a_neighbour() -> None:
    """Always one of the two bfloat16 values around x; exact where x is a bfloat16 value."""
    x = torch.randn(10000) * torch.logspace(-30, 30, 10000)
    u = x.view(torch.int32).long() & M32
    down, up = u >> 16, (u >> 16) + 1
    r = torch.tensor(bits16(reference.stochastic_round_bf16(x, torch.tensor(5.0), torch.tensor(1.0))))
    assert bool(((r == down) | (r == up)).all())
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(reference.stochastic_round_bf16(exact, torch.tensor(5.0), torch.tensor(1.0)).float(), exact)


# ------------------------------------------------------------------------------------ through the op
def _sgd(n: int, p: float, g: float, lr: float, seed: float = 77.0) -> tuple:
    """Plain SGD (no state, no weight decay): the new value ``p - lr * g`` is computed exactly alike everywhere."""
    hp = torch.zeros(len(HP))
    hp[HP.LR], hp[HP.SR_SEED] = lr, seed
    params = [torch.full((n,), p, dtype=torch.bfloat16)]
    grads = [torch.full((n,), g, dtype=torch.bfloat16)]
    return params, grads, hp


def _call(op, params, grads, hp, steps, flags=Flag.STOCHASTIC_ROUND) -> None:
    op(int(Rule.MOMENTUM), int(flags), params, grads, [], [], [], steps, hp, None, None, None)


def _ops() -> list:
    ops = [pytest.param(reference.step, id="reference")]
    ops.append(pytest.param(torch.ops.qop.step.default, id="op", marks=needs_kernels))
    return ops


@pytest.mark.parametrize("op", _ops())
def test_unbiased_where_nearest_rounding_is_not(op) -> None:
    """1 - 1e-3 lies within half a bfloat16 spacing (2^-8 below 1) of 1: nearest rounding keeps every parameter at
    1, stochastic rounding moves them to 0.999 on average."""
    n, x = 1 << 16, float(torch.tensor(1.0) - torch.tensor(1e-3) * torch.tensor(1.0))
    bound = 5 * 2.0**-8 / (2 * math.sqrt(n))  # five standard deviations of the mean of n roundings
    params, grads, hp = _sgd(n, 1.0, 1.0, 1e-3)
    _call(op, params, grads, hp, [torch.zeros(())])
    assert abs(params[0].double().mean().item() - x) < bound
    nearest, grads, hp = _sgd(n, 1.0, 1.0, 1e-3)
    _call(op, nearest, grads, hp, [torch.zeros(())], flags=0)
    assert bool((nearest[0] == 1).all())  # the update is lost


@pytest.mark.parametrize("op", _ops())
def test_many_small_steps_follow_the_float32_trajectory(op) -> None:
    """100 steps of -1e-4 from 1: float32 reaches ~0.99, nearest rounding stays at 1, stochastic rounding's mean
    follows float32 (its errors are independent across steps: the variance grows like the step count)."""
    n, steps = 1 << 14, 100
    params, grads, hp = _sgd(n, 1.0, 1.0, 1e-4)
    nearest = [params[0].clone()]
    step, step_n = [torch.zeros(())], [torch.zeros(())]
    exact = torch.ones((), dtype=torch.float32)
    for _ in range(steps):
        _call(op, params, grads, hp, step)
        _call(op, nearest, grads, hp, step_n, flags=0)
        exact = exact - torch.tensor(1e-4) * 1.0
    bound = 5 * math.sqrt(steps) * 2.0**-8 / (2 * math.sqrt(n))
    assert abs(params[0].double().mean().item() - exact.item()) < bound
    assert bool((nearest[0] == 1).all())


@pytest.mark.parametrize("op", _ops())
def test_a_step_is_a_function_of_seed_step_and_index(op) -> None:
    n = 5000

    def run(seed: float, step: float) -> torch.Tensor:
        params, grads, hp = _sgd(n, 1.0, 1.0, 1e-3, seed)
        _call(op, params, grads, hp, [torch.tensor(step)])
        return params[0]

    a = run(9.0, 3.0)
    assert torch.equal(a, run(9.0, 3.0))
    for other in (run(10.0, 3.0), run(9.0, 4.0)):
        assert 0.3 < (a != other).float().mean().item() < 0.7  # independent draws: about half differ


@needs_kernels
def test_kernel_is_the_reference_bit_for_bit() -> None:
    """Where the float32 value is computed alike (plain SGD, no decay), every build writes the reference's bits:
    sizes cover 16- and 8-lane steps, scalar tails and the threaded path; values span magnitudes and signs."""
    sizes = [1, 7, 8, 15, 16, 17, 255, 1000, 70001]
    gen = torch.Generator().manual_seed(3)
    for steps in (0.0, 41.0):
        params = [(torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 6, (n,), generator=gen)) for n in sizes]
        params = [p.to(torch.bfloat16) for p in params]
        params[-1][:3] = torch.tensor([float("inf"), float("nan"), -0.0])
        grads = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in sizes]
        hp = torch.zeros(len(HP))
        hp[HP.LR], hp[HP.SR_SEED] = 3e-3, 4242.0
        ours, ref = [p.clone() for p in params], [p.clone() for p in params]
        step_o = [torch.tensor(steps) for _ in sizes]
        step_r = [torch.tensor(steps) for _ in sizes]
        _call(torch.ops.qop.step.default, ours, grads, hp, step_o)
        _call(reference.step, ref, grads, hp, step_r)
        for a, b in zip(ours, ref):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@needs_kernels
@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("case", SR_CASES, ids=str)
def test_every_rule_matches_the_reference(case: StepCase, bits: int) -> None:
    """Every rule with stochastic rounding: the float32 value may differ in its last bit from the reference's
    (e.g. pow), which moves the rounding by one bfloat16 ulp at most, and rarely."""
    base = make_inputs(case, torch.bfloat16, bits, shapes=[(1,), (257,), (4097,), (33, 65)], gscale=True)
    ours, ref = base.clone(), base.clone()
    same = total = 0
    for step in range(3):
        grads = make_grads(base.params, step)
        torch.ops.qop.step.default(*ours.args(grads))
        reference.step(*ref.args(grads))
        for po, pr in zip(ours.params, ref.params):
            assert_params_close(po, pr, loose=bits == 8)
            same += int((po.view(torch.int16) == pr.view(torch.int16)).sum())
            total += po.numel()
        ours, ref = ours, ours.clone()  # each step from the same tensors
    assert same >= 0.995 * total


@pytest.mark.parametrize("op", _ops())
def test_refused_for_other_param_dtypes(op) -> None:
    if op is reference.step:  # with the shared checks, as registered for devices without a native kernel
        from qop._register import _checked_reference

        op = _checked_reference()["step"]
    hp = torch.zeros(len(HP))
    for dtype in (torch.float32, torch.float16):
        p = [torch.ones(4, dtype=dtype)]
        before = p[0].clone()
        with pytest.raises((ValueError, RuntimeError), match=r"STOCHASTIC_ROUND.*bfloat16"):
            _call(op, p, [torch.ones(4, dtype=dtype)], hp, [torch.zeros(())])
        assert torch.equal(p[0], before)


def test_found_inf_leaves_params_alone() -> None:
    inp = make_inputs(CASES["adam"], torch.bfloat16, 16, gscale=True, found_inf=1.0)
    case = SR_CASES[0]
    inp.case = case
    inp.hp = case.hp_tensor()
    before = [t.clone() for t in inp.tensors()]
    qop.ops.step(*inp.args(make_grads(inp.params, 0)))
    for a, b in zip(inp.tensors(), before):
        assert torch.equal(a, b)
