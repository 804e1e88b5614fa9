"""Triton kernels (qop/triton) against qop.reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors: the
launchers are called directly with small shapes.  With CUDA the same tests run the compiled kernels
on the GPU, and the ``gpu`` tests add opcheck, CUDA-graph capture and torch.compile.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
_CHILD = os.environ.get("QOP_TRITON_INTERPRETER_CHILD") == "1"


def _interpreter_possible() -> bool:
    """Triton makes its own @jit library functions (tl.zeros, tl.cdiv, ...) interpreted or compiled
    once, when it is first imported; interpreted kernels need the former."""
    if "triton" not in sys.modules:
        return True
    try:
        import triton.language.standard as standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(standard.zeros, InterpretedFunction)


#: Another test module imported triton (e.g. through torch._inductor) before this one could set
#: TRITON_INTERPRET: the interpreter tests then run in a fresh subprocess instead.
IN_SUBPROCESS = not CUDA and not _interpreter_possible()
if IN_SUBPROCESS and _CHILD:
    raise RuntimeError("qop: triton was imported in compiled mode before tests/test_triton.py set TRITON_INTERPRET")
_saved_interpret = os.environ.get("TRITON_INTERPRET")
if not CUDA and not IN_SUBPROCESS:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton and our kernel modules are imported below

import pytest  # noqa: E402

pytest.importorskip("triton")

from cases import LOWBIT_FORMATS, SIGNED, SR_CASES, STEP_CASES, lowbit_cases, op_args  # noqa: E402

import qop  # noqa: E402
from qop import HP, Flag, Rule, reference  # noqa: E402
from qop._schema import HP_SIZE  # noqa: E402
from qop.triton import _clip, _common, _kernel, _multi_tensor, _quant, _step  # noqa: E402

if not CUDA and not IN_SUBPROCESS:
    assert _common.is_interpreted(_kernel._step_kernel)
    if _saved_interpret is None:  # leave the environment as we found it for other test modules
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved_interpret


@pytest.fixture(autouse=True)
def _interpreter_env(request, monkeypatch):
    """Triton also consults the variable at launch (lazy imports), so set it again while we run."""
    if IN_SUBPROCESS and request.node.originalname != "test_interpreter_suite_in_subprocess":
        pytest.skip("runs in a subprocess: see test_interpreter_suite_in_subprocess")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif(not IN_SUBPROCESS, reason="the interpreter tests run in this process")
def test_interpreter_suite_in_subprocess():
    """Triton was imported in compiled mode before this module: run this file in a fresh interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", QOP_TRITON_INTERPRETER_CHILD="1")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]  # the child really ran the kernels


DEVICE = torch.device("cuda" if CUDA else "cpu")
# The interpreter evaluates both sides of tl.where (e.g. AdEMAMix's warm-up when it is off) in numpy.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

#: Mixed sizes of one call: a single element, partial and just-over-full 8-bit blocks, several chunks.
SIZES = [1, 255, 257, 700]
#: Small chunks and tiles so that the interpreter sees several chunks per tensor and several tiles
#: per chunk; the default config is exercised separately.
SMALL = dict(chunk=512, config={"BLOCK": 256, "num_warps": 4})


# --------------------------------------------------------------------------------------------- cases
def make_hp(**values: float) -> torch.Tensor:
    defaults = dict(
        LR=1e-2,
        BETA1=0.9,
        BETA2=0.999,
        BETA3=0.9999,
        EPS=1e-8,
        WEIGHT_DECAY=0.0,
        ALPHA=0.99,
        DAMPENING=0.0,
        LR_DECAY=0.0,
        MAX_UNORM=0.0,
        T_ALPHA=0.0,
        T_BETA3=0.0,
    )
    defaults.update(values)
    hp = torch.zeros(HP_SIZE, dtype=torch.float32)
    for name, value in defaults.items():
        hp[HP[name]] = value
    return hp.to(DEVICE)


#: The op cases of the CPU and reference tests (tests/cases.py), run here on the Triton kernels.
CASES = {c.name: c for c in STEP_CASES}


class Problem:
    """One call's tensors; ``bits`` 32, 16 (bfloat16 states) or 8.  Generated states are random, not zero, so that the
    first step already dequantizes real codes."""

    def __init__(self, case, dtype, bits, sizes=SIZES, seed=0, gscale=False, found_inf=None):
        self.rule, self.flags = case.rule, int(case.flags)
        maps = SIGNED[case.rule][: case.n_states]
        self.bits = bits
        self.k = len(maps)
        g = torch.Generator().manual_seed(seed)
        rand = lambda n: torch.randn(n, generator=g)
        self.params = [rand(n).to(dtype).to(DEVICE) for n in sizes]
        self.grads = [rand(n).to(dtype).to(DEVICE) for n in sizes]
        self.codes = [qop.dynamic_map(s, DEVICE) for s in maps] or [qop.dynamic_map(True, DEVICE)]
        self.states: list[list[torch.Tensor]] = [[], [], []]
        self.absmax: list[list[torch.Tensor]] = [[], [], []]
        for j, signed in enumerate(maps):
            for n in sizes:
                x = rand(n) * 0.01
                x = x if signed else x.abs()
                if bits in (32, 16):
                    self.states[j].append(x.to(DEVICE, torch.bfloat16 if bits == 16 else torch.float32))
                else:
                    q, a = reference.quantize_blockwise(x.to(DEVICE), self.codes[j], qop.BLOCKSIZE)
                    self.states[j].append(q)
                    self.absmax[j].append(a)
        self.steps = [torch.tensor(float(i % 3), device=DEVICE) for i in range(len(sizes))]
        self.hp = case.hp_tensor().to(DEVICE)
        self.gscale = (torch.rand(len(sizes), generator=g) + 0.5).to(DEVICE) if gscale else None
        self.found_inf = None if found_inf is None else torch.tensor(found_inf, device=DEVICE)

    def clone(self) -> Problem:
        return copy.deepcopy(self)

    def mutable(self) -> list[torch.Tensor]:
        return [*self.params, *(t for s in self.states for t in s), *(t for a in self.absmax for t in a), *self.steps]

    def args(self, unorm: torch.Tensor | None = None) -> tuple:
        """The arguments of ``qop::step`` for this problem."""
        codes = self.codes[: self.k] if self.bits == 8 else []
        return op_args(
            self.rule,
            self.flags,
            self.params,
            self.grads,
            self.states,
            self.absmax,
            codes,
            self.steps,
            self.hp,
            self.gscale,
            self.found_inf,
            unorm,
        )

    def run(self, impl, unorm: torch.Tensor | None = None, **kw) -> None:
        impl.step(*self.args(unorm), **kw)


