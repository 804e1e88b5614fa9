"""The ops of the ``qop`` namespace against their contract, on the CPU.

One spec table of sample inputs (``STEP_CASES`` x ``SHAPES`` x ``DTYPES``, plus the quantizer samples)
drives:

* ``torch.library.opcheck`` on every op under ``torch.ops.qop`` (schema/mutation, autograd registration,
  fake tensors, AOT dispatch), each check on freshly built inputs since the step ops mutate theirs;
* the C++ kernels against ``qop.reference`` over several steps (skipped when ``qop.HAS_CPU_KERNELS`` is
  False, where the reference *is* the CPU kernel): 32-bit to float32 rounding (one ulp of bf16/fp16
  parameters), 16-bit (bfloat16) states within one bfloat16 ulp, 8-bit codes within one code index,
  quantize/dequantize exactly;
* ``found_inf`` leaving everything bit-identical;
* bad arguments raising ``ValueError`` that names the argument.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from cases import BASE_HP, CASES, SIGNED, SR_CASES, STEP_CASES, StepCase, op_args  # noqa: F401
from torch import Tensor

import qop
from qop import BLOCKSIZE, HP, Flag, Rule, reference
from qop._schema import ALL_FLAGS, SCHEMAS

needs_kernels = pytest.mark.skipif(not qop.HAS_CPU_KERNELS, reason="qop C++ CPU kernels not built")

SHAPES = [(0,), (1,), (255,), (256,), (257,), (1000,), (4097,), (33, 65)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N_STEPS = 3


# ------------------------------------------------------------------------------------ sample inputs
@dataclasses.dataclass
class StepInputs:
    """Everything a step op takes; ``args()`` lays it out in schema order."""

    case: StepCase
    bits: int
    params: list[Tensor]
    states: list[list[Tensor]]
    absmax: list[list[Tensor]]
    steps: list[Tensor]
    hp: Tensor
    codes: list[Tensor]
    gscale: Tensor | None = None
    found_inf: Tensor | None = None
    unorm: Tensor | None = None

    def clone(self) -> StepInputs:
        def c(ts):
            return [t.clone() for t in ts]

        return dataclasses.replace(
            self,
            params=c(self.params),
            states=[c(s) for s in self.states],
            absmax=[c(a) for a in self.absmax],
            steps=c(self.steps),
            hp=self.hp.clone(),
            gscale=None if self.gscale is None else self.gscale.clone(),
            found_inf=None if self.found_inf is None else self.found_inf.clone(),
            unorm=None if self.unorm is None else self.unorm.clone(),
        )

    def args(self, grads: list[Tensor]) -> tuple:
        codes = self.codes[: self.case.n_states] if self.bits == 8 else []
        return op_args(
            self.case.rule,
            self.case.flags,
            self.params,
            grads,
            self.states,
            self.absmax,
            codes,
            self.steps,
            self.hp,
            self.gscale,
            self.found_inf,
            self.unorm,
        )

    def tensors(self) -> list[Tensor]:
        """Every tensor the op may write."""
        return [*self.params, *(t for s in self.states for t in s), *(t for a in self.absmax for t in a), *self.steps]


def dynamic_map(signed: bool) -> Tensor:
    return qop.dynamic_map(signed=signed)


def make_inputs(
    case: StepCase,
    dtype: torch.dtype,
    bits: int,
    shapes=SHAPES,
    seed: int = 0,
    gscale: bool = False,
    found_inf: float | None = None,
) -> StepInputs:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    signed = SIGNED[case.rule][: case.n_states]
    raw = []
    for sg in signed:
        per_param = []
        for s in shapes:
            x = torch.randn(s, generator=gen) * 0.1 if sg else torch.rand(s, generator=gen) * 1e-2
            if x.numel() >= 2 * BLOCKSIZE:  # one all-zero block: absmax 0
                x.view(-1)[BLOCKSIZE : 2 * BLOCKSIZE] = 0
            per_param.append(x)
        raw.append(per_param)
    codes = [dynamic_map(sg) for sg in signed] + [dynamic_map(True)] * (3 - len(signed))
    states, absmax = raw, []
    if bits == 16:
        states = [[x.to(torch.bfloat16) for x in per_param] for per_param in raw]
    if bits == 8:
        states, absmax = [], []
        for j, per_param in enumerate(raw):
            qa = [torch.ops.qop.quantize_blockwise(x, codes[j], BLOCKSIZE) for x in per_param]
            states.append([q for q, _ in qa])
            absmax.append([a for _, a in qa])
    return StepInputs(
        case=case,
        bits=bits,
        params=params,
        states=states,
        absmax=absmax,
        steps=[torch.zeros(()) for _ in shapes],
        hp=case.hp_tensor(),
        codes=codes,
        gscale=(torch.rand(len(shapes), generator=gen) + 0.5) if gscale else None,
        found_inf=None if found_inf is None else torch.tensor(found_inf),
    )


def make_grads(params: list[Tensor], step: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    grads = []
    for p in params:
        g = (torch.randn(p.shape, generator=gen) * (1 + step)).to(p.dtype)
        if g.numel() >= 2 * BLOCKSIZE:
            g.view(-1)[BLOCKSIZE : 2 * BLOCKSIZE] = 0
        grads.append(g)
    return grads


def update_sums(inp: StepInputs, grads: list[Tensor]) -> Tensor:
    """Per tensor, the squared norms of its update and of itself (what the ``unorm`` input carries)."""
    case, rows = inp.case, []
    for i, (p, g) in enumerate(zip(inp.params, grads)):
        states = [
            reference.dequantize_blockwise(
                inp.states[j][i], inp.absmax[j][i], inp.codes[j], BLOCKSIZE, torch.float32
            ).reshape(-1)
            if inp.bits == 8
            else inp.states[j][i].reshape(-1).float()
            for j in range(case.n_states)
        ]
        gf = g.float().reshape(-1) * (1.0 if inp.gscale is None else inp.gscale[i])
        pf = p.float().reshape(-1)
        _, u, _, _ = reference.rule_update(
            case.rule, case.flags & ~Flag.UNORM_CLIP, pf, gf, states, inp.steps[i] + 1, inp.hp
        )
        rows.append(torch.stack([u.square().sum(), pf.square().sum()]))
    return torch.stack(rows).float() if rows else torch.zeros(0, 2)


def step_op(bits: int):
    """The op (one for every state format: ``bits`` only says which inputs the caller built)."""
    return torch.ops.qop.step.default


def step_reference(bits: int):
    return reference.step


# ------------------------------------------------------------------------------ percentile clipping
@dataclasses.dataclass
class ClipInputs:
    """Arguments of ``qop::percentile_clip``: gradients of odd sizes, partly filled histories."""

    grads: list[Tensor]
    histories: list[Tensor]
    steps: list[Tensor]
    prescale: Tensor

    def clone(self) -> ClipInputs:
        return ClipInputs(
            self.grads, [h.clone() for h in self.histories], [s.clone() for s in self.steps], self.prescale
        )


def make_clip_inputs(
    dtype: torch.dtype,
    seed: int,
    shapes=((0,), (1,), (257,), (33, 65), (70000,)),
    steps=(0, 3, 99, 100, 250),
    prescale: float = 0.5,
) -> ClipInputs:
    gen = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(s, generator=gen) * 10 ** torch.randint(-3, 3, (), generator=gen)).to(dtype) for s in shapes]
    histories = []
    for t in steps:  # the first min(t, 100) slots filled, as after t steps
        h = torch.full((100,), math.inf)
        filled = min(t, 100)
        h[:filled] = torch.rand(filled, generator=gen) * 50
        histories.append(h)
    return ClipInputs(grads, histories, [torch.tensor(float(t)) for t in steps], torch.tensor(prescale))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("percentile", [1, 5, 50, 99])
def test_percentile_clip_matches_reference(dtype, percentile):
    """Several calls in a row: the recorded norms and the clip factors agree with the reference (both sum
    squares in double, in different orders: to float rounding of the norm)."""
    got = make_clip_inputs(dtype, seed=percentile)
    want = got.clone()
    for call in range(3):
        scales = torch.ops.qop.percentile_clip(got.grads, got.histories, got.steps, percentile, got.prescale)
        expected = reference.percentile_clip(want.grads, want.histories, want.steps, percentile, want.prescale)
        torch.testing.assert_close(scales, expected, rtol=1e-5, atol=0)
        for h, e in zip(got.histories, want.histories):
            torch.testing.assert_close(h, e, rtol=1e-5, atol=0)
        assert ((scales > 0) & (scales <= got.prescale)).all()
        for st in (got.steps, want.steps):
            for s in st:
                s.add_(1)
        got.grads = want.grads = [g * (3.0 if call % 2 == 0 else 0.1) for g in got.grads]


@needs_kernels
def test_percentile_clip_clips_outliers_only():
    """After 100 steps of norm ~1, a gradient 10x larger is scaled to the 5th percentile; a typical one is not."""
    g = torch.ones(400) / 20  # norm 1
    history = torch.full((100,), math.inf)
    step = torch.tensor(0.0)
    pre = torch.tensor(1.0)
    for _ in range(100):
        assert torch.ops.qop.percentile_clip([g], [history], [step], 5, pre).item() == 1.0
        step.add_(1)
    assert torch.isfinite(history).all()
    scale = torch.ops.qop.percentile_clip([g * 10], [history], [step], 5, pre)
    torch.testing.assert_close(scale, torch.tensor([0.1]))


def _clip_errors():
    def call(**change):
        clip = make_clip_inputs(torch.float32, seed=0)
        args = dict(grads=clip.grads, gnorm_vecs=clip.histories, steps=clip.steps, percentile=5, prescale=clip.prescale)
        args.update({k: v(args[k]) for k, v in change.items()})
        return lambda: torch.ops.qop.percentile_clip(*args.values())

    return [
        ("percentile_100", call(percentile=lambda k: 100), "percentile"),
        ("percentile_0", call(percentile=lambda k: 0), "percentile"),
        ("history_size", call(gnorm_vecs=lambda h: [h[0][:50].clone(), *h[1:]]), r"gnorm_vecs\[0\]"),
        ("history_dtype", call(gnorm_vecs=lambda h: [h[0], h[1].double(), *h[2:]]), r"gnorm_vecs\[1\]"),
        ("histories_length", call(gnorm_vecs=lambda h: h[:2]), "gnorm_vecs"),
        ("steps_length", call(steps=lambda s: s[:1]), "steps"),
        ("steps_dtype", call(steps=lambda s: [s[0].long(), *s[1:]]), r"steps\[0\]"),
        ("grad_dtype", call(grads=lambda g: [g[0], g[1], g[2].double(), *g[3:]]), r"grads\[2\]"),
        ("grad_sparse", call(grads=lambda g: [g[0], g[1], g[2].to_sparse(), *g[3:]]), r"grads\[2\]"),
        ("grad_non_contiguous", call(grads=lambda g: [*g[:3], g[3].t(), g[4]]), r"grads\[3\]"),
        ("prescale_dtype", call(prescale=lambda p: p.double()), "prescale"),
        ("step_nan", call(steps=lambda s: [torch.tensor(math.nan), *s[1:]]), r"steps\[0\]"),
    ]


CLIP_ERRORS = _clip_errors()


@needs_kernels
@pytest.mark.parametrize("name,call,msg", CLIP_ERRORS, ids=[e[0] for e in CLIP_ERRORS])
def test_percentile_clip_rejects_bad_arguments(name, call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


@needs_kernels
def test_percentile_clip_bad_step_changes_nothing():
    clip = make_clip_inputs(torch.float32, seed=1)
    clip.steps[-1] = torch.tensor(math.inf)
    before = [h.clone() for h in clip.histories]
    with pytest.raises(ValueError, match=r"steps\[4\]"):
        torch.ops.qop.percentile_clip(clip.grads, clip.histories, clip.steps, 5, clip.prescale)
    assert all(torch.equal(h, b) for h, b in zip(clip.histories, before))


# ------------------------------------------------------------------------------------------ opcheck
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _quantize_samples():
    code = dynamic_map(True)
    for i, (shape, dtype) in enumerate([((0,), torch.float32), ((257,), torch.bfloat16), ((33, 65), torch.float16)]):
        A = torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        op = torch.ops.qop.quantize_blockwise.default
        yield f"quantize_{dtype}_{shape}", op, (lambda A=A: (A.clone(), code, 256))


def _dequantize_samples():
    code = dynamic_map(False)
    for shape, dtype, bs in [((0,), torch.float32, 256), ((1000,), torch.bfloat16, 256), ((33, 65), torch.float16, 64)]:
        A = torch.rand(shape)
        q, a = reference.quantize_blockwise(A, code, bs)
        yield (
            f"dequantize_{dtype}_{shape}",
            torch.ops.qop.dequantize_blockwise.default,
            (lambda q=q, a=a, bs=bs, dtype=dtype: (q.clone(), a.clone(), code, bs, dtype)),
        )


def _step_samples():
    # the op signatures differ only by state count (0..3), dtype, gscale/found_inf presence and flags
    picks = [
        ("adam", torch.float32),
        ("lamb_l2_nobc_amsgrad", torch.bfloat16),
        ("sgd_nesterov", torch.float16),
        ("sgd_no_momentum", torch.float32),
        ("ademamix_schedules", torch.bfloat16),
    ]
    for i, (name, dtype) in enumerate(picks):
        for bits in (32, 16, 8):
            case = CASES[name]

            def build(case=case, dtype=dtype, bits=bits, i=i):
                inp = make_inputs(
                    case,
                    dtype,
                    bits,
                    shapes=[(0,), (257,), (33, 65)],
                    seed=i,
                    gscale=i % 2 == 0,
                    found_inf=0.0 if i % 3 == 0 else None,
                )
                return inp.args(make_grads(inp.params, 0))

            yield f"step_{bits}bit_{name}_{dtype}", step_op(bits), build
    for bits in (32, 16):  # stochastic rounding of bfloat16 params
        sr = next(c for c in SR_CASES if c.name == "adam_sr")

        def build_sr(bits=bits, sr=sr):
            inp = make_inputs(sr, torch.bfloat16, bits, shapes=[(0,), (257,), (33, 65)], seed=11, gscale=True)
            return inp.args(make_grads(inp.params, 0))

        yield f"step_{bits}bit_adam_sr_bf16", step_op(bits), build_sr
    for bits in (32, 8):  # with the squared norms of a whole parameter handed in

        def build_unorm(bits=bits):
            inp = make_inputs(CASES["lamb"], torch.float32, bits, shapes=[(0,), (257,), (33, 65)], seed=7)
            grads = make_grads(inp.params, 0)
            inp.unorm = update_sums(inp, grads)
            return inp.args(grads)

        yield f"step_{bits}bit_lamb_unorm", step_op(bits), build_unorm


def _percentile_samples():
    for i, dtype in enumerate(DTYPES):

        def build(dtype=dtype, i=i):
            clip = make_clip_inputs(dtype, seed=i)
            return clip.grads, clip.histories, clip.steps, 5 + 40 * i, clip.prescale

        yield f"percentile_clip_{dtype}", torch.ops.qop.percentile_clip.default, build


OPCHECK_SAMPLES = [*_quantize_samples(), *_dequantize_samples(), *_step_samples(), *_percentile_samples()]


def test_opcheck_covers_every_op():
    covered = {op.name().split("::")[1] for _, op, _ in OPCHECK_SAMPLES}
    assert covered == set(SCHEMAS)


@pytest.mark.parametrize("name,op,build", OPCHECK_SAMPLES, ids=[s[0] for s in OPCHECK_SAMPLES])
def test_opcheck(name, op, build):
    for util in OPCHECK_UTILS:  # fresh inputs for each check: the step ops mutate theirs
        torch.library.opcheck(op, build(), test_utils=util)


# ------------------------------------------------------------------------------- kernel vs reference
def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of ``dtype`` numbers at |x| (x in float32)."""
    info = torch.finfo(dtype)
    mag = x.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def assert_params_close(actual: Tensor, expected: Tensor, loose: bool = False) -> None:
    if loose:  # an 8-bit code one index away at an earlier step moves the parameter by a bit more
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-3, atol=1e-3)
    elif actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        diff = (actual.float() - expected.float()).abs()
        bound = ulp(torch.maximum(actual.float().abs(), expected.float().abs()), actual.dtype)
        assert bool((diff <= bound).all()), f"max diff {diff.max()} beyond one {actual.dtype} ulp"


