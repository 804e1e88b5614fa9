"""Property tests: every op's C++ CPU kernel against ``qop.reference`` on inputs drawn by hypothesis.

Shapes (0, 1, 255, 256, 257 elements, random lengths, 2-D), dtypes, values (zeros, -0.0, subnormals, +-inf,
NaN, values near the float32 maximum, every magnitude in between), code books, rules, flags and
hyper-parameters are drawn; some examples also break one argument.  For each example the C++ kernel either

* matches the reference, checked like the CPU kernel checks (``qop._register``): quantize/dequantize
  exactly, steps within the tolerances of ``tests/test_ops.py`` (NaN where the reference gives NaN), or
* raises ValueError/RuntimeError naming the argument, changing nothing, and the reference raises naming the
  same argument.  One documented exception: a step count that is not a finite number >= 0 reaches
  ``percentile_clip``'s kernels as a value, which the reference cannot inspect without a host sync; the C++
  kernel rejects it, the reference fails on its own (an index out of range) for the counts drawn here.

Examples are derandomized (the same ones on every run) and few enough for a few seconds per op.  The Triton
kernels get a handful of examples from the same strategies: on a GPU in this process, else under
TRITON_INTERPRET=1 in a fresh interpreter (Triton chooses its mode when first imported).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import qop
from qop import BLOCKSIZE, HP, reference
from qop._register import _checked_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_ops import SIGNED, STEP_CASES, assert_params_close  # noqa: E402  (same cases and tolerances)

pytestmark = [
    pytest.mark.skipif(not qop.HAS_CPU_KERNELS, reason="qop C++ CPU kernels not built"),
    pytest.mark.usefixtures("one_thread"),  # small tensors (tests/conftest.py)
]

REF = _checked_reference()
CPU = {name: getattr(torch.ops.qop, name).default for name in REF}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bounded(max_examples: int) -> settings:
    """Reproducible (derandomized) and bounded: a fixed number of examples, no per-example deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ----------------------------------------------------------------------------------------- strategies
SHAPES = st.one_of(
    st.sampled_from([(0,), (1,), (255,), (256,), (257,), (3, 91), (16, 16), (2, 0)]),
    st.integers(0, 700).map(lambda n: (n,)),
)
#: Values planted at random positions: zeros of both signs, subnormals, infinities, NaN, the float32 extremes.
SPECIALS = (0.0, -0.0, 1e-40, -1e-40, 1e-45, 1e-30, math.inf, -math.inf, math.nan, 3.4e38, -3.4e38, 65504.0, 1e20)
#: Scales of the random normal background.
SCALES = (0.0, 1e-42, 1e-30, 1e-8, 1.0, 1e4, 1e20, 3e38)


@st.composite
def tensors(draw: Callable, shape: tuple[int, ...], dtype: torch.dtype, positive: bool = False) -> Tensor:
    """A tensor of ``shape``: seeded normal values at a drawn scale, with a few special values planted."""
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**32 - 1))
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * draw(st.sampled_from(SCALES))
    if n and draw(st.booleans()):
        for i, v in draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(SPECIALS)), max_size=6)):
            x[i] = v
    if positive:
        x = x.abs()
    return x.reshape(shape).to(dtype)


def _book(kind: str) -> Tensor:
    gen = torch.Generator().manual_seed(11)
    if kind == "signed":
        return qop.dynamic_map(signed=True)
    if kind == "unsigned":
        return qop.dynamic_map(signed=False)
    if kind == "random":
        return torch.sort(torch.randn(256, generator=gen) * 10.0 ** torch.randint(-8, 1, (256,), generator=gen)).values
    # non-negative with five zeros: an unsigned book whose floor is 5 (the kernels' slow path)
    return torch.sort(torch.cat([torch.zeros(5), torch.rand(251, generator=gen)])).values


BOOKS = {kind: _book(kind) for kind in ("signed", "unsigned", "random", "five_zeros")}