# ------------------------------------------------------------------------------------------ checks
def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Integers ordered like the floats they encode, so that adjacent floats differ by 1."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[x.dtype]
    i = x.view(bits).long()
    return torch.where(i < 0, -(i & ((1 << (8 * x.element_size() - 1)) - 1)), i)


def assert_params_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-7)
    else:  # float32 math rounded once: at most one unit in the last place apart
        ulps = (_ordered(actual) - _ordered(expected)).abs().max().item() if actual.numel() else 0
        assert ulps <= 1, f"{ulps} ulps apart"


def assert_same_step(actual: Problem, expected: Problem) -> None:
    for a, e in zip(actual.params, expected.params):
        assert_params_close(a, e)
    for a, e in zip(actual.steps, expected.steps):
        assert a.item() == e.item()
    for j in range(3):
        for a, e in zip(actual.states[j], expected.states[j]):
            if actual.bits == 32:
                torch.testing.assert_close(a, e, rtol=2e-6, atol=1e-9)
            elif actual.bits == 16:
                assert a.dtype == torch.bfloat16
                assert_params_close(a, e)
            elif a.numel():  # one code step at most, and rarely
                diff = (a.int() - e.int()).abs()
                assert diff.max().item() <= 1
                assert (diff > 0).float().mean().item() < 0.02
        for a, e in zip(actual.absmax[j], expected.absmax[j]):
            torch.testing.assert_close(a, e, rtol=2e-6, atol=0)


def check_against_reference(problem: Problem, n_steps: int = 2, **kw) -> None:
    """Each step starts the kernel and the reference from the same tensors and compares one step."""
    for _ in range(n_steps):
        expected = problem.clone()
        problem.run(_step, **kw)
        expected.run(reference)
        assert_same_step(problem, expected)


# ------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, blocksize", [(1, 256), (255, 256), (257, 256), (1000, 256), (300, 64), (5000, 2048)])
def test_quantize_dequantize(n, blocksize, dtype):
    g = torch.Generator().manual_seed(n)
    A = (torch.randn(n, generator=g) * 3).to(dtype).to(DEVICE)
    if n > 256:
        A[:blocksize] = 0  # a zero block: absmax 0, dequantizes to zeros
    code = qop.dynamic_map(True, DEVICE)
    q, absmax = _quant.quantize_blockwise(A, code, blocksize)
    q_ref, absmax_ref = reference.quantize_blockwise(A, code, blocksize)
    assert q.dtype == torch.uint8 and q.shape == A.shape
    assert torch.equal(absmax, absmax_ref)
    assert torch.equal(q, q_ref)
    out = _quant.dequantize_blockwise(q, absmax, code, blocksize, dtype)
    assert torch.equal(out, reference.dequantize_blockwise(q, absmax, code, blocksize, dtype))


