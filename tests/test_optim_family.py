"""The optimizer family: every qop.optim class against the pure-PyTorch reference and, where torch has the
same optimizer, against torch.optim; state_dict round-trips, argument checks, overrides, StableEmbedding and
percentile clipping.

One spec table (``SPECS``) drives the parity tests. Each entry names a class and its arguments, and states
independently of the class what it must compute: the rule, flags, hyper-parameters (the documented
defaults), state count, code books and initial state value. The oracle feeds exactly that to
``qop.reference.step`` with its own states.
"""

from __future__ import annotations

import copy
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

import qop
from qop import HP, Flag, Rule, reference
from qop._schema import BLOCKSIZE, FORMAT_RULES, HP_SIZE, StateFormat
from qop.nn import StableEmbedding
from qop.optim import (
    LAMB,
    LARS,
    SGD,
    Adagrad,
    Adagrad8bit,
    Adagrad32bit,
    Adam,
    Adam4bit,
    Adam8bit,
    Adam32bit,
    AdamFp8,
    AdamW,
    AdamW4bit,
    AdamW8bit,
    AdamW32bit,
    AdamWFp8,
    AdEMAMix,
    AdEMAMix8bit,
    AdEMAMix32bit,
    GlobalOptimManager,
    LAMB8bit,
    LAMB32bit,
    LARS8bit,
    LARS32bit,
    Lion,
    Lion8bit,
    Lion32bit,
    PagedAdam,
    PagedAdam8bit,
    PagedAdam32bit,
    PagedAdamW,
    PagedAdamW8bit,
    PagedAdamW32bit,
    PagedAdEMAMix,
    PagedAdEMAMix8bit,
    PagedAdEMAMix32bit,
    PagedLion,
    PagedLion8bit,
    PagedLion32bit,
    RMSprop,
    RMSprop8bit,
    RMSprop32bit,
    SGD8bit,
    SGD32bit,
    _formats,
)

SHAPES = [(7,), (4097,), (65, 67)]  # below min_8bit_size; one element into a 17th block; 3 into an 18th
STEPS = 20
WEIGHT_DECAYS = (0.0, 0.1)
MIN_8BIT_SIZE = 4096


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (tests/conftest.py)


# -------------------------------------------------------------------------------------------- spec table
@dataclass
class OptimSpec:
    """One optimizer configuration and what it must compute."""

    id: str
    cls: type
    kwargs: dict[str, Any]
    bits: int | str  # optim_bits: the state format of tensors of at least min_8bit_size elements
    rule: Rule
    hp: dict[HP, float]  # everything but weight decay, which the tests vary
    n_states: int
    signed: tuple[bool, ...] = (True, False, True)
    flags: Flag = Flag.NONE
    init: float = 0.0
    #: torch.optim equivalent: (params, weight_decay) -> optimizer, and our state index -> its state key
    torch_ref: Callable[[list[Tensor], float], torch.optim.Optimizer] | None = None
    torch_states: dict[int, str] = field(default_factory=dict)

    @property
    def lr(self) -> float:
        return self.hp[HP.LR]

    def make(self, params: list[Tensor], weight_decay: float) -> torch.optim.Optimizer:
        return self.cls(params, **{**self.kwargs, "weight_decay": weight_decay})


def family(classes: list[type], kwargs: dict[str, Any], id: str = "", **what: Any) -> list[OptimSpec]:
    """Specs for each class of a family; a class without fixed bits runs with optim_bits 32, 8, 4 and, where its
    rule takes them, fp8 states."""
    out = []
    suffixes: dict[str, int | str] = {"8bit": 8, "32bit": 32, "4bit": 4, "Fp8": "fp8"}
    lowbit = [4, *(["fp8"] if what["rule"] in FORMAT_RULES[StateFormat.FP8] else [])]
    for cls in classes:
        name = cls.__name__
        fixed = next((b for suffix, b in suffixes.items() if name.endswith(suffix)), None)
        for bits in (fixed,) if fixed else (32, 8, *lowbit):
            kw = dict(kwargs) if fixed or bits == 32 else {**kwargs, "optim_bits": bits}
            tag = name if fixed else f"{name}-{bits}"
            out.append(OptimSpec(f"{tag}{'-' + id if id else ''}", cls, kw, bits, **what))
    return out