# --------------------------------------------------------------------------------------------- outcomes
def run(fn: Callable, *args: Any) -> tuple[Any, BaseException | None]:
    """``fn(*args)`` and the error it raised, if any."""
    try:
        return fn(*args), None
    except (ValueError, RuntimeError, IndexError, TypeError) as exc:
        return None, exc


def argument(exc: BaseException) -> str:
    """The argument a qop error message names first (``qop: grads[0] is ...`` -> ``grads``)."""
    m = re.match(r"qop: (\w+)", str(exc))
    assert m, f"error without the argument's name: {exc!r}"
    return m.group(1)


def same_failure(ours: BaseException | None, ref: BaseException | None, reference_checks: bool = True) -> bool:
    """True when both raised (naming the same argument); False when neither did; fails otherwise."""
    event("rejected" if ours is not None or ref is not None else "compared")
    if ours is None and ref is None:
        return False
    assert ours is not None, f"the reference raised, the C++ kernel did not: {ref!r}"
    assert ref is not None, f"the C++ kernel raised, the reference did not: {ours!r}"
    assert isinstance(ours, (ValueError, RuntimeError)), repr(ours)
    if reference_checks:
        assert argument(ours) == argument(ref), f"{ours!r} vs {ref!r}"
    else:
        argument(ours)
    return True


def snapshot(ts: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in ts]