def run_both(case: StepCase, dtype: torch.dtype, bits: int, shapes=SHAPES, gscale: bool = True):
    base = make_inputs(case, dtype, bits, shapes=shapes, gscale=gscale)
    ours, ref = base.clone(), base.clone()
    codes_equal = True
    for step in range(N_STEPS):
        grads = make_grads(base.params, step)
        step_op(bits)(*ours.args(grads))
        step_reference(bits)(*ref.args(grads))
        if bits == 8:
            for j in range(case.n_states):
                for qo, qr in zip(ours.states[j], ref.states[j]):
                    d = (qo.int() - qr.int()).abs()
                    assert d.numel() == 0 or int(d.max()) <= 1, f"state{j + 1} more than one code apart"
                    codes_equal = codes_equal and not bool(d.any())
    return ours, ref, codes_equal


@needs_kernels
@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", STEP_CASES, ids=str)
def test_step_matches_reference(case, dtype, bits):
    ours, ref, codes_equal = run_both(case, dtype, bits)
    for so, sr in zip(ours.steps, ref.steps):
        assert torch.equal(so, sr) and float(so) == N_STEPS
    for po, pr in zip(ours.params, ref.params):
        assert_params_close(po, pr, loose=not codes_equal)
    if bits == 32:
        rtol = 1e-5 if dtype == torch.float32 else 1e-3
        for j in range(case.n_states):
            for so, sr in zip(ours.states[j], ref.states[j]):
                torch.testing.assert_close(so, sr, rtol=rtol, atol=1e-6)
    elif bits == 16:  # float32 math rounded to nearest-even once per step: one bfloat16 ulp at most
        for j in range(case.n_states):
            for so, sr in zip(ours.states[j], ref.states[j]):
                assert so.dtype == torch.bfloat16
                assert_params_close(so, sr, loose=dtype != torch.float32)
    else:
        exact = sum(
            int((qo == qr).sum()) for j in range(case.n_states) for qo, qr in zip(ours.states[j], ref.states[j])
        )
        total = sum(q.numel() for s in ref.states for q in s)
        assert exact >= 0.999 * total
        for j in range(case.n_states):
            for ao, ar in zip(ours.absmax[j], ref.absmax[j]):
                torch.testing.assert_close(ao, ar, rtol=1e-5 if codes_equal else 1e-2, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("case", ["adam", "lamb", "lars", "sgd_no_momentum"])
def test_parallel_matches_reference_and_thread_count(case, bits):
    """A call large enough for the OpenMP path: same as the reference, bit-identical for 1 or 2 threads."""
    shapes = [(200, 257), (5,)]  # over the kernels' serial threshold of 32K elements
    ours, ref, codes_equal = run_both(CASES[case], torch.float32, bits, shapes=shapes)
    for po, pr in zip(ours.params, ref.params):
        assert_params_close(po, pr, loose=not codes_equal)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            inp = make_inputs(CASES[case], torch.float32, bits, shapes=shapes, gscale=True)
            step_op(bits)(*inp.args(make_grads(inp.params, 0)))
            results.append(inp.tensors())
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("case", ["lamb", "lars"])
def test_unorm_pieces_step_like_the_whole(case, bits, impl):
    """A tensor stepped as two pieces (cut on a block boundary), with the squared norms of the whole handed in
    through ``unorm``, is stepped as the whole is: what a parameter sharded across ranks relies on."""
    op = step_op(bits) if impl == "kernel" else step_reference(bits)
    whole = make_inputs(CASES[case], torch.float32, bits, shapes=[(1000,)], gscale=True)
    grads = make_grads(whole.params, 0)
    sums = update_sums(whole, grads)
    assert float(sums[0, 0]) > 0.02**2 * float(sums[0, 1])  # the clip is active
    cut = 2 * BLOCKSIZE
    pieces = whole.clone()
    pieces.params = [whole.params[0][:cut].clone(), whole.params[0][cut:].clone()]
    pieces.states = [[s[0][:cut].clone(), s[0][cut:].clone()] for s in whole.states]
    pieces.absmax = [[a[0][:2].clone(), a[0][2:].clone()] for a in whole.absmax]
    pieces.steps = [whole.steps[0].clone(), whole.steps[0].clone()]
    pieces.gscale = whole.gscale.expand(2).clone()
    pieces.unorm = sums.expand(2, 2).clone()
    alone = pieces.clone()
    alone.unorm = None
    op(*whole.args(grads))
    op(*pieces.args([grads[0][:cut], grads[0][cut:]]))
    op(*alone.args([grads[0][:cut], grads[0][cut:]]))
    joined = torch.cat(pieces.params)
    torch.testing.assert_close(joined, whole.params[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(torch.cat(alone.params), whole.params[0], rtol=1e-5, atol=1e-6)  # norms matter
    for j in range(CASES[case].n_states):
        got = torch.cat(pieces.states[j])
        if bits == 32:
            torch.testing.assert_close(got, whole.states[j][0], rtol=1e-5, atol=1e-7)
        else:
            assert int((got.int() - whole.states[j][0].int()).abs().max()) <= 1
    assert all(float(s) == 1 for s in pieces.steps)


# ------------------------------------------------------------------------------------------ found_inf
@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("case", ["adam_amsgrad", "lamb", "sgd", "lion", "ademamix"])
@pytest.mark.parametrize("value", [1.0, float("inf"), float("nan")], ids=["one", "inf", "nan"])
def test_found_inf_changes_nothing(case, bits, value):
    inp = make_inputs(CASES[case], torch.bfloat16, bits, gscale=True, found_inf=value)
    before = [t.clone() for t in inp.tensors()]
    step_op(bits)(*inp.args(make_grads(inp.params, 0)))
    for a, b in zip(inp.tensors(), before):
        assert a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("bits", [32, 8])
def test_found_inf_zero_steps(bits):
    inp = make_inputs(CASES["adam"], torch.float32, bits, found_inf=0.0)
    before = [p.clone() for p in inp.params]
    step_op(bits)(*inp.args(make_grads(inp.params, 0)))
    assert all(float(s) == 1.0 for s in inp.steps)
    assert not torch.equal(inp.params[-1], before[-1])


# ----------------------------------------------------------------------------------------- quantizer
def _quantizer_inputs():
    gen = torch.Generator().manual_seed(3)
    for signed in (True, False):
        code = dynamic_map(signed)
        mids = 0.5 * (code[:-1] + code[1:])
        up, down = torch.tensor(2.0), torch.tensor(-2.0)
        # every midpoint, its float neighbours and every code value, in blocks whose absmax is 1
        edges = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down), code, torch.ones(1)])
        yield f"midpoints_signed={signed}", edges if signed else edges.abs(), code
        scales = 10.0 ** torch.randint(-12, 4, (8192,), generator=gen).float()
        x = torch.randn(8192, generator=gen) * scales
        x[:256] = 0
        x[1000:1100] = 1e-30
        yield f"random_signed={signed}", x if signed else x.abs(), code
    magnitudes = 10.0 ** torch.randint(-8, 1, (256,), generator=gen)
    sorted_book = torch.sort(torch.randn(256, generator=gen) * magnitudes).values
    yield "sorted_random_book", torch.randn(5000, generator=gen), sorted_book
    with_dups = torch.sort(torch.cat([torch.randn(200, generator=gen), torch.zeros(56)])).values
    yield "duplicate_entries", torch.randn(5000, generator=gen), with_dups
    yield "unsorted_book", torch.randn(5000, generator=gen), torch.randn(256, generator=gen)
    special = torch.randn(3000, generator=gen)
    special[5], special[300], special[700], special[1200] = float("nan"), float("inf"), -float("inf"), -0.0
    yield "nan_inf", special, dynamic_map(True)
    yield "tiny_positive_unsigned", tiny_positive_blocks(), dynamic_map(False)