def _adam_hp(max_unorm: float | None = None) -> dict[HP, float]:
    hp = {HP.LR: 1e-3, HP.BETA1: 0.9, HP.BETA2: 0.999, HP.EPS: 1e-8}
    return hp if max_unorm is None else {**hp, HP.MAX_UNORM: max_unorm}


def _torch_adam(amsgrad=False):
    # qop's Adam decouples weight decay (as bitsandbytes'): torch's AdamW, which is torch's Adam at wd == 0.
    return lambda ps, wd: torch.optim.AdamW(ps, lr=1e-3, weight_decay=wd, amsgrad=amsgrad)


def _torch_sgd(momentum, dampening=0.0, nesterov=False):
    return lambda ps, wd: torch.optim.SGD(
        ps, lr=0.01, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd
    )


_ADAM_STATES = {0: "exp_avg", 1: "exp_avg_sq"}
ADAM_ALL = [Adam, Adam8bit, Adam32bit, Adam4bit, AdamFp8, PagedAdam, PagedAdam8bit, PagedAdam32bit]
ADAMW_ALL = [AdamW, AdamW8bit, AdamW32bit, AdamW4bit, AdamWFp8, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit]
ADAM = dict(rule=Rule.ADAM, n_states=2, signed=(True, False, False), torch_states=_ADAM_STATES)
SGD_ = dict(rule=Rule.MOMENTUM, signed=(True, True, True))
ADEMAMIX = dict(rule=Rule.ADEMAMIX, n_states=3, signed=(True, False, True))
ADEMAMIX_HP = {HP.LR: 1e-3, HP.BETA1: 0.9, HP.BETA2: 0.999, HP.BETA3: 0.9999, HP.ALPHA: 5.0, HP.EPS: 1e-8}
SGD_HP = {HP.LR: 0.01, HP.BETA1: 0.9}