def assert_unchanged(ts: list[Tensor], before: list[Tensor]) -> None:
    """A failed call writes nothing (bit for bit, NaN included)."""
    for a, b in zip(ts, before):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_values(ours: Tensor, ref: Tensor, check: Callable[[Tensor, Tensor], None]) -> None:
    """Equal values (infinities included) and NaN in the same places; ``check`` compares the rest."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    a, b = ours.float(), ref.float()
    nan_a, nan_b = a.isnan(), b.isnan()
    assert torch.equal(nan_a, nan_b), "NaN where the reference has none (or the other way round)"
    settled = nan_a | (a == b)
    check(torch.where(settled, 0.0, a).to(ours.dtype), torch.where(settled, 0.0, b).to(ref.dtype))


# --------------------------------------------------------------------------------- quantize/dequantize
@bounded(120)
@given(data=st.data())
def test_quantize_dequantize_match_reference(data: st.DataObject) -> None:
    """Codes and absmax exactly equal (NaN included), then every dequantized dtype exactly equal."""
    dtype = data.draw(st.sampled_from(DTYPES))
    book = data.draw(st.sampled_from(sorted(BOOKS)))
    A = data.draw(tensors(data.draw(SHAPES), dtype, positive=book in ("unsigned", "five_zeros")))
    blocksize = data.draw(st.sampled_from([256, 256, 256, 1, 7, 64, 100, 4096, 0, -3]))
    ours, err = run(CPU["quantize_blockwise"], A, BOOKS[book], blocksize)
    ref, ref_err = run(REF["quantize_blockwise"], A, BOOKS[book], blocksize)
    if same_failure(err, ref_err):
        return
    assert torch.equal(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0, equal_nan=True)
    out_dtype = data.draw(st.sampled_from(DTYPES))
    d, _ = run(CPU["dequantize_blockwise"], *ours, BOOKS[book], blocksize, out_dtype)
    dr, _ = run(REF["dequantize_blockwise"], *ours, BOOKS[book], blocksize, out_dtype)
    torch.testing.assert_close(d, dr, rtol=0, atol=0, equal_nan=True)


@bounded(80)
@given(data=st.data())
def test_dequantize_any_codes_matches_reference(data: st.DataObject) -> None:
    """Arbitrary codes and absmax values (zeros, subnormals, inf, NaN), some with a wrong absmax length or
    dtype: exactly equal, or both reject the same argument."""
    shape = data.draw(SHAPES)
    n = math.prod(shape)
    broken = data.draw(st.sampled_from([None] * 12 + ["blocksize", "absmax_len", "absmax_dtype", "dtype"]))
    blocksize = 0 if broken == "blocksize" else data.draw(st.sampled_from([256, 1, 100, 4096]))
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    nb = -(-n // blocksize) if blocksize > 0 else 0
    nb += data.draw(st.sampled_from([1, -1])) if broken == "absmax_len" and nb else 0
    absmax = data.draw(tensors((nb,), torch.float32, positive=True))
    if broken == "absmax_dtype":
        absmax = absmax.double()
    book = BOOKS[data.draw(st.sampled_from(sorted(BOOKS)))]
    out_dtype = torch.float64 if broken == "dtype" else data.draw(st.sampled_from(DTYPES))
    args = (codes, absmax, book, blocksize, out_dtype)
    d, err = run(CPU["dequantize_blockwise"], *args)
    dr, ref_err = run(REF["dequantize_blockwise"], *args)
    if same_failure(err, ref_err):
        return
    torch.testing.assert_close(d, dr, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------ steps
#: Ways to break one argument of a step call: (name, function of the argument dict).
def _break(name: str, a: dict) -> None:
    if name == "rule":
        a["rule"] = 7
    elif name == "flags":
        a["flags"] = 32
    elif name == "grad_dtype" and a["params"]:
        a["grads"][0] = a["grads"][0].double()
    elif name == "grad_shape" and a["params"]:
        a["grads"][0] = torch.zeros(a["grads"][0].numel() + 1, dtype=a["grads"][0].dtype)
    elif name == "step_dtype" and a["params"]:
        a["steps"][0] = a["steps"][0].double()
    elif name == "hp":
        a["hp"] = a["hp"][:5]
    elif name == "gscale":
        a["gscale"] = torch.ones(len(a["params"]) + 1)
    elif name == "found_inf":
        a["found_inf"] = torch.zeros(2)
    elif name == "state_dtype" and a["params"] and a["states"][0]:
        a["states"][0][0] = a["states"][0][0].to(torch.float16)
    elif name == "absmax" and a["params"] and a["absmax"] and a["absmax"][0]:
        a["absmax"][0][0] = torch.zeros(a["absmax"][0][0].numel() + 1)
    elif name == "code" and a["codes"]:
        a["codes"][0] = a["codes"][0][:100]


BREAKS = (
    "rule",
    "flags",
    "grad_dtype",
    "grad_shape",
    "step_dtype",
    "hp",
    "gscale",
    "found_inf",
    "state_dtype",
    "absmax",
    "code",
)


@st.composite
def step_calls(draw: Callable, bits: int) -> dict:
    """Every argument of one step call, as a dict of lists (the C++ kernel and the reference get clones)."""
    case = draw(st.sampled_from(STEP_CASES))
    dtype = draw(st.sampled_from(DTYPES))
    shapes = draw(st.lists(SHAPES, min_size=0, max_size=3))
    signed = SIGNED[case.rule][: case.n_states]
    params = [draw(tensors(s, dtype)) for s in shapes]
    grads = [draw(tensors(s, dtype)) for s in shapes]
    states, absmax = [], []
    for sg in signed:
        raw = [draw(tensors(s, torch.float32, positive=not sg)) for s in shapes]
        if bits == 8:
            qa = [CPU["quantize_blockwise"](x, qop.dynamic_map(sg), BLOCKSIZE) for x in raw]
            states.append([q for q, _ in qa])
            absmax.append([a for _, a in qa])
        else:
            states.append(raw)
    hp = case.hp_tensor()
    for slot, values in (
        (HP.LR, (None, 0.0, 1e-3, 1.0)),
        (HP.EPS, (None, None, 0.0, 1e-30)),
        (HP.WEIGHT_DECAY, (None, 0.0, 0.1)),
    ):
        value = draw(st.sampled_from(values))
        if value is not None:
            hp[slot] = value
    steps = [torch.tensor(draw(st.sampled_from([0.0, 0.0, 1.0, 9.0, 99.0, 1e4, 1e7]))) for _ in shapes]
    gscale = None
    if draw(st.booleans()):
        gscale = torch.tensor([draw(st.sampled_from([1.0, 0.5, 3.0, 0.0, math.inf, math.nan])) for _ in shapes])
    found_inf = draw(st.sampled_from([None, None, 0.0, 1.0]))
    call = dict(
        rule=int(case.rule),
        flags=int(case.flags),
        params=params,
        grads=grads,
        states=states,
        absmax=absmax,
        steps=steps,
        hp=hp,
        gscale=gscale,
        found_inf=None if found_inf is None else torch.tensor(found_inf),
        codes=[qop.dynamic_map(sg) for sg in signed] if bits == 8 else [],
    )
    broken = draw(st.sampled_from([None] * 40 + list(BREAKS)))  # about one call in five
    if broken is not None:
        _break(broken, call)
    return call


def clone_call(a: dict) -> dict:
    def c(t):
        return None if t is None else t.clone()

    return dict(
        a,
        params=[c(t) for t in a["params"]],
        grads=list(a["grads"]),
        states=[[c(t) for t in s] for s in a["states"]],
        absmax=[[c(t) for t in s] for s in a["absmax"]],
        steps=[c(t) for t in a["steps"]],
        hp=c(a["hp"]),
        gscale=c(a["gscale"]),
        found_inf=c(a["found_inf"]),
    )


def call_args(a: dict, bits: int) -> tuple:
    """``qop::step``'s arguments in schema order: the states (and absmax) as flat lists, state j of tensor i at
    j * n + i; one code book per state in 8 bits, none in 32."""
    states = [t for s in a["states"] for t in s]
    absmax = [t for s in a["absmax"] for t in s] if bits == 8 else []
    codes = list(a["codes"][: len(a["states"])]) if bits == 8 else []
    return (
        a["rule"],
        a["flags"],
        a["params"],
        a["grads"],
        states,
        absmax,
        codes,
        a["steps"],
        a["hp"],
        a["gscale"],
        a["found_inf"],
    )


def written(a: dict) -> list[Tensor]:
    return [*a["params"], *(t for s in a["states"] for t in s), *(t for s in a["absmax"] for t in s), *a["steps"]]


def check_step(
    bits: int, ours: dict, ref: dict, err: BaseException | None, ref_err: BaseException | None, before: list[Tensor]
) -> None:
    if same_failure(err, ref_err):
        assert_unchanged(written(ours), before)
        return
    for so, sr in zip(ours["steps"], ref["steps"]):
        assert torch.equal(so, sr)
    for po, pr in zip(ours["params"], ref["params"]):
        assert_same_values(po, pr, assert_params_close)
    fp32 = not ours["params"] or ours["params"][0].dtype == torch.float32
    for j in range(len(ours["states"])):
        for so, sr in zip(ours["states"][j], ref["states"][j]):
            if bits == 32:
                rtol = 1e-5 if fp32 else 1e-3
                torch.testing.assert_close(so, sr, rtol=rtol, atol=1e-6, equal_nan=True)
            else:
                d = (so.int() - sr.int()).abs()
                assert d.numel() == 0 or int(d.max()) <= 1, f"state{j + 1} more than one code apart"
        for ao, ar in zip(ours["absmax"][j] if bits == 8 else [], ref["absmax"][j] if bits == 8 else []):
            torch.testing.assert_close(ao, ar, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("bits", [32, 8])
@bounded(100)
@given(data=st.data())
def test_step_matches_reference(bits: int, data: st.DataObject) -> None:
    """One step of a drawn rule, flag set, dtype, shapes and values from identical inputs."""
    call = data.draw(step_calls(bits))
    ours, ref = clone_call(call), clone_call(call)
    before = snapshot(written(ours))
    _, err = run(CPU["step"], *call_args(ours, bits))
    _, ref_err = run(REF["step"], *call_args(ref, bits))
    if any(bool(p.isnan().any()) for p in ref["params"]):
        event("NaN in the reference's params")
    check_step(bits, ours, ref, err, ref_err, before)


# ----------------------------------------------------------------------------------- percentile clipping
@bounded(100)
@given(data=st.data())
def test_percentile_clip_matches_reference(data: st.DataObject) -> None:
    """Clip factors and recorded norms within float rounding of the reference's (NaN included)."""
    dtype = data.draw(st.sampled_from(DTYPES))
    shapes = data.draw(st.lists(SHAPES, min_size=0, max_size=3))
    grads = [data.draw(tensors(s, dtype)) for s in shapes]
    histories = []
    steps = []
    for _ in shapes:
        t = data.draw(st.sampled_from([0.0, 1.0, 50.0, 99.0, 100.0, 250.0, 1e6] * 2 + [-1.0, math.nan, math.inf]))
        h = torch.full((100,), math.inf)
        filled = int(min(max(t, 0.0), 100.0)) if math.isfinite(t) else 0
        h[:filled] = data.draw(tensors((filled,), torch.float32, positive=True))
        histories.append(h)
        steps.append(torch.tensor(t))
    percentile = data.draw(st.sampled_from([1, 5, 50, 99] * 3 + [0, 100]))
    prescale = torch.tensor(data.draw(st.sampled_from([1.0, 0.5, 1e-3, 0.0, 65536.0])))
    ours_h, ref_h = snapshot(histories), snapshot(histories)
    scales, err = run(CPU["percentile_clip"], grads, ours_h, steps, percentile, prescale)
    expected, ref_err = run(REF["percentile_clip"], grads, ref_h, steps, percentile, prescale)
    bad_step = any(not (math.isfinite(float(s)) and float(s) >= 0) for s in steps)
    if same_failure(err, ref_err, reference_checks=not (bad_step and 1 <= percentile <= 99)):
        assert_unchanged(ours_h, histories)
        return
    torch.testing.assert_close(scales, expected, rtol=1e-5, atol=0, equal_nan=True)
    for h, e in zip(ours_h, ref_h):
        torch.testing.assert_close(h, e, rtol=1e-5, atol=0, equal_nan=True)