def tiny_positive_blocks() -> Tensor:
    """Blocks with absmax 1, 1e4 and 1e30 holding positive values far below the unsigned map's first
    midpoint (down to the smallest subnormal), zeros and -0.0: their nearest code is 0."""
    tiny = torch.tensor([1.6e-7, 1e-7, 1e-8, 1e-20, 1e-30, 1e-38, 1e-40, 1e-45, 0.0, -0.0])
    gen = torch.Generator().manual_seed(4)
    blocks = []
    for top in (1.0, 1e4, 1e30):
        block = torch.zeros(256)
        block[0] = top
        block[1 : 1 + 20 * tiny.numel()] = tiny.repeat(20) * torch.rand(20 * tiny.numel(), generator=gen).add(1)
        blocks.append(block)
    return torch.cat(blocks)


QUANTIZER_INPUTS = list(_quantizer_inputs())


def _quantizers():
    yield "reference", reference.quantize_blockwise
    if qop.HAS_CPU_KERNELS:
        yield "cpu", torch.ops.qop.quantize_blockwise


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,quantize", list(_quantizers()), ids=[n for n, _ in _quantizers()])
def test_unsigned_map_positive_never_code_zero(name, quantize, dtype):
    """SEMANTICS.md section 1: a positive value quantized with the unsigned map takes at least the smallest
    positive code (index 1), even where x / absmax underflows; zeros stay code 0, a zero block has absmax 0."""
    A = torch.cat([tiny_positive_blocks(), torch.zeros(300)]).to(dtype)
    code = dynamic_map(False)
    q, absmax = quantize(A, code, BLOCKSIZE)
    assert bool((A > 0).any())
    assert bool((q[A > 0] == 1).any()), "no value near the floor: the test would not see the rule"
    assert bool((q[A > 0] >= 1).all()) and bool((q[A == 0] == 0).all())
    assert float(absmax[-1]) == 0.0
    d = torch.ops.qop.dequantize_blockwise(q, absmax, code, BLOCKSIZE, torch.float32)
    assert bool((d[-300:] == 0).all())  # zeros, not NaN
    # the signed map has no floor: the same tiny values round to its zero (index 127)
    qs, _ = quantize(A, dynamic_map(True), BLOCKSIZE)
    assert bool((qs[(A > 0) & (A.float() < 1e-30)] == 127).all())