SPECS: list[OptimSpec] = [
    *family(ADAM_ALL, {}, hp=_adam_hp(), torch_ref=_torch_adam(), **ADAM),
    *family(
        [Adam],
        {"amsgrad": True},
        "amsgrad",
        hp=_adam_hp(),
        flags=Flag.AMSGRAD,
        torch_ref=_torch_adam(True),
        **{**ADAM, "n_states": 3, "torch_states": {**_ADAM_STATES, 2: "max_exp_avg_sq"}},
    ),
    *family(ADAMW_ALL, {}, hp=_adam_hp(), torch_ref=_torch_adam(), **ADAM),
    *family(
        [SGD, SGD8bit, SGD32bit],
        {"lr": 0.01, "momentum": 0.9},
        hp=SGD_HP,
        n_states=1,
        torch_ref=_torch_sgd(0.9),
        torch_states={0: "momentum_buffer"},
        **SGD_,
    ),
    *family(
        [SGD],
        {"lr": 0.01, "momentum": 0.9, "nesterov": True},
        "nesterov",
        hp=SGD_HP,
        n_states=1,
        flags=Flag.NESTEROV,
        torch_ref=_torch_sgd(0.9, nesterov=True),
        torch_states={0: "momentum_buffer"},
        **SGD_,
    ),
    *family(
        [SGD],
        {"lr": 0.01, "momentum": 0.8, "dampening": 0.3},
        "dampening",
        hp={HP.LR: 0.01, HP.BETA1: 0.8, HP.DAMPENING: 0.3},
        n_states=1,
        torch_ref=_torch_sgd(0.8, dampening=0.3),
        torch_states={0: "momentum_buffer"},
        **SGD_,
    ),
    *family([SGD], {"lr": 0.01}, "nomomentum", hp={HP.LR: 0.01}, n_states=0, torch_ref=_torch_sgd(0.0), **SGD_),
    *family(
        [LARS, LARS8bit, LARS32bit],
        {"lr": 0.01, "momentum": 0.9},
        hp={**SGD_HP, HP.MAX_UNORM: 0.02},
        n_states=1,
        flags=Flag.UNORM_CLIP,
        **SGD_,
    ),
    *family(
        [LARS],
        {"lr": 0.01},
        "nomomentum",
        hp={HP.LR: 0.01, HP.MAX_UNORM: 0.02},
        n_states=0,
        flags=Flag.UNORM_CLIP,
        **SGD_,
    ),
    *family(
        [LAMB, LAMB8bit, LAMB32bit],
        {},
        hp=_adam_hp(max_unorm=1.0),
        flags=Flag.UNORM_CLIP,
        **{**ADAM, "torch_states": {}},
    ),
    *family(
        [LAMB],
        {"bias_correction": False, "adam_w_mode": False, "max_unorm": 0.5},
        "nobc-l2",
        hp=_adam_hp(max_unorm=0.5),
        flags=Flag.UNORM_CLIP | Flag.NO_BIAS_CORRECTION | Flag.L2_WEIGHT_DECAY,
        **{**ADAM, "torch_states": {}},
    ),
    *family(
        [LAMB],
        {"amsgrad": True},
        "amsgrad",
        hp=_adam_hp(max_unorm=1.0),
        flags=Flag.UNORM_CLIP | Flag.AMSGRAD,
        **{**ADAM, "n_states": 3, "torch_states": {}},
    ),
    *family(
        [Adagrad, Adagrad8bit, Adagrad32bit],
        {},
        rule=Rule.ADAGRAD,
        hp={HP.LR: 1e-2, HP.EPS: 1e-10},
        n_states=1,
        signed=(False, False, False),
        torch_ref=lambda ps, wd: torch.optim.Adagrad(ps, weight_decay=wd),
        torch_states={0: "sum"},
    ),
    *family(
        [Adagrad],
        {"lr_decay": 0.1, "initial_accumulator_value": 0.1},
        "decay-init",
        rule=Rule.ADAGRAD,
        hp={HP.LR: 1e-2, HP.EPS: 1e-10, HP.LR_DECAY: 0.1},
        n_states=1,
        signed=(False, False, False),
        init=0.1,
        torch_ref=lambda ps, wd: torch.optim.Adagrad(ps, lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=wd),
        torch_states={0: "sum"},
    ),
    *family(
        [RMSprop, RMSprop8bit, RMSprop32bit],
        {},
        rule=Rule.RMSPROP,
        hp={HP.LR: 1e-2, HP.ALPHA: 0.99, HP.EPS: 1e-8},
        n_states=1,
        signed=(False, False, False),
        torch_ref=lambda ps, wd: torch.optim.RMSprop(ps, weight_decay=wd),
        torch_states={0: "square_avg"},
    ),
    *family(
        [RMSprop],
        {"alpha": 0.9},
        "alpha",
        rule=Rule.RMSPROP,
        hp={HP.LR: 1e-2, HP.ALPHA: 0.9, HP.EPS: 1e-8},
        n_states=1,
        signed=(False, False, False),
        torch_ref=lambda ps, wd: torch.optim.RMSprop(ps, alpha=0.9, weight_decay=wd),
        torch_states={0: "square_avg"},
    ),
    *family(
        [Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit],
        {},
        rule=Rule.LION,
        hp={HP.LR: 1e-4, HP.BETA1: 0.9, HP.BETA2: 0.99},
        n_states=1,
        signed=(True, True, True),
    ),
    *family(
        [AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit],
        {},
        hp=ADEMAMIX_HP,
        **ADEMAMIX,
    ),
    *family(
        [AdEMAMix],
        {"t_alpha": 10, "t_beta3": 15},
        "warmup",
        hp={**ADEMAMIX_HP, HP.T_ALPHA: 10, HP.T_BETA3: 15},
        **ADEMAMIX,
    ),
]
SPEC_IDS = [s.id for s in SPECS]
EVERY_CLASS = sorted({s.cls.__name__ for s in SPECS})


def test_spec_table_covers_every_class():
    assert {c.__name__ for c in qop.optim.CLASSES} == set(EVERY_CLASS)


# ------------------------------------------------------------------------------------------------ oracle
def make_problem(dtype: torch.dtype, seed: int = 0, steps: int = STEPS) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Initial params and a gradient sequence (varying scale, one all-zero block) in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = []
    for t in range(steps):
        scale = 0.5 + 1.5 * (t % 3)
        gs = [(torch.randn(s, generator=gen) * scale).to(dtype) for s in SHAPES]
        gs[1][:BLOCKSIZE] = 0  # a block whose states see only decay (absmax may reach 0)
        grads.append(gs)
    return params, grads