# -------------------------------------------------------------------------------- norms at the extremes
@pytest.mark.parametrize("scale", [1e-25, 1e19], ids=["tiny", "huge"])
def test_norms_neither_overflow_nor_vanish(scale: float) -> None:
    """Gradient norms (percentile clipping) and update/parameter norms (LAMB's clip) of tensors whose squares
    leave the float32 range: the reference sums in float64 like the C++ kernel, so both agree to rounding,
    relative to the values themselves (a float32 sum would give 0 or inf)."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(300, generator=gen) * scale
    assert math.isfinite(float(reference.l2_norm(g))) and float(reference.l2_norm(g)) > 0
    history = torch.full((100,), math.inf)
    history[:10] = float(reference.l2_norm(g)) * torch.linspace(0.5, 2.0, 10)
    steps = [torch.tensor(10.0)]
    ours_h, ref_h = history.clone(), history.clone()
    ours = CPU["percentile_clip"]([g], [ours_h], steps, 5, torch.tensor(1.0))
    ref = REF["percentile_clip"]([g], [ref_h], steps, 5, torch.tensor(1.0))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert float(ours) < 1.0  # clipped: the norm is above the 5th percentile of the history
    torch.testing.assert_close(ours_h, ref_h, rtol=1e-5, atol=0)
    # LAMB: the update is clipped to max_unorm * ||p||, with ||p|| out of float32's square range
    case = next(c for c in STEP_CASES if c.name == "lamb")
    p = torch.randn(300, generator=gen) * scale
    m, v = torch.zeros(300), torch.zeros(300)
    results = []
    for impl in (CPU, REF):
        pi, mi, vi, si = p.clone(), m.clone(), v.clone(), torch.zeros(())
        impl["step"](int(case.rule), int(case.flags), [pi], [g], [mi, vi], [], [], [si], case.hp_tensor(), None, None)
        results.append(pi)
    assert not torch.equal(results[0], p)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------ Triton
CUDA = torch.cuda.is_available()
#: Set in the interpreter subprocess started by test_triton_kernels_in_subprocess.
TRITON_CHILD = os.environ.get("QOP_TRITON_PROPERTIES_CHILD") == "1"
triton_kernels = pytest.mark.skipif(not (CUDA or TRITON_CHILD), reason="run by test_triton_kernels_in_subprocess")
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.mark.skipif(CUDA or TRITON_CHILD, reason="the Triton kernels run in this process")
def test_triton_kernels_in_subprocess() -> None:
    """The Triton property tests below, under the interpreter in a fresh Python."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", QOP_TRITON_PROPERTIES_CHILD="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        os.path.abspath(__file__),
        "-k",
        "triton_quantize or triton_step",
    ]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _flush_interpreter_subnormals(x: Tensor) -> Tensor:
    """The interpreter's bfloat16 -> float32 conversion flushes subnormals (a GPU's does not): give both
    sides the flushed values."""
    if CUDA or x.dtype != torch.bfloat16:
        return x
    return torch.where(x.float().abs() < torch.finfo(torch.bfloat16).tiny, torch.zeros_like(x), x)