def test_quantize_ties_go_down_and_unsigned_map():
    code = qop.dynamic_map(False, DEVICE)
    mids = 0.5 * (code[:-1] + code[1:])
    A = torch.cat([mids, code, torch.tensor([1.0], device=DEVICE)])  # exact midpoints and code values
    A = A.reshape(-1)
    q, absmax = _quant.quantize_blockwise(A, code, A.numel())
    q_ref, _ = reference.quantize_blockwise(A, code, A.numel())
    assert absmax.item() == 1.0
    assert torch.equal(q, q_ref)
    # ties go down, except the first midpoint: a positive value never takes the unsigned map's code 0
    expected = torch.arange(mids.numel(), device=DEVICE).clamp(min=1)
    assert torch.equal(q[: mids.numel()].long(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_positive_never_code_zero_with_unsigned_map(dtype):
    """Tiny positive values (down to subnormals) take the smallest positive code; zeros keep code 0."""
    code = qop.dynamic_map(False, DEVICE)
    info = torch.finfo(dtype)
    tiny = torch.tensor([1e-7, 1e-8, 1e-20, 1e-30, info.tiny, 1e-40, 1e-45, 2.0**-24]).to(dtype)
    if dtype == torch.bfloat16 and not CUDA:  # the interpreter's bfloat16 -> float32 flushes subnormals
        tiny = tiny[tiny.float() >= info.tiny]
    tiny = tiny[tiny > 0].to(DEVICE)
    A = torch.zeros(300, dtype=dtype, device=DEVICE)
    A[0] = 1.0
    A[1 : 1 + tiny.numel()] = tiny
    A[256] = 1e4
    A[257 : 257 + tiny.numel()] = tiny
    q, _ = _quant.quantize_blockwise(A, code, 256)
    assert torch.equal(q, reference.quantize_blockwise(A, code, 256)[0])
    assert bool((q[A > 0] >= 1).all()) and bool((q[A == 0] == 0).all())


@pytest.mark.parametrize("case", ["adam", "ademamix"])
def test_step_vanishing_gradient_moves_by_lr(case):
    """The requantized second moment of an element whose gradient was 1e-4 of its block's largest keeps a
    non-zero code, so when that gradient vanishes the element moves by about lr, not by m / eps (~4.2)."""
    rule, flags = CASES[case].rule, CASES[case].flags
    signed = SIGNED[rule][: CASES[case].n_states]
    hp = make_hp(LR=1e-3, ALPHA=5.0)
    codes = [qop.dynamic_map(sg, DEVICE) for sg in signed]
    p = torch.zeros(256, device=DEVICE)
    states = [[torch.zeros(256, dtype=torch.uint8, device=DEVICE)] for _ in signed]
    absmax = [[torch.zeros(1, device=DEVICE)] for _ in signed]
    steps = [torch.zeros((), device=DEVICE)]
    for g1 in (1e-4, 0.0):
        g = torch.zeros(256, device=DEVICE)
        g[0], g[1] = 1.0, g1
        before = float(p[1])
        _step.step(*op_args(rule, flags, [p], [g], states, absmax, codes, steps, hp), **SMALL)
    assert int(states[1][0][1]) >= 1
    assert abs(float(p[1]) - before) < 10 * 1e-3


@pytest.mark.parametrize("blocksize", [256, 2048])
def test_quantize_nan_and_inf_like_reference(blocksize):
    """A NaN makes its block's absmax NaN (torch.amax) and takes the last code, as does +-inf over an
    infinite absmax (a NaN quotient); the other blocks are untouched."""
    A = torch.randn(3 * blocksize, generator=torch.Generator().manual_seed(2))
    A[5], A[blocksize + 7], A[blocksize + 9], A[2 * blocksize - 1] = float("nan"), float("inf"), -float("inf"), 1.0
    for signed in (True, False):
        x = A if signed else A.abs()
        code = qop.dynamic_map(signed, DEVICE)
        q, absmax = _quant.quantize_blockwise(x.to(DEVICE), code, blocksize)
        q_ref, absmax_ref = reference.quantize_blockwise(x, code.cpu(), blocksize)
        assert torch.equal(q.cpu(), q_ref)
        torch.testing.assert_close(absmax.cpu(), absmax_ref, rtol=0, atol=0, equal_nan=True)
        assert bool(absmax[0].isnan()) and int(q[5]) == 255 and int(q[blocksize + 7]) == 255


def test_step_amsgrad_nan_stays_nan():
    """AMSGrad's vmax = max(vmax, v) keeps a NaN (torch.maximum), so the parameter becomes NaN as in the
    reference instead of stepping on as if vmax were v."""
    hp = make_hp(LR=1e-2)
    p, g = torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE)
    m, v, vmax = (torch.zeros(4, device=DEVICE) for _ in range(3))
    vmax[1] = float("nan")
    ours = [t.clone() for t in (p, m, v, vmax)]
    steps = [torch.zeros((), device=DEVICE)]
    _step.step(int(Rule.ADAM), int(Flag.AMSGRAD), [ours[0]], [g], ours[1:], [], [], steps, hp, None, None, **SMALL)
    ref = [t.cpu().clone() for t in (p, m, v, vmax)]
    reference.step(
        int(Rule.ADAM), int(Flag.AMSGRAD), [ref[0]], [g.cpu()], ref[1:], [], [], [torch.zeros(())], hp.cpu(), None, None
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.cpu(), b, equal_nan=True)
    assert bool(ours[0][1].isnan()) and not bool(ours[0][0].isnan())


@pytest.mark.parametrize("scale", [1e-25, 1e19], ids=["tiny", "huge"])
def test_norms_in_float64_like_reference(scale):
    """Gradient norms (percentile clipping) and LAMB's update/parameter norms of values whose float32 squares
    vanish or overflow: summed in float64 like the reference, not 0 or inf."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(700, generator=gen) * scale
    history = torch.full((100,), float("inf"))
    history[:10] = float(reference.l2_norm(g)) * torch.linspace(0.5, 2.0, 10)
    ours_h, ref_h = history.to(DEVICE), history.clone()
    step = [torch.tensor(10.0, device=DEVICE)]
    scales = _clip.percentile_clip([g.to(DEVICE)], [ours_h], step, 5, torch.tensor(1.0, device=DEVICE), **SMALL)
    expected = reference.percentile_clip([g], [ref_h], [torch.tensor(10.0)], 5, torch.tensor(1.0))
    torch.testing.assert_close(scales.cpu(), expected, rtol=2e-6, atol=0)
    assert float(expected) < 1.0
    hp = make_hp(LR=1e-2, MAX_UNORM=1e-3)
    p = torch.randn(700, generator=gen) * scale
    results = []
    for impl, dev in ((_step, DEVICE), (reference, torch.device("cpu"))):
        pi, m, v = p.clone().to(dev), torch.zeros(700, device=dev), torch.zeros(700, device=dev)
        kw = SMALL if impl is _step else {}
        impl.step(
            int(Rule.ADAM),
            int(Flag.UNORM_CLIP),
            [pi],
            [g.to(dev)],
            [m, v],
            [],
            [],
            [torch.zeros((), device=dev)],
            hp.to(dev),
            None,
            None,
            **kw,
        )
        results.append(pi.cpu())
    if scale < 1:  # clipped to max_unorm * ||p|| with ||p||^2 below float32's range (a huge p barely moves)
        assert not torch.equal(results[1], p)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=0)


def test_quantize_empty():
    code = qop.dynamic_map(True, DEVICE)
    q, absmax = _quant.quantize_blockwise(torch.empty(0, device=DEVICE), code, 256)
    assert q.numel() == 0 and absmax.numel() == 0
    assert _quant.dequantize_blockwise(q, absmax, code, 256, torch.bfloat16).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- steps
@pytest.mark.parametrize("case", STEP_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_float32_states(case, dtype):
    check_against_reference(Problem(case, dtype, 32), n_steps=2 if dtype == torch.float32 else 1, **SMALL)


@pytest.mark.parametrize("case", STEP_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_blockwise8_states(case, dtype):
    check_against_reference(Problem(case, dtype, 8), n_steps=2 if dtype == torch.float32 else 1, **SMALL)


@pytest.mark.parametrize("case", STEP_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_bfloat16_states(case, dtype):
    check_against_reference(Problem(case, dtype, 16), n_steps=1, **SMALL)


@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("case", SR_CASES[:1] + SR_CASES[6:7] + SR_CASES[4:5], ids=str)
def test_step_stochastic_rounding(case, bits):
    """bfloat16 params rounded stochastically: the reference's bits (one ulp where the float32 value differs in its
    last bit), in one launch and in one launch per tensor alike."""
    problem = Problem(case, torch.bfloat16, bits, sizes=[1, 17, 700])
    problem.hp[HP.SR_SEED] = 987.0
    expected = problem.clone()
    single = problem.clone()
    problem.run(_step, **SMALL)
    single.run(_step, multi=False, **SMALL)
    expected.run(reference)
    assert_same_step(problem, expected)
    same = sum(int((a.view(torch.int16) == e.view(torch.int16)).sum()) for a, e in zip(problem.params, expected.params))
    assert same >= 0.99 * sum(p.numel() for p in problem.params)
    for a, b in zip(problem.mutable(), single.mutable()):
        assert torch.equal(a, b)


@pytest.mark.skipif(CUDA, reason="the GPU compiler may contract p - lr * g into a fused multiply-add")
def test_stochastic_rounding_exact_update_is_the_reference():
    """Plain SGD with no decay computes the float32 value exactly as the reference: identical bits."""
    from cases import CASES as ALL

    case = next(c for c in SR_CASES if c.name == "sgd_no_momentum_sr")
    assert case.rule == ALL["sgd_no_momentum"].rule
    problem = Problem(case, torch.bfloat16, 32, sizes=[1, 300, 1029])
    problem.hp[HP.WEIGHT_DECAY] = 0.0
    expected = problem.clone()
    problem.run(_step, **SMALL)
    expected.run(reference)
    for a, e in zip(problem.params, expected.params):
        assert torch.equal(a.view(torch.int16), e.view(torch.int16))


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("case", [CASES["adam"], CASES["sgd_nesterov"]], ids=["adamw", "sgd-nesterov"])
def test_step_float16(case, bits):
    check_against_reference(Problem(case, torch.float16, bits), n_steps=1, **SMALL)


@pytest.mark.parametrize("bits", [32, 8])
def test_step_default_config(bits):
    """The first autotune config and the default chunk (what the interpreter launches by default)."""
    check_against_reference(Problem(CASES["adam"], torch.float32, bits, sizes=[3000, 5, 513]), n_steps=1)


@pytest.mark.parametrize("bits", [32, 8])
def test_step_wide_tiles_aligned(bits):
    """Tiles of several 8-bit blocks (rows), chunks of several tiles; sizes that are multiples of 16
    (and aligned storage) take the kernel's vectorization hints."""
    problem = Problem(CASES["adam_amsgrad"], torch.bfloat16, bits, sizes=[2560, 768])
    check_against_reference(problem, n_steps=1, chunk=1024, config={"BLOCK": 512, "num_warps": 4})
    k = CASES["adam_amsgrad"].n_states
    rows = [
        [
            p,
            g,
            *[problem.states[j][i] for j in range(k)],
            *([problem.absmax[j][i] for j in range(k)] if bits == 8 else [None] * k),
            st,
        ]
        for i, (p, g, st) in enumerate(zip(problem.params, problem.grads, problem.steps))
    ]
    assert _multi_tensor.metadata(rows, 1024).aligned


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("case", [CASES["adam"], CASES["lamb"], CASES["adagrad"]], ids=["adamw", "lamb", "adagrad"])
def test_step_gscale(case, bits):
    check_against_reference(Problem(case, torch.float32, bits, gscale=True), n_steps=1, **SMALL)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("case", [CASES["adam"], CASES["lamb"]], ids=["adamw", "lamb"])