class Oracle:
    """The spec's optimizer, run directly on qop.reference's step ops with states of its own."""

    def __init__(self, spec: OptimSpec, params: list[Tensor], weight_decay: float) -> None:
        self.spec = spec
        self.params = [p.detach().clone() for p in params]
        self.hp = torch.zeros(HP_SIZE, dtype=torch.float32)
        for slot, value in spec.hp.items():
            self.hp[slot] = value
        self.hp[HP.WEIGHT_DECAY] = weight_decay
        self.codes = [qop.dynamic_map(s) for s in spec.signed]
        self.steps = [torch.zeros(()) for _ in params]
        self.formats = [_formats.low_bit(spec.bits, p.numel(), MIN_8BIT_SIZE) for p in params]
        self.eight = [f == StateFormat.BLOCKWISE8 for f in self.formats]
        self.books = [_formats.books(f, spec.signed, torch.device("cpu")) for f in self.formats]
        self.states: list[list[Tensor]] = []
        self.absmax: list[list[Tensor]] = []
        for p, eight, fmt, books in zip(self.params, self.eight, self.formats, self.books):
            full = torch.full(p.shape, spec.init, dtype=torch.float32)
            if fmt in (StateFormat.BLOCKWISE4, StateFormat.FP8):
                qa = [reference.quantize_state(fmt, full, books[j] if books else None, j) for j in range(spec.n_states)]
                self.states.append([q for q, _ in qa])
                self.absmax.append([a for _, a in qa if a is not None])
            elif eight:
                qa = [reference.quantize_blockwise(full, self.codes[j], BLOCKSIZE) for j in range(spec.n_states)]
                self.states.append([q for q, _ in qa])
                self.absmax.append([a for _, a in qa])
            else:
                self.states.append([full.clone() for _ in range(spec.n_states)])
                self.absmax.append([])

    def step(self, grads: list[Tensor]) -> None:
        s = self.spec
        for i, (p, g) in enumerate(zip(self.params, grads)):
            codes = self.codes[: s.n_states] if self.eight[i] else self.books[i][: s.n_states]
            reference.step(
                int(s.rule),
                int(s.flags),
                [p],
                [g],
                self.states[i],
                self.absmax[i],
                codes,
                [self.steps[i]],
                self.hp,
                None,
                None,
            )


def run(opt: torch.optim.Optimizer, params: list[Tensor], grads: list[list[Tensor]]) -> None:
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


# ------------------------------------------------------------------------------------------- tolerances
# The CPU ops run the reference itself until the C++ kernels are built (then these checks are exact). The
# tolerances leave room for native kernels: float rounding (FMA, order of operations) in 32 bits, and in 8 bits
# requantization landing one code away when a value sits near the midpoint of two codes.
def assert_mostly_close(actual: Tensor, expected: Tensor, *, rtol: float, atol: float, frac: float, what: str):
    a, e = actual.float(), expected.float()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    bad = (a - e).abs() > atol + rtol * e.abs()
    assert bad.float().mean().item() <= 1 - frac, (
        f"{what}: {int(bad.sum())} of {a.numel()} elements differ, max |diff| {(a - e).abs().max().item():.3g}"
    )


def param_tolerance(spec: OptimSpec, dtype: torch.dtype) -> dict[str, float]:
    if spec.bits != 32:  # a one-code flip in a state moves that element's update by a fraction of lr
        return dict(rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=0.5 * spec.lr, frac=0.99)
    if dtype == torch.bfloat16:  # a float32 ulp may flip a bf16 rounding
        return dict(rtol=2**-7, atol=1e-6, frac=0.999)
    return dict(rtol=1e-5, atol=1e-6, frac=0.999)


def assert_codes_close(q: Tensor, absmax: Tensor, q_ref: Tensor, absmax_ref: Tensor, what: str) -> None:
    """8-bit states: codes within one index for the vast majority, absmax close."""
    torch.testing.assert_close(absmax, absmax_ref, rtol=3e-2, atol=1e-12, msg=lambda m: f"{what} absmax: {m}")
    diff = (q.int() - q_ref.int()).abs()
    assert (diff <= 1).float().mean().item() >= 0.99, f"{what}: codes differ by > 1 at {int((diff > 1).sum())} elements"


def code_distance(a: Tensor, b: Tensor, fmt: StateFormat) -> Tensor:
    """Per element, code-book steps between two 4-bit or fp8 states (fp8: steps of the e4m3fn grid)."""
    if fmt == StateFormat.BLOCKWISE4:
        return (reference.unpack4(a, 2 * a.numel()).int() - reference.unpack4(b, 2 * b.numel()).int()).abs()
    ia, ib = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    return (torch.where(ia >= 128, 128 - ia, ia) - torch.where(ib >= 128, 128 - ib, ib)).abs()