def _vanishing_gradient_move(step, rule: Rule) -> float:
    """Two 8-bit steps (lr 1e-3) on one 256-block: gradient 1.0 on element 0 and 1e-4 on element 1, then 0
    on element 1.  Returns how far the second step moves element 1: with its second moment rounded to
    code 0 it would be m / eps (~4.2)."""
    case = CASES["ademamix" if rule == Rule.ADEMAMIX else "adam"]
    hp = case.hp_tensor()
    hp[HP.LR], hp[HP.WEIGHT_DECAY] = 1e-3, 0.0
    signed = SIGNED[rule][: case.n_states]
    codes = [dynamic_map(sg) for sg in signed]
    p = torch.zeros(256)
    states = [[torch.zeros(256, dtype=torch.uint8)] for _ in signed]
    absmax = [[torch.zeros(1)] for _ in signed]
    steps = [torch.zeros(())]
    moves = []
    for g1 in (1e-4, 0.0):
        g = torch.zeros(256)
        g[0], g[1] = 1.0, g1
        before = float(p[1])
        step(*op_args(rule, 0, [p], [g], states, absmax, codes, steps, hp))
        moves.append(abs(float(p[1]) - before))
    return moves[1]


def _step_impls():
    yield "reference", reference.step
    if qop.HAS_CPU_KERNELS:
        yield "cpu", torch.ops.qop.step.default