def _on(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(DEVICE)


@triton_kernels
@bounded(8)
@given(data=st.data())
def test_triton_quantize_dequantize_match_reference(data: st.DataObject) -> None:
    """As test_quantize_dequantize_match_reference, with the Triton kernels."""
    from qop.triton import _quant

    dtype = data.draw(st.sampled_from(DTYPES))
    book = data.draw(st.sampled_from(sorted(BOOKS)))
    A = _flush_interpreter_subnormals(data.draw(tensors(data.draw(SHAPES), dtype, positive=book != "signed")))
    blocksize = data.draw(st.sampled_from([256, 256, 7, 2048]))
    code = BOOKS[book].to(DEVICE)
    q, absmax = _quant.quantize_blockwise(A.to(DEVICE), code, blocksize)
    qr, absmax_r = REF["quantize_blockwise"](A, BOOKS[book], blocksize)
    assert torch.equal(q.cpu(), qr)
    torch.testing.assert_close(absmax.cpu(), absmax_r, rtol=0, atol=0, equal_nan=True)
    out_dtype = data.draw(st.sampled_from(DTYPES))
    d = _quant.dequantize_blockwise(q, absmax, code, blocksize, out_dtype)
    torch.testing.assert_close(
        d.cpu(),
        REF["dequantize_blockwise"](qr, absmax_r, BOOKS[book], blocksize, out_dtype),
        rtol=0,
        atol=0,
        equal_nan=True,
    )


@triton_kernels
@pytest.mark.parametrize("bits", [32, 8])
@bounded(6)
@given(data=st.data())
def test_triton_step_matches_reference(bits: int, data: st.DataObject) -> None:
    """As test_step_matches_reference, with the Triton step kernels."""
    from qop.triton import _step

    call = data.draw(step_calls(bits))
    call["params"] = [_flush_interpreter_subnormals(p) for p in call["params"]]
    call["grads"] = [_flush_interpreter_subnormals(g) for g in call["grads"]]
    ours, ref = clone_call(call), clone_call(call)
    dev = dict(
        ours,
        params=[_on(t) for t in ours["params"]],
        grads=[_on(t) for t in ours["grads"]],
        states=[[_on(t) for t in s] for s in ours["states"]],
        absmax=[[_on(t) for t in s] for s in ours["absmax"]],
        steps=[_on(t) for t in ours["steps"]],
        hp=_on(ours["hp"]),
        gscale=_on(ours["gscale"]),
        found_inf=_on(ours["found_inf"]),
        codes=[_on(c) for c in ours["codes"]],
    )
    before = snapshot(written(ours))
    _, err = run(_step.step, *call_args(dev, bits))
    _, ref_err = run(REF["step"], *call_args(ref, bits))
    back = dict(
        dev,
        params=[t.cpu() for t in dev["params"]],
        states=[[t.cpu() for t in s] for s in dev["states"]],
        absmax=[[t.cpu() for t in s] for s in dev["absmax"]],
        steps=[t.cpu() for t in dev["steps"]],
    )
    check_step(bits, back, ref, err, ref_err, before)