def test_step_found_inf(case, bits):
    skipped = Problem(case, torch.bfloat16, bits, found_inf=1.0)
    before = skipped.clone()
    skipped.run(_step, **SMALL)
    for a, b in zip(skipped.mutable(), before.mutable()):
        assert torch.equal(a, b)
    check_against_reference(Problem(case, torch.bfloat16, bits, found_inf=0.0), n_steps=1, **SMALL)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("case", [CASES["adam_amsgrad"], CASES["lamb"], CASES["lars"]], ids=["amsgrad", "lamb", "lars"])
def test_single_tensor_launches_match_multi(case, bits):
    """The torch.compile decomposition (one launch per tensor) computes what the eager launch does."""
    multi = Problem(case, torch.float32, bits, gscale=True)
    single = multi.clone()
    multi.run(_step, **SMALL)
    single.run(_step, multi=False, **SMALL)
    for a, b in zip(multi.mutable(), single.mutable()):
        assert torch.equal(a, b)


def test_empty_tensor_advances_step():
    problem = Problem(CASES["adam"], torch.float32, 8, sizes=[0, 300])
    expected = problem.clone()
    problem.run(_step, **SMALL)
    expected.run(reference)
    assert_same_step(problem, expected)
    assert problem.steps[0].item() == 1.0