def compare_with_oracle(
    opt: torch.optim.Optimizer, params: list[Tensor], oracle: Oracle, spec: OptimSpec, dtype: torch.dtype
) -> None:
    for i, (p, p_ref) in enumerate(zip(params, oracle.params)):
        assert p.dtype == dtype
        assert_mostly_close(p, p_ref, **param_tolerance(spec, dtype), what=f"param {SHAPES[i]}")
        st = opt.state[p]
        assert float(st["step"]) == STEPS
        for j in range(spec.n_states):
            mine = st[f"state{j + 1}"]
            fmt = oracle.formats[i]
            if fmt in (StateFormat.BLOCKWISE4, StateFormat.FP8):
                ref_state = oracle.states[i][j]
                assert mine.dtype == ref_state.dtype and mine.numel() == ref_state.numel()
                torch.testing.assert_close(st[f"absmax{j + 1}"], oracle.absmax[i][j], rtol=3e-2, atol=1e-12)
                diff = code_distance(mine.reshape(-1), ref_state.reshape(-1), fmt)
                assert (diff <= 1).float().mean().item() >= 0.99, f"state{j + 1} of {SHAPES[i]}: codes apart"
            elif oracle.eight[i]:
                assert mine.dtype == torch.uint8 and mine.shape == p.shape
                assert_codes_close(
                    mine, st[f"absmax{j + 1}"], oracle.states[i][j], oracle.absmax[i][j], f"state{j + 1} of {SHAPES[i]}"
                )
            else:
                assert mine.dtype == torch.float32
                assert_mostly_close(
                    mine,
                    oracle.states[i][j].view_as(mine),
                    rtol=1e-5,
                    atol=1e-7,
                    frac=0.999,
                    what=f"state{j + 1} of {SHAPES[i]}",
                )
        assert f"state{spec.n_states + 1}" not in st


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS, ids=lambda w: f"wd{w}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_matches_reference(spec: OptimSpec, dtype: torch.dtype, weight_decay: float):
    params0, grads = make_problem(dtype)
    params = [p.clone().requires_grad_() for p in params0]
    opt = spec.make(params, weight_decay)
    run(opt, params, grads)
    oracle = Oracle(spec, params0, weight_decay)
    for gs in grads:
        oracle.step(gs)
    compare_with_oracle(opt, params, oracle, spec, dtype)


TORCH_SPECS = [s for s in SPECS if s.torch_ref is not None and s.bits == 32]


@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS, ids=lambda w: f"wd{w}")
@pytest.mark.parametrize("spec", TORCH_SPECS, ids=[s.id for s in TORCH_SPECS])
def test_matches_torch_optim(spec: OptimSpec, weight_decay: float):
    params0, grads = make_problem(torch.float32)
    params = [p.clone().requires_grad_() for p in params0]
    theirs = [p.clone().requires_grad_() for p in params0]
    opt = spec.make(params, weight_decay)
    ref = spec.torch_ref(theirs, weight_decay)
    run(opt, params, grads)
    run(ref, theirs, grads)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for j, key in spec.torch_states.items():
            theirs_state = ref.state[q][key]  # torch's lerp/addcmul round differently: scale atol to the state
            torch.testing.assert_close(
                opt.state[p][f"state{j + 1}"], theirs_state, rtol=1e-5, atol=1e-5 * theirs_state.abs().max().item()
            )