@pytest.mark.parametrize("rule", [Rule.ADAM, Rule.ADEMAMIX], ids=["adam", "ademamix"])
@pytest.mark.parametrize("name,step", list(_step_impls()), ids=[n for n, _ in _step_impls()])
def test_vanishing_gradient_moves_by_lr(name, step, rule):
    """A gradient that vanishes after being 1e-4 of its block's largest keeps v above code 0: the element
    moves by about lr (here ~0.1 lr), never by m / eps."""
    assert _vanishing_gradient_move(step, rule) < 10 * 1e-3


@needs_kernels
@pytest.mark.parametrize("blocksize", [256, 64, 100, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,x,code", QUANTIZER_INPUTS, ids=[s[0] for s in QUANTIZER_INPUTS])
def test_quantize_matches_reference_exactly(name, x, code, dtype, blocksize):
    A = x.to(dtype)
    q, a = torch.ops.qop.quantize_blockwise(A, code, blocksize)
    qr, ar = reference.quantize_blockwise(A, code, blocksize)
    assert q.dtype == torch.uint8 and q.shape == A.shape
    assert torch.equal(q, qr)
    torch.testing.assert_close(a, ar, rtol=0, atol=0, equal_nan=True)
    for out_dtype in DTYPES:
        d = torch.ops.qop.dequantize_blockwise(q, a, code, blocksize, out_dtype)
        dr = reference.dequantize_blockwise(q, a, code, blocksize, out_dtype)
        torch.testing.assert_close(d, dr, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_roundtrip_shapes(shape):
    code = dynamic_map(True)
    A = torch.randn(shape)
    q, a = torch.ops.qop.quantize_blockwise(A, code, BLOCKSIZE)
    assert q.shape == A.shape and a.shape == (math.ceil(A.numel() / BLOCKSIZE),)
    d = torch.ops.qop.dequantize_blockwise(q, a, code, BLOCKSIZE, torch.float32)
    assert d.shape == A.shape
    if A.numel():
        err = (d - A).abs().view(-1)
        bound = a.repeat_interleave(BLOCKSIZE)[: A.numel()] * 0.08  # half the widest gap of the signed map
        assert bool((err <= bound).all())


# ------------------------------------------------------------------------------------ argument errors
def _valid(bits: int) -> StepInputs:
    return make_inputs(CASES["adam"], torch.float32, bits, shapes=[(300,), (4, 8)])


def _set(inp: StepInputs, **changes) -> StepInputs:
    return dataclasses.replace(inp, **changes)


def _step_errors():
    """(name, bits, mutate(inp, grads) -> (inp, grads), message regex)."""

    def p0(fn):
        return lambda inp, grads: (_set(inp, params=[fn(inp.params[0]), *inp.params[1:]]), grads)

    def g0(fn):
        return lambda inp, grads: (inp, [fn(grads[0]), *grads[1:]])

    def state0(fn):
        def mutate(inp, grads):
            states = [list(s) for s in inp.states]
            states[0][0] = fn(states[0][0])
            return _set(inp, states=states), grads

        return mutate

    cases = [
        ("int_params", p0(lambda p: p.to(torch.int32)), r"params\[0\]"),
        ("complex_params", p0(lambda p: p.to(torch.complex64)), r"params\[0\]"),
        (
            "mixed_dtypes",
            lambda inp, grads: (
                _set(inp, params=[inp.params[0], inp.params[1].bfloat16()]),
                [grads[0], grads[1].bfloat16()],
            ),
            r"params\[1\]",
        ),
        (
            "non_contiguous_params",
            lambda inp, grads: (_set(inp, params=[inp.params[0], inp.params[1].t().contiguous().t()]), grads),
            r"params\[1\]",
        ),
        ("sparse_grad", g0(lambda g: g.to_sparse()), r"grads\[0\]"),
        ("grad_shape", g0(lambda g: g[:-1].clone()), r"grads\[0\]"),
        ("grad_dtype", g0(lambda g: g.double()), r"grads\[0\]"),
        ("grads_length", lambda inp, grads: (inp, grads[:1]), r"grads"),
        (
            "steps_dtype",
            lambda inp, grads: (_set(inp, steps=[inp.steps[0].double(), inp.steps[1]]), grads),
            r"steps\[0\]",
        ),
        ("hp_size", lambda inp, grads: (_set(inp, hp=inp.hp[:5].clone()), grads), r"\bhp\b"),
        ("hp_dtype", lambda inp, grads: (_set(inp, hp=inp.hp.double()), grads), r"\bhp\b"),
        ("gscale_size", lambda inp, grads: (_set(inp, gscale=torch.ones(5)), grads), r"gscale"),
        ("found_inf_shape", lambda inp, grads: (_set(inp, found_inf=torch.zeros(2)), grads), r"found_inf"),
        (
            "found_inf_dtype",
            lambda inp, grads: (_set(inp, found_inf=torch.zeros((), dtype=torch.int32)), grads),
            r"found_inf",
        ),
        ("unorm_shape", lambda inp, grads: (_set(inp, unorm=torch.zeros(2)), grads), r"unorm"),
        ("unorm_dtype", lambda inp, grads: (_set(inp, unorm=torch.zeros(2, 2, dtype=torch.float64)), grads), r"unorm"),
        (
            "state_count",
            lambda inp, grads: (_set(inp, states=[inp.states[0][:1], inp.states[1]]), grads),
            r"\bstates\b",
        ),
        ("state_numel", state0(lambda s: s[:-1].clone()), r"states\[0\]"),
        ("state_non_contiguous", state0(lambda s: torch.empty_like(s.repeat(2))[::2]), r"states\[0\]"),
    ]
    out = []
    for name, mutate, msg in cases:
        for bits in (32, 8):
            out.append((name, bits, mutate, msg))
    out += [
        ("state_dtype", 32, state0(lambda s: s.double()), r"states\[0\]"),
        ("state_dtype", 8, state0(lambda s: s.float()), r"states\[1\] is .* but states\[0\]"),
        (
            "absmax_length",
            8,
            lambda inp, grads: (
                _set(inp, absmax=[[inp.absmax[0][0][:-1].clone(), inp.absmax[0][1]], inp.absmax[1]]),
                grads,
            ),
            r"absmax\[0\]",
        ),
        (
            "absmax_dtype",
            8,
            lambda inp, grads: (
                _set(inp, absmax=[inp.absmax[0], [inp.absmax[1][0].double(), inp.absmax[1][1]]]),
                grads,
            ),
            r"absmax\[2\]",
        ),
        (
            "code_size",
            8,
            lambda inp, grads: (_set(inp, codes=[inp.codes[0][:128].clone(), *inp.codes[1:]]), grads),
            r"codes\[0\]",
        ),
        (
            "code_dtype",
            8,
            lambda inp, grads: (_set(inp, codes=[inp.codes[0], inp.codes[1].double(), inp.codes[2]]), grads),
            r"codes\[1\]",
        ),
        ("codes_count", 8, lambda inp, grads: (_set(inp, codes=inp.codes[:1]), grads), r"\bcodes\b"),
        (
            "absmax_with_float32_states",
            32,
            lambda inp, grads: (_set(inp, absmax=[[torch.zeros(2)]]), grads),
            r"\babsmax\b",
        ),
        (
            "absmax_with_bfloat16_states",
            16,
            lambda inp, grads: (_set(inp, absmax=[[torch.zeros(2)]]), grads),
            r"\babsmax\b",
        ),
        ("state_dtype", 16, state0(lambda s: s.float()), r"states\[1\] is .* but states\[0\]"),
    ]
    return out


STEP_ERRORS = _step_errors()


@pytest.mark.parametrize("name,bits,mutate,msg", STEP_ERRORS, ids=[f"{e[0]}-{e[1]}bit" for e in STEP_ERRORS])
def test_step_rejects_bad_arguments(name, bits, mutate, msg):
    inp, grads = mutate(_valid(bits), make_grads(_valid(bits).params, 0))
    with pytest.raises(ValueError, match=msg):
        step_op(bits)(*inp.args(grads))


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize(
    "rule,flags,msg",
    [
        (0, 0, "rule"),
        (7, 0, "rule"),
        (1, ALL_FLAGS + 1, "flags"),
        (1, -1, "flags"),
        (1, Flag.STOCHASTIC_ROUND, "bfloat16"),
    ],
)
def test_step_rejects_bad_rule_and_flags(bits, rule, flags, msg):
    inp = _valid(bits)
    args = list(inp.args(make_grads(inp.params, 0)))
    args[0], args[1] = rule, flags
    with pytest.raises(ValueError, match=msg):
        step_op(bits)(*args)


def _quant_errors():
    code = dynamic_map(True)
    A = torch.randn(300)
    q, a = reference.quantize_blockwise(A, code, 256)
    qop_q = torch.ops.qop.quantize_blockwise
    qop_d = torch.ops.qop.dequantize_blockwise
    return [
        ("quantize_int", lambda: qop_q(A.int(), code, 256), r"\bA\b"),
        ("quantize_complex", lambda: qop_q(A.to(torch.complex64), code, 256), r"\bA\b"),
        ("quantize_sparse", lambda: qop_q(A.to_sparse(), code, 256), r"\bA\b"),
        ("quantize_non_contiguous", lambda: qop_q(torch.randn(20, 30).t(), code, 256), r"\bA\b"),
        ("quantize_code_size", lambda: qop_q(A, code[:100].clone(), 256), r"\bcode\b"),
        ("quantize_code_dtype", lambda: qop_q(A, code.double(), 256), r"\bcode\b"),
        ("quantize_blocksize", lambda: qop_q(A, code, 0), r"blocksize"),
        ("dequantize_codes_dtype", lambda: qop_d(A, a, code, 256, torch.float32), r"\bA\b"),
        ("dequantize_absmax_length", lambda: qop_d(q, a[:1].clone(), code, 256, torch.float32), r"absmax"),
        ("dequantize_absmax_dtype", lambda: qop_d(q, a.double(), code, 256, torch.float32), r"absmax"),
        ("dequantize_code_size", lambda: qop_d(q, a, code[:10].clone(), 256, torch.float32), r"\bcode\b"),
        ("dequantize_dtype", lambda: qop_d(q, a, code, 256, torch.int32), r"dtype"),
        ("dequantize_blocksize", lambda: qop_d(q, a, code, -1, torch.float32), r"blocksize"),
    ]


QUANT_ERRORS = _quant_errors()


@pytest.mark.parametrize("name,call,msg", QUANT_ERRORS, ids=[e[0] for e in QUANT_ERRORS])
def test_quantize_rejects_bad_arguments(name, call, msg):
    with pytest.raises(ValueError, match=msg):
        call()