def test_empty_call_is_a_noop():
    hp = make_hp()
    _step.step(Rule.ADAM, 0, [], [], [], [], [], [], hp, None, None)


# ---------------------------------------------------------------------------------- percentile clip
def _clip_inputs(dtype: torch.dtype, sizes=(0, 1, 300, 1500), steps=(0, 4, 99, 230), seed: int = 0):
    """Gradients over several chunks (with SMALL), histories filled as after ``steps`` steps."""
    g = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(n, generator=g) * 3).to(dtype).to(DEVICE) for n in sizes]
    histories = []
    for t in steps:
        h = torch.full((100,), float("inf"))
        h[: min(t, 100)] = torch.rand(min(t, 100), generator=g) * 40
        histories.append(h.to(DEVICE))
    return grads, histories, [torch.tensor(float(t), device=DEVICE) for t in steps], torch.tensor(0.5, device=DEVICE)


@pytest.mark.parametrize("multi", [True, False], ids=["multi", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("percentile", [5, 60])
def test_percentile_clip(multi, dtype, percentile):
    grads, histories, steps, pre = _clip_inputs(dtype, seed=percentile)
    expected_h = [h.clone() for h in histories]
    for _ in range(2):  # the second call finds the cached metadata with its counters and sums reset
        scales = _clip.percentile_clip(grads, histories, steps, percentile, pre, multi=multi, **SMALL)
        expected = reference.percentile_clip(grads, expected_h, steps, percentile, pre)
        torch.testing.assert_close(scales, expected, rtol=2e-6, atol=0)
        for h, e in zip(histories, expected_h):
            torch.testing.assert_close(h, e, rtol=2e-6, atol=0)
        for s in steps:
            s.add_(1)
        grads = [gr * 4 for gr in grads]


def test_percentile_clip_default_config():
    grads, histories, steps, pre = _clip_inputs(torch.float16, sizes=(5000, 70000), steps=(150, 2))
    expected_h = [h.clone() for h in histories]
    scales = _clip.percentile_clip(grads, histories, steps, 10, pre)
    torch.testing.assert_close(scales, reference.percentile_clip(grads, expected_h, steps, 10, pre), rtol=1e-5, atol=0)
    assert _clip.percentile_clip([], [], [], 10, pre).shape == (0,)


# ----------------------------------------------------------------------------- multi-tensor metadata
def test_metadata_cached_and_self_resetting():
    problem = Problem(CASES["lamb"], torch.float32, 8)  # LAMB: counters and norm sums both used
    rows = [
        [p, g, s1, s2, None, a1, a2, None, st]
        for p, g, s1, s2, a1, a2, st in zip(
            problem.params, problem.grads, *problem.states[:2], *problem.absmax[:2], problem.steps
        )
    ]
    problem.run(_step, **SMALL)
    meta = _multi_tensor.metadata(rows, SMALL["chunk"])
    assert _multi_tensor.metadata(rows, SMALL["chunk"]) is meta
    owner, start = meta.chunks.cpu().unbind(1)
    assert owner.tolist() == [0, 1, 2, 3, 3]
    assert start.tolist() == [0, 0, 0, 0, 512]
    assert meta.table[:, _multi_tensor.SLOT_NUMEL].tolist() == SIZES
    assert not meta.aligned  # sizes 1, 255, ... are not multiples of 16
    assert torch.count_nonzero(meta.work).item() == 0
    assert torch.count_nonzero(meta.norms).item() == 0


@pytest.mark.parametrize("bits", [32, 8])
def test_dry_run_writes_back_what_it_read(bits):
    """The autotuner's timing runs of multi-tensor launches must leave every tensor unchanged."""
    problem = Problem(CASES["lamb"], torch.float32, bits)
    problem.run(_step, **SMALL)  # builds the metadata of these tensors
    k = CASES["lamb"].n_states
    rows = [
        [
            p,
            g,
            *[problem.states[j][i] for j in range(k)],
            None,
            *([problem.absmax[j][i] for j in range(k)] if bits == 8 else [None] * k),
            None,
            st,
        ]
        for i, (p, g, st) in enumerate(zip(problem.params, problem.grads, problem.steps))
    ]
    meta = _multi_tensor.metadata(rows, SMALL["chunk"])
    before = problem.clone()
    _kernel._dry_run_on({"work_ptr": meta.work})
    try:
        problem.run(_step, **SMALL)
    finally:
        _kernel._dry_run_off({"work_ptr": meta.work})
    for a, b in zip(problem.mutable(), before.mutable()):
        assert torch.equal(a, b)
    assert torch.count_nonzero(meta.work).item() == 0
    assert torch.count_nonzero(meta.norms).item() == 0


def test_launcher_checks_arguments():
    problem = Problem(CASES["adam"], torch.float32, 32)
    with pytest.raises((ValueError, RuntimeError), match="grads"):
        short = problem.clone()
        short.grads = short.grads[:-1]
        short.run(_step)
    with pytest.raises(ValueError, match="BLOCK"):
        problem.run(_step, config={"BLOCK": 100, "num_warps": 4})


# --------------------------------------------------------------------------- torch.compile wiring
@pytest.mark.skipif(CUDA, reason="with CUDA the rule is registered for real (see test_compile_shows_kernels)")
def test_decomposition_rule_is_consulted_and_defers_off_cuda():
    """The FunctionalTensorMode rule that qop.triton attaches to the existing op is what AOTAutograd
    consults; for non-CUDA tensors it leaves the op whole (auto_functionalized, then the CPU kernel)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    import qop.triton as qt

    seen = []
    rule = qt._functional_decomposition("step", qt._OPS["step"][1], "hp")

    def spy(mode, op, types, args, kwargs):
        seen.append(op)
        return rule(mode, op, types, args, kwargs)

    lib = torch.library.Library("qop", "IMPL")
    try:
        torch.library.register_torch_dispatch("qop::step", FunctionalTensorMode, spy, lib=lib)
        problem = Problem(CASES["adam"], torch.float32, 32, sizes=[5, 300])
        expected = problem.clone()
        expected.run(reference)
        args = _op_args(problem)
        torch.compile(lambda: torch.ops.qop.step(*args), backend="aot_eager", fullgraph=True)()
        assert seen and set(seen) == {torch.ops.qop.step.default}  # AOT traces it more than once
        assert_same_step(problem, expected)
    finally:
        lib._destroy()
        torch._dynamo.reset()


# ---------------------------------------------------------------------- compiled for a GPU, on a CPU
_COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qop._schema import HP_SIZE, Flag
from qop.triton import _clip, _kernel, _quant, _step

SR = int(Flag.STOCHASTIC_ROUND)

def compile_(fn, sig, consts):
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts, attrs={})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

ptr = lambda *names, t="*fp32": {n: t for n in names}  # noqa: E731
def step_sig(p, s):
    return {**ptr("p_ptr", "g_ptr", t=p), **ptr("s1_ptr", "s2_ptr", "s3_ptr", t=s),
            **ptr("a1_ptr", "a2_ptr", "a3_ptr", "step_ptr", "code1_ptr", "code2_ptr", "code3_ptr", "hp_ptr",
                  "gscale_ptr", "found_inf_ptr"),
            **ptr("table_ptr", "chunks_ptr", t="*i64"), "work_ptr": "*i32", "norms_ptr": "*fp64",
            "numel": "i32", "tensor_index": "i32", "size_class": "i32"}

base = dict(HAS_GSCALE=True, HAS_FOUND_INF=True, CHUNK=16384, BLOCK=1024)
# QUANT: the state format (0 float32, 1 8-bit, 3 4-bit, 4 fp8 as bytes); ROW: its block size
for rule, flags, k, quant, pass_, multi, gather in [
        (6, 0, 3, 1, 2, True, True), (1, 2, 3, 1, 0, False, False), (1, 8, 2, 0, 1, False, True),
        (2, 0, 0, 1, 0, True, True), (5, 0, 1, 0, 0, True, True), (1, 2, 3, 3, 0, True, True),
        (6, 0, 3, 3, 2, False, False), (1, 16, 2, 4, 2, True, True), (1, 2, 3, 4, 0, False, True),
        (1, SR, 2, 0, 0, True, True), (1, SR, 2, 2, 0, False, True)]:  # format 2: bfloat16 states
    consts = dict(base, RULE=rule, FLAGS=flags, N_STATES=k, QUANT=quant, PASS=pass_, MULTI=multi, ALIGNED=multi,
                  GATHER=gather, ROW=128 if quant == 3 else 256)
    compile_(_kernel._step_kernel, step_sig("*bf16", {0: "*fp32", 2: "*bf16"}.get(quant, "*u8")), consts)
compile_(_quant._quantize_kernel, {**ptr("a_ptr", t="*bf16"), **ptr("code_ptr", "absmax_ptr"), "q_ptr": "*u8",
         "numel": "i32", "blocksize": "i32", "n_blocks": "i32", "size_class": "i32"},
         dict(COLS=256, TILE=2048, GATHER=True))
compile_(_quant._dequantize_kernel, {"q_ptr": "*u8", **ptr("absmax_ptr", "code_ptr"), "out_ptr": "*fp16",
         "numel": "i32", "blocksize": "i32", "size_class": "i32"}, dict(BLOCK=1024, GATHER=True))
for multi in (True, False):
    compile_(_clip._clip_kernel, {**ptr("g_ptr", t="*bf16"), **ptr("h_ptr", "step_ptr", "pre_ptr", "out_ptr"),
             **ptr("table_ptr", "chunks_ptr", t="*i64"), "work_ptr": "*i32", "norms_ptr": "*fp64",
             "numel": "i32", "tensor_index": "i32", "size_class": "i32"},
             dict(PERCENTILE=5, MULTI=multi, CHUNK=16384, BLOCK=2048))
print("compiled")

# The torch.compile decomposition, traced with fake CUDA tensors (Triton analyses the kernel for sm_90):
# functionalization must see every tensor the per-tensor launches write.
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from triton.runtime import driver

class TargetOnly:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

driver.set_active(TargetOnly())
with FakeTensorMode():
    new = lambda n, dt=torch.float32: torch.empty(n, device="cuda", dtype=dt)  # noqa: E731
    bf16 = torch.bfloat16
    t = dict(params=[new(5, bf16), new(300, bf16)], grads=[new(5, bf16), new(300, bf16)],
             s1=[new(5, torch.uint8), new(300, torch.uint8)], s2=[new(5, torch.uint8), new(300, torch.uint8)],
             a1=[new(1), new(2)], a2=[new(1), new(2)], steps=[new(()), new(())], hp=new(HP_SIZE), code=new(256),
             gscale=new(2), found=new(()))

def f(params, grads, s1, s2, a1, a2, steps, hp, code, gscale, found):
    _step.step(1, 16, params, grads, s1 + s2, a1 + a2, [code, code], steps, hp, gscale, found,
               multi=False)  # Adam with the update-norm clip: two passes per tensor

gm = make_fx(torch.func.functionalize(f, remove="mutations_and_views"), tracing_mode="fake")(*t.values())
launches = [n for n in gm.graph.nodes if "triton_kernel_wrapper_functional" in str(n.target)]
clones = [sorted(n.kwargs["tensors_to_clone"]) for n in launches]
assert clones == [["norms_ptr"], sorted(["p_ptr", "s1_ptr", "s2_ptr", "a1_ptr", "a2_ptr", "step_ptr", "work_ptr",
                                          "norms_ptr"])] * 2, clones

def g(grads, histories, steps, pre):
    return _clip.percentile_clip(grads, histories, steps, 5, pre, multi=False)

with FakeTensorMode():
    c = dict(grads=[new(5, bf16), new(70000, bf16)], histories=[new(100), new(100)], steps=[new(()), new(())],
             pre=new(()))
gm = make_fx(torch.func.functionalize(g, remove="mutations_and_views"), tracing_mode="fake")(*c.values())
launches = [n for n in gm.graph.nodes if "triton_kernel_wrapper_functional" in str(n.target)]
clones = [sorted(n.kwargs["tensors_to_clone"]) for n in launches]
assert clones == [sorted(["h_ptr", "out_ptr", "work_ptr", "norms_ptr"])] * 2, clones
print("traced")
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_sm90():
    """The interpreter is more lenient than the compiler: compile representative variants down to
    sm_90 machine code (Triton's frontend, MLIR passes and its bundled ptxas need no GPU), then trace
    the torch.compile decomposition with fake CUDA tensors and check what it reports as written."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 and ("ASTSource" in proc.stderr and "TypeError" in proc.stderr):
        pytest.skip(f"this Triton's ASTSource API differs: {proc.stderr.splitlines()[-1]}")
    assert proc.returncode == 0 and "traced" in proc.stdout, proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------- paging
def test_paged_falls_back_on_cpu():
    from qop import paged

    t = paged.paged_zeros((3, 5), dtype=torch.float32, device="cpu")
    assert t.shape == (3, 5) and t.device.type == "cpu" and torch.count_nonzero(t).item() == 0
    assert paged.paged_empty(7, device="cpu").dtype == torch.float32
    assert not paged.is_paged(t)
    paged.prefetch([t, torch.ones(2)])  # no-op


def _cuda_include() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


@pytest.mark.skipif(CUDA, reason="a CUDA machine builds and runs qop._C_cuda for real (test_paged_managed_memory)")
@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers here")
def test_cuda_paging_helper_compiles(tmp_path):
    """csrc/cuda/paged.cpp is built only where torch has CUDA; here check that it compiles against this
    torch's headers and the CUDA toolkit's (the CPU wheel lacks one generated CMake header: stubbed)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    includes = [str(tmp_path), *include_paths(), _cuda_include(), sysconfig.get_paths()["include"]]
    cmd = [
        "g++",
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        *(f"-isystem{i}" for i in includes),
        os.path.join(root, "csrc", "cuda", "paged.cpp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr, proc.stderr[-4000:]  # headers are -isystem: warnings are ours


# --------------------------------------------------------------------------------- GPU-only checks
def _op_args(problem: Problem) -> tuple:
    return problem.args()


def _op(problem: Problem):
    return torch.ops.qop.step.default


@gpu
@requires_cuda
def test_cuda_kernels_are_registered():
    import qop.triton  # noqa: F401

    for name in ("quantize_blockwise", "dequantize_blockwise", "step"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qop::{name}", "CUDA")
    problem = Problem(CASES["adam"], torch.bfloat16, 8)
    expected = problem.clone()
    _op(problem)(*_op_args(problem))
    expected.run(reference)
    assert_same_step(problem, expected)


@gpu
@requires_cuda
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("case", [CASES["adam"], CASES["sgd"], CASES["ademamix"]], ids=["adamw", "sgd", "ademamix"])
def test_opcheck_cuda(case, bits):
    problem = Problem(case, torch.bfloat16, bits, sizes=[0, 1, 300], gscale=True, found_inf=0.0)
    torch.library.opcheck(_op(problem), _op_args(problem))
    code = qop.dynamic_map(True, DEVICE)
    A = torch.randn(1000, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(torch.ops.qop.quantize_blockwise.default, (A, code, 256))
    q, absmax = torch.ops.qop.quantize_blockwise(A, code, 256)
    torch.library.opcheck(torch.ops.qop.dequantize_blockwise.default, (q, absmax, code, 256, torch.bfloat16))
    torch.library.opcheck(
        torch.ops.qop.percentile_clip.default, (*_clip_inputs(torch.bfloat16)[:3], 5, torch.tensor(0.5, device=DEVICE))
    )


@gpu
@requires_cuda
def test_percentile_clip_cuda_graph():
    """Captured once, replayed on new gradients: records each norm and clips like the reference."""
    grads, histories, steps, pre = _clip_inputs(torch.float32, sizes=(1, 4096, 70000), steps=(3, 99, 250))
    _clip.percentile_clip(grads, [h.clone() for h in histories], steps, 5, pre)  # warm-up: autotuning
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scales = torch.ops.qop.percentile_clip(grads, histories, steps, 5, pre)
    expected_h = [h.clone() for h in histories]
    for _ in range(3):
        for g in grads:
            g.mul_(3.0)
        graph.replay()
        expected = reference.percentile_clip(grads, expected_h, steps, 5, pre)
        torch.cuda.synchronize()
        torch.testing.assert_close(scales, expected, rtol=1e-5, atol=0)
        for h, e in zip(histories, expected_h):
            torch.testing.assert_close(h, e, rtol=1e-5, atol=0)
        for s in steps:
            s.add_(1)


@gpu
@requires_cuda
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_graph_capture_and_replay(bits):
    problem = Problem(CASES["lamb"], torch.float32, bits, sizes=[1, 4096, 70000])  # LAMB: both passes
    op, args = _op(problem), _op_args(problem)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(*args)  # warm-up: autotuning and metadata happen outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    start = problem.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(*args)
    for t, s in zip(problem.mutable(), start.mutable()):  # capture ran nothing; reset anyway
        t.copy_(s)
    expected = start.clone()
    expected.run(_step)  # eager
    graph.replay()
    torch.cuda.synchronize()
    assert_same_step(problem, expected)  # norm sums are atomics: equal up to rounding
    graph.replay()  # counters and sums reset themselves: a second replay is a second step
    torch.cuda.synchronize()
    assert problem.steps[0].item() == start.steps[0].item() + 2


@gpu
@requires_cuda
@pytest.mark.parametrize("decompose", [True, False])
def test_compile_shows_kernels(decompose, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    import qop.triton

    monkeypatch.setattr(qop.triton, "DECOMPOSE", decompose)
    torch._dynamo.reset()
    problem = Problem(CASES["adam"], torch.bfloat16, 8, sizes=[1, 300, 5000])
    expected = problem.clone()
    expected.run(_step)
    op, args = _op(problem), _op_args(problem)

    def step():
        op(*args)

    _, (code, *_) = run_and_get_code(torch.compile(step, fullgraph=True))
    if decompose:  # inductor launches our kernel itself (one launch per tensor)
        assert "_step_kernel" in code
    else:  # the op stays opaque: inductor calls the eager kernel
        assert "_step_kernel" not in code and "qop.step.default" in code
    assert_same_step(problem, expected)
    torch._dynamo.reset()


@gpu
@requires_cuda
def test_paged_managed_memory():
    from qop import paged

    if not paged.HAS_PAGED:
        pytest.skip("qop._C_cuda not built")
    t = paged.paged_zeros((1024, 1024), dtype=torch.float32, device="cuda")
    assert paged.is_paged(t) and t.is_cuda and torch.count_nonzero(t).item() == 0
    paged.prefetch([t, torch.ones(3, device="cuda")])
    t.add_(1)
    assert t.sum().item() == 1024 * 1024
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(RuntimeError, match="free"):
        paged.paged_empty((free // 4 + 2**28,), dtype=torch.float32, device="cuda")


@pytest.mark.parametrize("multi", [True, False], ids=["multi", "single"])
@pytest.mark.parametrize("bits", [32, 8])
def test_step_given_unorm(bits, multi):
    """With ``unorm`` (the squared norms of whole sharded parameters) the kernel clips with those, as the
    reference does, and leaves the tensor it was given unchanged."""
    problem = Problem(CASES["lamb"], torch.float32, bits)  # lamb
    unorm = torch.rand(len(problem.params), 2, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 50
    unorm[:, 1] *= 1e-3  # a small ||p||: the clip is active
    given = unorm.clone()
    expected = problem.clone()
    problem.run(_step, unorm=unorm, multi=multi, **SMALL)
    expected.run(reference, unorm=unorm)
    assert_same_step(problem, expected)
    assert torch.equal(unorm, given)


# -------------------------------------------------------------------------------- 4-bit and fp8 states
LOWBIT_TABLE = [
    pytest.param(fmt, case, dtype, id=f"{name}-{case}-{str(dtype)[6:]}")
    for name, fmt in LOWBIT_FORMATS.items()
    for case in lowbit_cases(fmt)
    for dtype in (torch.float32, torch.bfloat16)
]


def test_fp8_vanishing_gradients_step_like_the_reference():
    """fp8 second moments far below their block's absmax stay positive (zero-free) in the Triton kernel too."""
    from test_formats import check_vanishing_gradient

    check_vanishing_gradient(lambda args: _step.step(*args, **SMALL), str(DEVICE))


@pytest.mark.parametrize("fmt,case,dtype", LOWBIT_TABLE)
def test_step_lowbit_states(fmt, case, dtype):
    """Packed 4-bit and fp8 states (tails of 128- and 256-blocks, odd byte counts) against the reference."""
    from test_formats import Inputs, code_distance, grads_for

    problem = Inputs(case, fmt, dtype, shapes=[(1,), (3,), (127,), (129,), (257,), (700,)])
    for step in range(2):
        expected = problem.clone()
        grads = grads_for(problem.params, step)
        _step.step(*problem.args(grads), **SMALL)
        reference.step(*expected.args(grads))
        for a, e in zip(problem.params, expected.params):
            assert_params_close(a, e)
        assert [float(s) for s in problem.steps] == [float(s) for s in expected.steps] == [step + 1.0] * 6
        for st, ref in zip(problem.states, expected.states):
            for a, e in zip(st, ref):
                diff = code_distance(a.reshape(-1), e.reshape(-1), fmt)
                assert a.dtype == e.dtype and int(diff.max()) <= 1
                assert (diff > 0).float().mean().item() < 0.02
        for am, ref in zip(problem.absmax, expected.absmax):
            for a, e in zip(am, ref):
                torch.testing.assert_close(a, e, rtol=2e-6, atol=0)