# ------------------------------------------------------------------------------------------- state dicts
def _unique_configs() -> list[OptimSpec]:
    seen, out = set(), []
    for s in SPECS:
        key = (s.cls, tuple(sorted(s.kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


ROUNDTRIP_SPECS = _unique_configs()


@pytest.mark.parametrize("spec", ROUNDTRIP_SPECS, ids=[s.id for s in ROUNDTRIP_SPECS])
def test_state_dict_roundtrip(spec: OptimSpec):
    params0, grads = make_problem(torch.float32, seed=1, steps=5)
    params = [p.clone().requires_grad_() for p in params0]
    opt = spec.make(params, 0.1)
    run(opt, params, grads[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = spec.make(params2, 0.0)  # the loaded groups bring weight_decay back to 0.1
    opt2.load_state_dict(loaded)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for p, p2 in zip(params, params2):
        a, b = opt.state[p], opt2.state[p2]
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert float(b["step"]) == 3
    run(opt, params, grads[3:])
    run(opt2, params2, grads[3:])
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt2.state[p2][k]), k


def test_load_bnb_gnorm_vec_as_norms():
    """bitsandbytes releases with percentile clipping kept squared norms, 0 for unfilled slots, under its
    nested quant-state key; loading turns them into norms, +inf where unfilled, so clipping goes on alike."""
    params0, grads = make_problem(torch.float32, seed=4, steps=4)
    params = [p.clone().requires_grad_() for p in params0]
    opt = Adam8bit(params, percentile_clipping=5, min_8bit_size=0)
    run(opt, params, grads[:2])
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():  # what bitsandbytes would have saved: squares and zeros, nested
        norms = st.pop("gnorm_vec")
        squares = torch.where(torch.isinf(norms), 0.0, norms * norms)
        st["__bnb_optimizer_quant_state__"] = {"gnorm_vec": squares, "state1": st.pop("state1")}
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = Adam8bit(params2, percentile_clipping=5, min_8bit_size=0)
    opt2.load_state_dict(sd)
    for p, p2 in zip(params, params2):
        want, got = opt.state[p]["gnorm_vec"], opt2.state[p2]["gnorm_vec"]
        assert torch.isinf(got).sum() == 98 and torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    run(opt, params, grads[2:])
    run(opt2, params2, grads[2:])
    for p, p2 in zip(params, params2):
        torch.testing.assert_close(p2, p, rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------------- argument checks
def _p() -> list[Tensor]:
    return [torch.zeros(4, requires_grad=True)]


INVALID: list[tuple[type, dict[str, Any], type[Exception], str]] = [
    (Adam, {"lr": -1e-3}, ValueError, "lr"),
    (Adam, {"lr": math.nan}, ValueError, "lr"),
    (Adam, {"betas": (1.0, 0.999)}, ValueError, "betas[0]"),
    (Adam, {"betas": (0.9, -0.1)}, ValueError, "betas[1]"),
    (Adam, {"betas": (0.9,)}, ValueError, "betas"),
    (Adam, {"eps": -1e-8}, ValueError, "eps"),
    (Adam, {"weight_decay": -0.1}, ValueError, "weight_decay"),
    (Adam, {"optim_bits": 12}, ValueError, "optim_bits"),
    (Adam8bit, {"optim_bits": 4}, ValueError, "optim_bits"),
    (Adam, {"min_8bit_size": -1}, ValueError, "min_8bit_size"),
    (Adam, {"percentile_clipping": 0}, ValueError, "percentile_clipping"),
    (Adam, {"percentile_clipping": 101}, ValueError, "percentile_clipping"),
    (AdamW8bit, {"lr": -1.0}, ValueError, "lr"),
    (SGD, {"lr": -0.1}, ValueError, "lr"),
    (SGD, {"lr": 0.1, "momentum": -0.9}, ValueError, "momentum"),
    (SGD, {"lr": 0.1, "momentum": 0.9, "dampening": -0.1}, ValueError, "dampening"),
    (SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 1.5}, ValueError, "dampening"),
    (SGD, {"lr": 0.1, "nesterov": True}, ValueError, "nesterov"),
    (SGD8bit, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, ValueError, "nesterov"),
    (SGD32bit, {"lr": 0.1, "weight_decay": -1}, ValueError, "weight_decay"),
    (SGD, {"lr": 0.1, "min_8bit_size": 1.5}, ValueError, "min_8bit_size"),
    (LARS, {"lr": 0.1, "momentum": 0.9, "max_unorm": -0.02}, ValueError, "max_unorm"),
    (LARS8bit, {"lr": 0.1, "nesterov": True}, ValueError, "nesterov"),
    (LAMB, {"max_unorm": -1.0}, ValueError, "max_unorm"),
    (LAMB8bit, {"betas": (0.9, 1.0)}, ValueError, "betas[1]"),
    (LAMB32bit, {"eps": -1.0}, ValueError, "eps"),
    (Adagrad, {"lr_decay": -0.1}, ValueError, "lr_decay"),
    (Adagrad, {"initial_accumulator_value": -0.1}, ValueError, "initial_accumulator_value"),
    (Adagrad8bit, {"eps": -1.0}, ValueError, "eps"),
    (Adagrad32bit, {"lr": -1.0}, ValueError, "lr"),
    (RMSprop, {"alpha": -0.1}, ValueError, "alpha"),
    (RMSprop, {"alpha": 1.5}, ValueError, "alpha"),
    (RMSprop, {"momentum": 0.9}, NotImplementedError, "momentum"),
    (RMSprop8bit, {"centered": True}, NotImplementedError, "centered"),
    (RMSprop32bit, {"eps": -1.0}, ValueError, "eps"),
    (Lion, {"lr": -1e-4}, ValueError, "lr"),
    (Lion8bit, {"betas": (0.9, 1.5)}, ValueError, "betas[1]"),
    (PagedLion32bit, {"weight_decay": -1.0}, ValueError, "weight_decay"),
    (PagedLion, {"optim_bits": 7}, ValueError, "optim_bits"),
    (AdEMAMix, {"alpha": -1.0}, ValueError, "alpha"),
    (AdEMAMix, {"t_alpha": 0}, ValueError, "t_alpha"),
    (AdEMAMix8bit, {"t_beta3": -5}, ValueError, "t_beta3"),
    (AdEMAMix, {"betas": (0.9, 0.999)}, ValueError, "betas"),
    (AdEMAMix32bit, {"betas": (0.9, 0.999, 1.0)}, ValueError, "betas[2]"),
    (PagedAdEMAMix8bit, {"eps": -1.0}, ValueError, "eps"),
    (PagedAdEMAMix, {"min_8bit_size": -4}, ValueError, "min_8bit_size"),
]


@pytest.mark.parametrize(
    "cls,kwargs,exc,name", INVALID, ids=[f"{c.__name__}-{'-'.join(k)}-{i}" for i, (c, k, _, _) in enumerate(INVALID)]
)
def test_invalid_arguments(cls, kwargs, exc, name):
    with pytest.raises(exc, match=re.escape(name)):
        cls(_p(), **kwargs)


@pytest.mark.parametrize(
    "cls,defaults,group,name",
    [
        (Adam, {}, {"lr": -1.0}, "lr"),
        (SGD, {"lr": 0.1, "momentum": 0.9}, {"momentum": 0.0, "nesterov": True}, "nesterov"),
        (RMSprop, {}, {"centered": True}, "centered"),
        (Adagrad, {}, {"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
        (AdEMAMix, {}, {"t_alpha": 0}, "t_alpha"),
        (LAMB, {}, {"max_unorm": -1.0}, "max_unorm"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_invalid_param_group(cls, defaults, group, name):
    opt = cls(_p(), **defaults)
    with pytest.raises((ValueError, NotImplementedError), match=re.escape(name)):
        opt.add_param_group({"params": _p(), **group})


def test_param_groups_mix_momentum_and_warmups():
    """Per-group structure: one SGD group with a momentum buffer and one without; AdEMAMix warm-ups per group."""
    a, b = torch.randn(300, requires_grad=True), torch.randn(300, requires_grad=True)
    opt = SGD([{"params": [a]}, {"params": [b], "momentum": 0.0}], lr=0.1, momentum=0.9)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert "state1" in opt.state[a] and "state1" not in opt.state[b]
    c, d = torch.randn(300, requires_grad=True), torch.randn(300, requires_grad=True)
    opt = AdEMAMix([{"params": [c]}, {"params": [d], "t_alpha": 50, "t_beta3": None}], t_beta3=20)
    assert float(opt.param_groups[0]["t_beta3"]) == 20 and float(opt.param_groups[1]["t_beta3"]) == 0
    assert float(opt.param_groups[1]["t_alpha"]) == 50


# ---------------------------------------------------------------------------------- GlobalOptimManager
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (Adam, {"optim_bits": 8}),
        (SGD8bit, {"lr": 0.01, "momentum": 0.9}),
        (Lion8bit, {}),
        (AdEMAMix8bit, {}),
        (Adagrad8bit, {}),
        (LAMB8bit, {}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_manager_override_optim_bits(cls, kwargs):
    mng = GlobalOptimManager.get_instance()
    before, after, plain = (torch.randn(64, 80, requires_grad=True) for _ in range(3))
    mng.register_parameters([before, after, plain])
    mng.override_config(before, "optim_bits", 32)  # registered before the optimizer is built
    opt = cls([before, after, plain], **kwargs)
    mng.override_config([after], key_value_dict={"optim_bits": 32})  # and after
    for p in (before, after, plain):
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    for p in (before, after):
        assert opt.state[p]["state1"].dtype == torch.float32 and "absmax1" not in opt.state[p]
    assert opt.state[plain]["state1"].dtype == torch.uint8 and "absmax1" in opt.state[plain]
    assert all(torch.isfinite(p).all() for p in (before, after, plain))


# ------------------------------------------------------------------------------------------ StableEmbedding
def test_stable_embedding_module():
    emb = StableEmbedding(100, 16, padding_idx=3)
    bound = math.sqrt(6.0 / (100 + 16))  # xavier_uniform
    assert emb.weight.abs().max() <= bound and torch.all(emb.weight[3] == 0)
    assert isinstance(emb.norm, torch.nn.LayerNorm) and emb.norm.normalized_shape == (16,)
    idx = torch.tensor([[1, 3, 99], [0, 5, 7]])
    out = emb(idx)
    expected = torch.nn.functional.layer_norm(emb.weight[idx], (16,), emb.norm.weight, emb.norm.bias)
    torch.testing.assert_close(out, expected)
    half = StableEmbedding(10, 8, dtype=torch.bfloat16)
    assert half(torch.tensor([1, 2])).dtype == torch.bfloat16 and half.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit, Lion8bit, AdEMAMix8bit])
def test_stable_embedding_states_are_32bit(cls):
    model = torch.nn.Sequential(StableEmbedding(512, 16), torch.nn.Flatten(), torch.nn.Linear(64, 64))
    opt = cls(model.parameters())  # built after the module: the override applies
    emb, lin = model[0], model[2]
    for _ in range(2):
        model(torch.randint(0, 512, (8, 4))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert emb.weight.numel() >= MIN_8BIT_SIZE and lin.weight.numel() >= MIN_8BIT_SIZE
    assert opt.state[emb.weight]["state1"].dtype == torch.float32
    assert "absmax1" not in opt.state[emb.weight]
    assert opt.state[lin.weight]["state1"].dtype == torch.uint8


# ------------------------------------------------------------------------------------ percentile clipping
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item")


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (Adam8bit, {}),
        (Adam, {}),
        (SGD, {"lr": 0.01, "momentum": 0.9}),
        (Lion8bit, {}),
        (AdEMAMix, {}),
        (Adagrad8bit, {}),
        (LAMB, {}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_percentile_clipping(cls, kwargs):
    params0, grads = make_problem(torch.float32, seed=2)
    for t, gs in enumerate(grads):  # spikes the clipping must tame
        if t % 5 == 4:
            for g in gs:
                g.mul_(100.0)
    runs = {}
    for pc in (100, 5):
        params = [p.clone().requires_grad_() for p in params0]
        opt = cls(params, percentile_clipping=pc, **kwargs)
        run(opt, params, grads[:3])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(opt, params, grads[3:])
        synced = [e.name for e in prof.events() if e.name in SYNC_OPS]
        assert not synced, f"percentile_clipping={pc}: the step synchronised with the host ({synced[:3]})"
        assert all(torch.isfinite(p).all() for p in params)
        for st in opt.state.values():
            assert all(torch.isfinite(v.float()).all() for k, v in st.items() if k != "gnorm_vec")
        if pc < 100:
            assert opt.state[params[0]]["gnorm_vec"].shape == (100,)
        runs[pc] = params
    moved = [(a - b).abs().max().item() for a, b in zip(runs[100], runs[5])]
    assert max(moved) > 0, "percentile clipping did not change the trajectory"


@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit, AdEMAMix8bit])
def test_vanishing_gradient_moves_by_lr(cls):
    """SEMANTICS.md section 1: an element whose gradient was 1e-4 of its block's largest and then vanishes
    keeps a non-zero second moment (the unsigned map's floor), so it moves by about lr, not by m / eps
    (4.2 with lr = 1e-3 under plain nearest rounding)."""
    lr = 1e-3
    p = torch.nn.Parameter(torch.zeros(BLOCKSIZE))
    opt = cls([p], lr=lr, min_8bit_size=BLOCKSIZE)
    for g1 in (1e-4, 0.0):
        before = float(p.detach()[1])
        p.grad = torch.zeros(BLOCKSIZE)
        p.grad[0], p.grad[1] = 1.0, g1
        opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8
    assert abs(float(p.detach()[1]) - before) < 10 * lr
