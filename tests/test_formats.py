"""The 4-bit and fp8 state formats of the step op, against SEMANTICS section 5 and the reference.

* the code books (values from the dynamic-map formula, the linear map), the nibble order, the fp8 scale and
  rounding;
* a spec table (every rule the format serves x parameter dtype x shapes with block tails and odd byte counts):
  the C++ kernel against ``qop.reference`` over several steps, codes within one step of the code book;
* ``opcheck``, ``found_inf``, and bad arguments refused with the argument named, changing nothing.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from cases import CASES, LOWBIT_FORMATS, LOWBIT_SHAPES, SR_CASES, lowbit_cases, lowbit_states, op_args
from torch import Tensor

import qop
from qop import reference
from qop._maps import code_book, create_dynamic_map
from qop._schema import FORMAT_RULES, FP8_BLOCKSIZE, FP8_FIRST_ZERO_FREE_STATE, FP8_MIN_ABSMAX, HP, StateFormat

needs_kernels = pytest.mark.skipif(not qop.HAS_CPU_KERNELS, reason="qop C++ CPU kernels not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N_STEPS = 3


# ------------------------------------------------------------------------------------------- formats
def test_signed_4bit_map_is_the_dynamic_map_formula() -> None:
    """3 exponent bits, 4 bits: decades 1e-2, 1e-1, 1 holding 1, 2, 4 bin midpoints of linspace(0.1, 1) per sign."""
    mids = []
    for i, n in enumerate((2, 3, 5)):
        edges = [0.1 + k * 0.9 / (n - 1) for k in range(n)]
        mids += [10.0 ** (i - 2) * (a + b) / 2 for a, b in itertools.pairwise(edges)]
    expected = sorted([*mids, *(-m for m in mids), 0.0, 1.0])
    book = code_book(True, 4)
    assert book.shape == (16,) and book.dtype == torch.float32
    torch.testing.assert_close(book, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    assert torch.equal(book, create_dynamic_map(True, 3, 4))


def test_unsigned_4bit_map_is_linear_without_zero() -> None:
    assert torch.equal(code_book(False, 4), torch.arange(1, 17, dtype=torch.float32) / 16)


def test_nibble_order_element_2i_low() -> None:
    q = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    packed = reference.pack4(q)
    assert packed.tolist() == [0x21, 0x43, 0x05]
    assert torch.equal(reference.unpack4(packed, 5), q)


def test_fp8_scale_and_round_to_nearest_even() -> None:
    x = torch.zeros(FP8_BLOCKSIZE + 3)
    x[0], x[1], x[2] = 448.0, 17.0, -9.0  # absmax 448: scale 1, codes are the values rounded to e4m3fn
    x[FP8_BLOCKSIZE:] = 0.0  # a block of zeros keeps the floor scale
    codes, scale = reference.quantize_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn
    assert scale.tolist() == [1.0, (torch.tensor(1e-12) / 448.0).item()]
    assert codes.float()[:3].tolist() == [448.0, 16.0, -9.0]  # 17 is a tie between 16 and 18: even mantissa
    assert torch.equal(reference.dequantize_fp8(codes, scale)[FP8_BLOCKSIZE:], torch.zeros(3))


def test_fp8_second_moments_are_zero_free() -> None:
    """fp8 states from FP8_FIRST_ZERO_FREE_STATE on keep a positive value below the e4m3fn grid as the smallest
    subnormal (byte 1); zeros stay zero; the first moment rounds to nearest as the format says."""
    x = torch.tensor([448.0, 1e-9, 0.0, 2.0**-10, 2.0**-9])
    first, _ = reference.quantize_state(StateFormat.FP8, x, None, 0)
    second, _ = reference.quantize_state(StateFormat.FP8, x, None, FP8_FIRST_ZERO_FREE_STATE)
    assert first.view(torch.uint8).tolist() == [0x7E, 0, 0, 0, 1]  # 2^-10: a tie between 0 and 2^-9, even
    assert second.view(torch.uint8).tolist() == [0x7E, 1, 0, 1, 1]


class VanishingGradient:
    """Two Adam steps (fp8 states) where most gradients are 1e-4 of the largest one in their block and then 0: their
    second moments sit ~1e-8 below the block's absmax, under e4m3fn's reach, while their first moments do not."""

    def __init__(self, case, device: str = "cpu") -> None:
        n = 512
        self.case = case
        self.params = [torch.zeros(n, device=device)]
        self.states = [[torch.zeros(n, device=device).to(torch.float8_e4m3fn)] for _ in range(case.n_states)]
        floor = FP8_MIN_ABSMAX / 448.0
        self.absmax = [[torch.full((2,), floor, device=device)] for _ in range(case.n_states)]
        self.steps = [torch.zeros((), device=device)]
        self.hp = case.hp_tensor().to(device)
        g = torch.full((n,), 1e-4, device=device)
        g[0] = g[256] = 1.0
        self.grads = [g, torch.zeros(n, device=device)]

    def args(self, grad: Tensor) -> tuple:
        c = self.case
        return op_args(c.rule, c.flags, self.params, [grad], self.states, self.absmax, [], self.steps, self.hp)


def check_vanishing_gradient(run, device: str = "cpu") -> None:
    """``run(args)`` steps like the reference, keeps the small second moments positive, and moves every element by
    a few lr per step at most (a flushed second moment would make it m / eps)."""
    for case in lowbit_cases(StateFormat.FP8):
        ours, theirs = VanishingGradient(case, device), VanishingGradient(case)
        lr = float(ours.hp[HP.LR])
        for step in range(2):
            before = ours.params[0].clone()
            run(ours.args(ours.grads[step]))
            reference.step(*theirs.args(theirs.grads[step]))
            # at most (1 - beta1) / sqrt(1 - beta2) = 3.2 lr (the first step without bias correction)
            assert float((ours.params[0].cpu() - before.cpu()).abs().max()) <= 4 * lr, (case, step)
            for a, e in zip(ours.states, theirs.states):
                assert torch.equal(a[0].cpu().view(torch.uint8), e[0].view(torch.uint8)), (case, step)
            torch.testing.assert_close(ours.params[0].cpu(), theirs.params[0], rtol=1e-5, atol=1e-7)
        for j in range(FP8_FIRST_ZERO_FREE_STATE, case.n_states):
            assert bool((ours.states[j][0].cpu().view(torch.uint8) > 0).all()), case  # never flushed to 0


@needs_kernels
def test_fp8_vanishing_gradients_step_like_the_reference() -> None:
    check_vanishing_gradient(lambda args: qop.ops.step(*args))


def test_4bit_second_moment_never_zero() -> None:
    """The linear book has no zero: a tiny positive second moment stays positive (1/16 of its block's absmax)."""
    x = torch.tensor([1.0, 1e-9, 0.5])
    q, a = reference.quantize_state(StateFormat.BLOCKWISE4, x, code_book(False, 4))
    back = reference.dequantize_state(StateFormat.BLOCKWISE4, q, a, code_book(False, 4), 3)
    assert back.tolist() == [1.0, 0.0625, 0.5]


# ------------------------------------------------------------------------------------- spec table
class Inputs:
    """A step call's tensors in a low-bit format."""

    def __init__(self, case, fmt: StateFormat, dtype: torch.dtype, shapes=LOWBIT_SHAPES, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.case = case
        self.params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        self.states, self.absmax, self.codes = lowbit_states(case, fmt, shapes, gen)
        self.steps = [torch.zeros(()) for _ in shapes]
        self.hp = case.hp_tensor()
        self.gscale = torch.rand(len(shapes), generator=gen) + 0.5

    def clone(self) -> Inputs:
        other = object.__new__(Inputs)
        other.__dict__.update(self.__dict__)
        other.params = [p.clone() for p in self.params]
        other.states = [[s.clone() for s in st] for st in self.states]
        other.absmax = [[a.clone() for a in am] for am in self.absmax]
        other.steps = [s.clone() for s in self.steps]
        return other

    def args(self, grads: list[Tensor], found_inf: Tensor | None = None) -> tuple:
        c = self.case
        return op_args(
            c.rule, c.flags, self.params, grads, self.states, self.absmax, self.codes, self.steps, self.hp,
            self.gscale, found_inf,
        )  # fmt: skip

    def tensors(self) -> list[Tensor]:
        return [*self.params, *(t for s in self.states for t in s), *(t for a in self.absmax for t in a), *self.steps]


def grads_for(params: list[Tensor], step: int) -> list[Tensor]:
    """Random gradients, every fifth element 0 (states that only decay: second moments far below their block's
    absmax stay there)."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=gen) * (1 + step) for p in params]
    for g in grads:
        g.view(-1)[::5] = 0
    return [g.to(p.dtype) for g, p in zip(grads, params)]


def code_distance(a: Tensor, b: Tensor, fmt: StateFormat) -> Tensor:
    """Per element, how many code-book steps apart two states are (fp8: steps of the e4m3fn grid)."""
    if fmt == StateFormat.BLOCKWISE4:
        n = 2 * a.numel()
        return (reference.unpack4(a, n).int() - reference.unpack4(b, n).int()).abs()
    ia, ib = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    # sign-magnitude bytes: ordered integers, negatives mirrored
    oa = torch.where(ia >= 128, 128 - ia, ia)
    ob = torch.where(ib >= 128, 128 - ib, ib)
    return (oa - ob).abs()


def table() -> list:
    return [
        pytest.param(fmt, case, dtype, id=f"{name}-{case}-{str(dtype)[6:]}")
        for name, fmt in LOWBIT_FORMATS.items()
        for case in lowbit_cases(fmt)
        for dtype in DTYPES
    ] + [  # stochastic rounding of bfloat16 params over low-bit states
        pytest.param(fmt, case, torch.bfloat16, id=f"{name}-{case}-sr")
        for name, fmt in LOWBIT_FORMATS.items()
        for case in SR_CASES
        if case.rule in FORMAT_RULES[fmt]
    ]


@needs_kernels
@pytest.mark.parametrize("fmt,case,dtype", table())
def test_kernel_matches_reference(fmt, case, dtype) -> None:
    base = Inputs(case, fmt, dtype)
    ours, ref = base.clone(), base.clone()
    exact = total = 0
    for step in range(N_STEPS):
        grads = grads_for(base.params, step)
        torch.ops.qop.step(*ours.args(grads))
        reference.step(*ref.args(grads))
        for so, sr in zip((s for st in ours.states for s in st), (s for st in ref.states for s in st)):
            d = code_distance(so, sr, fmt)
            assert d.numel() == 0 or int(d.max()) <= 1, "a state more than one code apart"
            exact += int((d == 0).sum())
            total += d.numel()
    assert exact >= 0.999 * total
    for so, sr in zip(ours.steps, ref.steps):
        assert float(so) == float(sr) == N_STEPS
    for po, pr in zip(ours.params, ref.params):
        tol = 1e-5 if exact == total and dtype == torch.float32 else 2e-2
        torch.testing.assert_close(po.float(), pr.float(), rtol=tol, atol=tol)
    for ao, ar in zip((a for am in ours.absmax for a in am), (a for am in ref.absmax for a in am)):
        torch.testing.assert_close(ao, ar, rtol=1e-5 if exact == total else 2e-2, atol=1e-9)


@needs_kernels
@pytest.mark.parametrize("name", LOWBIT_FORMATS)
def test_kernel_is_bit_identical_for_one_or_two_threads(name) -> None:
    fmt = LOWBIT_FORMATS[name]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            inp = Inputs(CASES["adam_amsgrad"], fmt, torch.float32, shapes=[(200, 257), (5,)])
            torch.ops.qop.step(*inp.args(grads_for(inp.params, 0)))
            results.append(inp.tensors())
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("name", LOWBIT_FORMATS)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_found_inf_changes_nothing(name, impl) -> None:
    inp = Inputs(CASES["adam_amsgrad"], LOWBIT_FORMATS[name], torch.bfloat16)
    before = [t.clone() for t in inp.tensors()]
    op = torch.ops.qop.step if impl == "op" else reference.step
    op(*inp.args(grads_for(inp.params, 0), torch.tensor(float("inf"))))
    for a, b in zip(inp.tensors(), before):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("name", LOWBIT_FORMATS)
def test_opcheck(name) -> None:
    fmt = LOWBIT_FORMATS[name]
    # torch's schema check compares tensors with allclose, which has no float8 kernel: the mutation annotations
    # are the op's own (checked with every other format), the other checks run on fp8 too
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if fmt != StateFormat.FP8:
        utils = ("test_schema", *utils)
    for case in (CASES["adam"], CASES["lamb"], *(c for c in lowbit_cases(fmt) if c.name in ("lion", "ademamix"))):
        inp = Inputs(case, fmt, torch.bfloat16, shapes=[(0,), (3,), (257,)])
        torch.library.opcheck(torch.ops.qop.step.default, inp.args(grads_for(inp.params, 0)), test_utils=utils)


# ------------------------------------------------------------------------------------- bad arguments
def _bad(name: str):
    """(format, mutate(inputs), message) of each refusal."""
    cases = {
        "4bit-unpacked-state": (
            "4bit",
            lambda i: i.states[0].__setitem__(2, torch.zeros(257, dtype=torch.uint8)),
            r"states\[2\].*129 in blockwise4",
        ),
        "4bit-book-size": ("4bit", lambda i: i.codes.__setitem__(0, torch.zeros(100)), r"codes\[0\] has 100 entries"),
        "4bit-absmax": ("4bit", lambda i: i.absmax[1].__setitem__(2, torch.zeros(2)), r"absmax\[5\].*3 entries"),
        "fp8-codes": ("fp8", lambda i: i.codes.extend([torch.zeros(16)] * 2), r"codes has 2 tensors but fp8"),
        "fp8-scales": ("fp8", lambda i: i.absmax[0].__setitem__(2, torch.zeros(1)), r"absmax\[2\].*2 entries"),
    }
    return cases[name]


@pytest.mark.parametrize("impl", ["op", "reference-checks"])
@pytest.mark.parametrize("name", ["4bit-unpacked-state", "4bit-book-size", "4bit-absmax", "fp8-codes", "fp8-scales"])
def test_bad_arguments_are_refused_and_change_nothing(name, impl) -> None:
    fmt_name, mutate, msg = _bad(name)
    inp = Inputs(CASES["adam"], LOWBIT_FORMATS[fmt_name], torch.float32, shapes=[(3,), (100,), (257,)])
    mutate(inp)
    before = [t.clone() for t in inp.tensors()]
    args = inp.args(grads_for(inp.params, 0))
    # the C++ checks raise ValueError; the shared Python ones torch._check's RuntimeError
    with pytest.raises(ValueError if impl == "op" else RuntimeError, match=msg):
        if impl == "op":
            torch.ops.qop.step(*args)
        else:
            qop._checks.check_step(*args)
    for a, b in zip(inp.tensors(), before):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("impl", ["op", "reference-checks"])
def test_fp8_refuses_rules_it_does_not_serve(impl) -> None:
    inp = Inputs(CASES["adam"], StateFormat.FP8, torch.float32, shapes=[(300,)])
    lion = CASES["lion"]
    args = op_args(
        lion.rule, lion.flags, inp.params, grads_for(inp.params, 0), inp.states[:1], inp.absmax[:1], [], inp.steps,
        inp.hp,
    )  # fmt: skip
    with pytest.raises(ValueError if impl == "op" else RuntimeError, match=r"fp8 states serve rules \[1\], not rule 5"):
        if impl == "op":
            torch.ops.qop.step(*args)
        else:
            qop._checks.check_step(*args)
