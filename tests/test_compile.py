"""Compiler and runtime contracts of every qop optimizer (DESIGN.md, "Contracts every change keeps").

* ``torch.compile(fullgraph=True)`` of ``opt.step()`` and of a whole train step (forward, backward, step,
  zero_grad) traces one graph whose results equal eager ones, with lr schedulers attached;
* changing hyper-parameters through schedulers or ``fill_`` does not recompile; plain assignment reaches
  the kernels too (an assigned number: one recompile when it first changes);
* eager steps never synchronise with the host nor allocate state after the first step;
* inductor's graph holds our ops, re-inplaced (snapshots);
* GradScaler skips steps on inf without a sync; CUDA graphs capture a step (``gpu`` tests).

Breadth tests run every optimizer class exported by ``qop.optim`` with dynamo's ``aot_eager`` backend (same
tracing, functionalization and partitioning as inductor, no code generation); inductor runs for a few
representative cases and the snapshots.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import expecttest
import pytest
import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.compile_fx
import torch._inductor.config
from torch.utils._python_dispatch import TorchDispatchMode

import qop
from qop import HP
from qop.optim import QopOptimizer

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

OPTIMIZERS = qop.optim.CLASSES
STEPS = 4
#: numels of the test parameters; none equals the size of any small tensor a step may allocate
#: (hp: 12, percentile history: 100, absmax: 1-2 blocks, gscale: one per tensor)
SIZES = (300, 35, 260)


def _kwargs(cls: type, **over: Any) -> dict[str, Any]:
    """Small constructor arguments for ``cls``: an lr, momentum for SGD/LARS (so that they keep state),
    8-bit states from 256 elements (plain classes run with ``optim_bits=8``, ``*8bit``/``*32bit`` with theirs)."""
    sig = inspect.signature(cls.__init__).parameters
    kw: dict[str, Any] = {"lr": 1e-2}
    if cls.rule == qop.Rule.MOMENTUM:
        kw["momentum"] = 0.9
    if "min_8bit_size" in sig:
        kw["min_8bit_size"] = 256
    if "optim_bits" in sig and not cls.__name__.endswith(("8bit", "32bit")):
        kw["optim_bits"] = 8
    kw.update(over)
    return kw


def _groups(device: str = "cpu", seed: int = 0) -> list[dict[str, Any]]:
    """Two param groups: an 8-bit-sized and a small (32-bit) float32 tensor; a bfloat16 tensor with its own lr."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(n, generator=g) for n in SIZES)
    return [
        {"params": [a.to(device), b.reshape(5, 7).to(device)]},
        {"params": [c.to(device, torch.bfloat16)], "lr": 5e-3},
    ]


def _twins(cls: type, device: str = "cpu", **over: Any) -> tuple[QopOptimizer, QopOptimizer]:
    """Two optimizers of ``cls`` on equal copies of the same parameters."""
    groups = _groups(device)
    twin = [{**g, "params": [p.clone() for p in g["params"]]} for g in groups]
    return cls(groups, **_kwargs(cls, **over)), cls(twin, **_kwargs(cls, **over))


def _params(opt: QopOptimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _set_grads(opts: tuple[QopOptimizer, ...], step: int) -> None:
    """The same pseudo-random gradients for the parameters of every optimizer in ``opts``."""
    for i, ps in enumerate(zip(*(_params(o) for o in opts))):
        g = torch.Generator().manual_seed(1000 * step + i)
        grad = torch.randn(ps[0].shape, generator=g).to(ps[0].device, ps[0].dtype)
        for p in ps:
            p.grad = grad.clone()


def _assert_close(a: QopOptimizer, b: QopOptimizer) -> None:
    """As :func:`_assert_same` to float rounding (GPU kernels may sum norms with atomics, in any order):
    8-bit codes within one code step, step counts and hyper-parameters exactly."""
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert torch.equal(ga["hp"], gb["hp"])
        for pa, pb in zip(ga["params"], gb["params"]):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
            for key, va in a.state[pa].items():
                vb = b.state[pb][key]
                if va.dtype == torch.uint8:
                    assert (va.int() - vb.int()).abs().max() <= 1, key
                elif key == "step":
                    assert torch.equal(va, vb)
                else:
                    torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6)


def _assert_same(a: QopOptimizer, b: QopOptimizer) -> None:
    """Parameters, states and hyper-parameter vectors of ``a`` and ``b`` are bitwise equal."""
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert torch.equal(ga["hp"], gb["hp"])
        for pa, pb in zip(ga["params"], gb["params"]):
            assert torch.equal(pa, pb)
            sa, sb = a.state[pa], b.state[pb]
            assert sa.keys() == sb.keys()
            for key in sa:
                assert torch.equal(sa[key], sb[key]), key


class Backend:
    """A dynamo backend that counts the graphs it compiles (1 = no graph break and no recompile)."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs = 0
        self.targets: list[str] = []  # the call targets of every graph, as strings

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return self.inner(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Every test compiles its own functions: no cache entries or recompile counts carried between tests."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def _no_recompiles() -> Iterator[None]:
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def _scheduler_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "lr_scheduler" in str(w.message) or "optimizer.step()" in str(w.message)]


# --------------------------------------------------------------------------------- 1. opt.step()
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_compiled_step_matches_eager(cls: type) -> None:
    """One graph (no break, no recompile as the lr changes, none after the first step creates the states),
    bitwise eager results, and the scheduler's bookkeeping kept."""
    opt, ref = _twins(cls)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 0.8**s)
    backend = Backend()

    @torch.compile(backend=backend, fullgraph=True)
    def step() -> None:
        opt.step()

    lrs, ref_lrs = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(STEPS):
            _set_grads((opt, ref), i)
            step()
            ref.step()
            assert opt._opt_called
            sched.step()
            ref_sched.step()
            lrs.append([float(x) for x in sched.get_last_lr()])
            ref_lrs.append([float(x) for x in ref_sched.get_last_lr()])
            _assert_same(opt, ref)
    assert backend.graphs == 1
    assert not _scheduler_warnings(caught)
    assert lrs == ref_lrs
    assert not torch._dynamo.utils.counters["graph_break"]
    for p in _params(opt):  # the step counter lives on the device, as a tensor
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.dim() == 0 and step.device == p.device
        assert float(step) == STEPS


def test_compiled_step_with_percentile_clipping_and_overrides() -> None:
    """Percentile clipping (device-side history) and a GlobalOptimManager override (its own bucket)."""
    opt, ref = _twins(qop.optim.Adam8bit, percentile_clipping=5)
    manager = qop.optim.GlobalOptimManager.get_instance()
    for o in (opt, ref):
        manager.override_config(_params(o)[1], "weight_decay", 0.25)
    backend = Backend()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    try:
        for i in range(STEPS):
            _set_grads((opt, ref), i)
            step()
            ref.step()
            _assert_same(opt, ref)
    finally:
        manager.initialize()
    assert backend.graphs == 1
    assert "gnorm_vec" in opt.state[_params(opt)[0]]
    # one percentile_clip per bucket (8-bit, 32-bit, the override's) clips all of the bucket's tensors
    n_clips = sum("qop.percentile_clip" in t for t in backend.targets)
    assert n_clips == sum(t == "qop.step.default" for t in backend.targets) == 3, backend.targets


def _same_seeds(*opts: QopOptimizer, seed: float = 1234.0) -> None:
    """Twins that round stochastically draw different seeds: give every group the same one (in place)."""
    for o in opts:
        for g in o.param_groups:
            g["bf16_sr_seed"].fill_(seed)


def test_compiled_step_with_bfloat16_states_and_stochastic_rounding() -> None:
    """bfloat16 states and stochastic rounding of the bfloat16 group: one graph, no recompile as the lr changes,
    bitwise eager results."""
    opt, ref = _twins(qop.optim.AdamW, optim_bits=16, bf16_stochastic_round=True)
    _same_seeds(opt, ref)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 0.8**s)
    backend = Backend()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for i in range(STEPS):
        _set_grads((opt, ref), i)
        with _no_recompiles() if i else contextlib.nullcontext():
            step()
        ref.step()
        sched.step()
        ref_sched.step()
        _assert_same(opt, ref)
    assert backend.graphs == 1
    assert all(v.dtype == torch.bfloat16 for p in _params(opt) for k, v in opt.state[p].items() if k != "step")


def test_compiled_step_with_params_without_grads() -> None:
    """A parameter without a gradient gets no state; when it gets one, the step recompiles (a guard on
    ``p.grad is None``) and creates its state then, as eager does."""
    opt, ref = _twins(qop.optim.AdamW8bit)
    backend = Backend()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    frozen, ref_frozen = _params(opt)[1], _params(ref)[1]
    for i in range(STEPS):
        _set_grads((opt, ref), i)
        if i < 2:
            frozen.grad = ref_frozen.grad = None
        step()
        ref.step()
        _assert_same(opt, ref)
        assert bool(opt.state[frozen]) == (i >= 2)
    assert backend.graphs == 2


# ---------------------------------------------------------------------------- 2. whole train step
def test_trace_autograd_ops_flag_exists() -> None:
    """The flag that lets dynamo trace ``loss.backward()`` (present in torch 2.11 and 2.13)."""
    assert hasattr(torch._dynamo.config, "trace_autograd_ops")


TRAIN_CASES = [
    ("Adam8bit", "inductor"),
    ("AdamW32bit", "aot_eager"),
    ("SGD8bit", "aot_eager"),
    ("LAMB8bit", "aot_eager"),
    ("AdEMAMix8bit", "aot_eager"),
    ("Lion32bit", "aot_eager"),
]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


@pytest.mark.parametrize(
    "name,backend_name", [c for c in TRAIN_CASES if hasattr(qop.optim, c[0])], ids=lambda c: str(c)
)
def test_compiled_train_step_is_one_graph(name: str, backend_name: str) -> None:
    """forward, loss.backward(), opt.step(), opt.zero_grad() trace as ONE graph, first step included."""
    cls = getattr(qop.optim, name)
    model, ref_model = _model(), _model()
    opt = cls(model.parameters(), **_kwargs(cls))
    ref = cls(ref_model.parameters(), **_kwargs(cls))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=10)
    x, y = torch.randn(8, 16), torch.randn(8, 1)

    def train(m: torch.nn.Module, o: QopOptimizer) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        o.step()
        o.zero_grad()
        return loss.detach()

    backend = Backend(backend_name)
    compiled = torch.compile(train, backend=backend, fullgraph=True)
    exact = backend_name == "aot_eager"  # inductor's forward/backward round differently from eager
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for i in range(STEPS):
            with _no_recompiles() if i else contextlib.nullcontext():
                loss = compiled(model, opt)
            ref_loss = train(ref_model, ref)
            sched.step()
            ref_sched.step()
            torch.testing.assert_close(loss, ref_loss, **tol)
    assert backend.graphs == 1
    assert all(p.grad is None for p in model.parameters())
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **tol)
        if exact:
            for key, v in opt.state[p].items():
                assert torch.equal(v, ref.state[q][key]), key


# --------------------------------------------------------------------- 3. hyper-parameter changes
def _schedulers() -> list[tuple[str, str, Callable[[QopOptimizer], Any], int]]:
    """(id, optimizer, scheduler factory, graphs before the steady state)."""
    return [
        ("lambda", "Adam8bit", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1)), 1),
        ("cosine", "Adam8bit", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7), 1),
        ("step", "Lion8bit", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), 1),
        # OneCycleLR assigns group["betas"] = (momentum, ...) at every step; its constructor's momentum is a
        # Python float (one recompile at step 2), afterwards a tensor (see QopOptimizer._sync_hp)
        ("onecycle", "Adam8bit", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=40), 2),
        ("onecycle-sgd", "SGD8bit", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=40), 2),
        # CyclicLR assigns Python-number momenta: one recompile when the number first changes (it becomes an input)
        ("cyclic", "AdamW8bit", lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-3, 1e-2, step_size_up=5), 2),
    ]


@pytest.mark.parametrize("case", _schedulers(), ids=lambda c: c[0])
def test_schedulers_do_not_recompile(case: tuple[str, str, Callable[[QopOptimizer], Any], int]) -> None:
    _, name, make, warmup = case
    if not hasattr(qop.optim, name):
        pytest.skip(f"qop.optim has no {name}")
    opt, ref = _twins(getattr(qop.optim, name))
    sched, ref_sched = make(opt), make(ref)
    backend = Backend()
    step = torch.compile(lambda: opt.step(), backend=backend, fullgraph=True)
    beta1 = []
    for i in range(24):
        _set_grads((opt, ref), i)
        with _no_recompiles() if i >= warmup else contextlib.nullcontext():
            step()
        ref.step()
        sched.step()
        ref_sched.step()
        _assert_same(opt, ref)
        beta1.append(float(opt.param_groups[0]["hp"][HP.BETA1]))
    assert backend.graphs == warmup
    assert [float(x) for x in sched.get_last_lr()] == [float(x) for x in ref_sched.get_last_lr()]
    if case[0].startswith(("onecycle", "cyclic")):  # the cycled momentum reached the kernels' hp vector
        assert len(set(beta1)) >= 5


def test_in_place_hyperparameter_changes_do_not_recompile() -> None:
    """lr, betas, eps and weight decay filled in place at every step: one graph for 24 steps."""
    opt, ref = _twins(qop.optim.AdamW8bit)
    backend = Backend()
    step = torch.compile(lambda: opt.step(), backend=backend, fullgraph=True)
    for i in range(24):
        for o in (opt, ref):
            g = o.param_groups[0]
            g["lr"].fill_(1e-2 / (i + 1))
            g["weight_decay"].fill_(0.01 * i)
            g["betas"][0].fill_(0.9 - 0.01 * i)
            g["betas"][1].fill_(0.99 + 0.0001 * i)
            g["eps"].fill_(1e-8 * (i + 1))
        _set_grads((opt, ref), i)
        with _no_recompiles() if i else contextlib.nullcontext():
            step()
        ref.step()
        _assert_same(opt, ref)
    assert backend.graphs == 1
    assert float(opt.param_groups[0]["hp"][HP.WEIGHT_DECAY]) == pytest.approx(0.23)


def test_assigned_hyperparameters_reach_the_kernels() -> None:
    """``group[key] = value`` (numbers or tensors) is copied into ``hp`` at the next step, eager or compiled,
    and the key holds its view again.  Compiled: an assigned tensor costs nothing; an assigned number is a
    constant of the first graph, so its first change recompiles once (dynamo then makes it a graph input)."""
    opt, ref = _twins(qop.optim.Adam8bit)
    backend = Backend()
    step = torch.compile(lambda: opt.step(), backend=backend, fullgraph=True)
    graphs_after = {}
    for i in range(24):
        for o in (opt, ref):
            g = o.param_groups[0]
            g["weight_decay"] = 0.01 * i  # a Python number
            g["betas"] = (0.9 - 0.01 * i, g["betas"][1])  # what OneCycleLR/CyclicLR do
            o.param_groups[1]["lr"] = torch.tensor(1e-3 * (i + 1))  # a foreign (CPU) tensor
        _set_grads((opt, ref), i)
        with _no_recompiles() if i >= 2 else contextlib.nullcontext():
            step()
        ref.step()
        graphs_after[i] = backend.graphs
        _assert_same(opt, ref)
        hp = opt.param_groups[0]["hp"]
        assert float(hp[HP.WEIGHT_DECAY]) == pytest.approx(0.01 * i)
        assert float(hp[HP.BETA1]) == pytest.approx(0.9 - 0.01 * i)
        assert float(opt.param_groups[1]["hp"][HP.LR]) == pytest.approx(1e-3 * (i + 1))
        for o in (opt, ref):  # the keys hold views of hp again
            g = o.param_groups[0]
            assert g["weight_decay"]._base is g["hp"] and g["betas"][0]._base is g["hp"]
            assert o.param_groups[1]["lr"]._base is o.param_groups[1]["hp"]
    assert graphs_after[0] == 1 and graphs_after[23] == 2


def test_assigned_hyperparameters_are_validated_in_eager() -> None:
    opt = qop.optim.Adam8bit([torch.randn(300)], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.randn(300)
    opt.param_groups[0]["betas"] = (1.5, 0.99)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        opt.step()
    opt.param_groups[0]["betas"] = (0.9, 0.99)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()


def test_onecycle_state_dict_round_trip() -> None:
    """The momentum bounds turned into tensors by the engine are saved as numbers."""
    opt = qop.optim.Adam8bit([torch.randn(300)], lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    for _ in range(3):
        opt.param_groups[0]["params"][0].grad = torch.randn(300)
        opt.step()
        sched.step()
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    assert all(isinstance(group[k], float) for k in ("max_momentum", "base_momentum", "lr", "weight_decay"))
    assert all(isinstance(b, float) for b in group["betas"])
    other = qop.optim.Adam8bit([torch.randn(300)], lr=1e-3)
    other.load_state_dict(sd)
    hp = other.param_groups[0]["hp"]
    assert float(hp[HP.BETA1]) == pytest.approx(group["betas"][0])  # OneCycleLR's latest momentum
    assert float(hp[HP.LR]) == pytest.approx(group["lr"])
    assert isinstance(other.param_groups[0]["betas"][0], torch.Tensor)


def test_deepcopy_keeps_a_working_optimizer() -> None:
    opt, ref = _twins(qop.optim.Adam8bit)
    for i in range(2):
        _set_grads((opt, ref), i)
        opt.step()
        ref.step()
    clone = copy.deepcopy(opt)
    clone.param_groups[0]["lr"].fill_(0.5)  # a view of the clone's own hp
    assert float(clone.param_groups[0]["hp"][HP.LR]) == 0.5
    assert float(opt.param_groups[0]["hp"][HP.LR]) == pytest.approx(1e-2)
    _set_grads((clone, ref), 2)
    ref.param_groups[0]["lr"].fill_(0.5)
    clone.step()
    ref.step()
    _assert_same(clone, ref)


# -------------------------------------------------------------------------------- 4. no host sync
#: ops that wait for the device (a Python branch on a tensor value dispatches is_nonzero or item)
SYNC_OPS = {
    "_local_scalar_dense",
    "item",
    "tolist",
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "repeat_interleave",
}


class _Recorder(TorchDispatchMode):
    """Records the name of every op dispatched, and the output numels of ops that create tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.created: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        self.ops.append(f"{func.namespace}::{name}")
        inputs = {id(t) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and not func._schema.is_mutable:
                self.created.append((self.ops[-1], t.numel()))
        return out


def _state_tensors(opt: QopOptimizer) -> dict[tuple[int, str], int]:
    return {
        (id(p), k): v.data_ptr() for p, st in opt.state.items() for k, v in st.items() if isinstance(v, torch.Tensor)
    }


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_eager_steps_do_not_sync_or_allocate_state(cls: type) -> None:
    opt, _ = _twins(cls)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    _set_grads((opt,), 0)
    opt.step()  # the first step creates the states
    sched.step()
    before = _state_tensors(opt)
    recorder = _Recorder()
    for i in range(1, STEPS):
        _set_grads((opt,), i)
        with recorder:
            opt.step()
        sched.step()
    assert "qop::step" in recorder.ops
    assert not SYNC_OPS.intersection(op.split("::")[1] for op in recorder.ops), recorder.ops
    assert not [c for c in recorder.created if c[1] in SIZES], recorder.created
    assert _state_tensors(opt) == before


def test_percentile_clipping_and_amp_do_not_sync() -> None:
    opt, _ = _twins(qop.optim.Adam8bit, percentile_clipping=10)
    _set_grads((opt,), 0)
    opt.step()
    recorder = _Recorder()
    opt.grad_scale = torch.tensor(1024.0)
    opt.found_inf = torch.tensor(0.0)
    for i in range(1, STEPS):
        _set_grads((opt,), i)
        with recorder:
            opt.step()
    assert not SYNC_OPS.intersection(op.split("::")[1] for op in recorder.ops), recorder.ops
    assert not [c for c in recorder.created if c[1] in SIZES], recorder.created


@pytest.mark.parametrize(
    "name", ["Adam8bit", "AdamW32bit", "LAMB8bit", "LARS8bit", "AdEMAMix8bit", "Adagrad8bit"], ids=str
)
@pytest.mark.gpu
@requires_cuda
def test_cuda_steps_do_not_sync(name: str) -> None:
    if not hasattr(qop.optim, name):
        pytest.skip(f"qop.optim has no {name}")
    opt, _ = _twins(getattr(qop.optim, name), device="cuda", percentile_clipping=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    _set_grads((opt,), 0)
    opt.step()
    sched.step()
    torch.cuda.synchronize()
    grads = [[torch.randn(p.shape, device="cuda").to(p.dtype) for p in _params(opt)] for _ in range(STEPS)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(STEPS):
            for p, g in zip(_params(opt), grads[i]):
                p.grad = g
            opt.step()
            opt.param_groups[0]["lr"].fill_(1e-3 * i)  # what schedulers do (device fill, no sync)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ 5. CUDA graphs
@pytest.mark.parametrize(
    "name", ["Adam8bit", "Adam32bit", "AdamW8bit", "LAMB8bit", "Lion8bit", "SGD8bit", "AdamW+bf16"], ids=str
)
@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_capture_matches_eager(name: str) -> None:
    """A captured eager step, replayed (with the lr changed in place between replays), equals eager steps
    (``+bf16``: bfloat16 states and stochastic rounding, whose random bits need no host generator)."""
    name, _, extra = name.partition("+")
    if not hasattr(qop.optim, name):
        pytest.skip(f"qop.optim has no {name}")
    over = {"optim_bits": 16, "bf16_stochastic_round": True} if extra == "bf16" else {}
    opt, ref = _twins(getattr(qop.optim, name), device="cuda", **over)
    if over:
        _same_seeds(opt, ref)
    static_grads = [torch.zeros_like(p) for p in _params(opt)]
    for p, g in zip(_params(opt), static_grads):
        p.grad = g
    # warm-up (states, autotuning, launch metadata) on a side stream, as torch.cuda.graph requires
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            _set_grads((ref,), i)
            for g, q in zip(static_grads, _params(ref)):
                g.copy_(q.grad)
            opt.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(2, 2 + STEPS):
        _set_grads((ref,), i)
        for g, q in zip(static_grads, _params(ref)):
            g.copy_(q.grad)
        for o in (opt, ref):
            o.param_groups[0]["lr"].fill_(1e-2 / i)
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    _assert_close(opt, ref)
    assert all(float(opt.state[p]["step"]) == 2 + STEPS for p in _params(opt))


@pytest.mark.parametrize("name", ["Adam8bit", "AdamW32bit", "Lion8bit"], ids=str)
@pytest.mark.gpu
@requires_cuda
def test_reduce_overhead_train_step_runs_as_cuda_graphs(name: str) -> None:
    """``mode="reduce-overhead"`` of a whole train step: one graph, run by CUDA graphs (no skip), eager results."""
    if not hasattr(qop.optim, name):
        pytest.skip(f"qop.optim has no {name}")
    cls = getattr(qop.optim, name)
    model, ref_model = _model().cuda(), _model().cuda()
    opt = cls(model.parameters(), **_kwargs(cls))
    ref = cls(ref_model.parameters(), **_kwargs(cls))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 0.9**s)
    x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 1, device="cuda")

    def train(m: torch.nn.Module, o: QopOptimizer) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        o.step()
        o.zero_grad()
        return loss.detach()

    compiled = torch.compile(train, mode="reduce-overhead", fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for _ in range(STEPS + 2):
            torch.compiler.cudagraph_mark_step_begin()
            loss = compiled(model, opt).clone()
            ref_loss = train(ref_model, ref)
            sched.step()
            ref_sched.step()
            torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    from torch._inductor.cudagraph_trees import get_manager

    assert get_manager(torch.cuda.current_device(), False) is not None  # the step ran as CUDA graphs
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ 6. graph snapshots
def _op_summary(gm: torch.fx.GraphModule) -> str:
    """The call_function targets of a graph with their counts, sorted; a copy_ of a tensor onto itself (the
    write-back of an input mutated in place, which inductor drops) is listed apart from real copies."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if node.target is torch.ops.aten.copy_.default and node.args[0] is node.args[1]:
            name += " (onto itself)"
        counts[name] = counts.get(name, 0) + 1
    return "\n".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def _post_grad_graph(opt: QopOptimizer) -> torch.fx.GraphModule:
    """Inductor's graph of ``opt.step()`` after every post-grad pass (re-inplacing included), CPU tensors."""
    graphs: list[torch.fx.GraphModule] = []
    passes = torch._inductor.compile_fx._recursive_post_grad_passes

    def capture(gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> None:
        passes(gm, *args, **kwargs)
        graphs.append(gm)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    # caches off: a cache hit would skip the passes
    with (
        mock.patch.object(torch._inductor.compile_fx, "_recursive_post_grad_passes", capture),
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        step = torch.compile(lambda: opt.step(), backend="inductor", fullgraph=True)
        for i in range(2):
            _set_grads((opt,), i)
            step()
            sched.step()
    assert len(graphs) == 1
    return graphs[0]


class TestGraphSnapshots(expecttest.TestCase):
    """Our ops, called in place: no auto_functionalized, no clone of params or states, no decomposition.

    Regenerate with ``EXPECTTEST_ACCEPT=1 pytest tests/test_compile.py -k Snapshot``.
    """

    def setUp(self) -> None:
        torch._dynamo.reset()

    def test_adam8bit(self) -> None:
        # one param group: an 8-bit bucket (300 elements) and a 32-bit one (35 elements, under min_8bit_size)
        opt = qop.optim.Adam8bit(_groups()[0]["params"], lr=1e-2, min_8bit_size=256)
        self.assertExpectedInline(
            _op_summary(_post_grad_graph(opt)),
            """\
aten.copy_.default (onto itself) x10
qop.step.default x2""",
        )

    def test_adam32bit(self) -> None:
        opt = qop.optim.Adam32bit(_groups()[0]["params"], lr=1e-2)
        self.assertExpectedInline(
            _op_summary(_post_grad_graph(opt)),
            """\
aten.copy_.default (onto itself) x8
qop.step.default x1""",
        )


# --------------------------------------------------------------------------------- 7. GradScaler
def test_grad_scaler_steps_and_skips_without_sync() -> None:
    """``_step_supports_amp_scaling``: GradScaler hands grad_scale/found_inf to the step; an inf skips it
    (params, states and step counts unchanged); a finite step equals an unscaled one; nothing syncs."""
    assert QopOptimizer._step_supports_amp_scaling is True
    model, ref_model = _model(), _model()
    opt = qop.optim.Adam8bit(model.parameters(), lr=1e-2, min_8bit_size=256)
    ref = qop.optim.Adam8bit(ref_model.parameters(), lr=1e-2, min_8bit_size=256)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    for i in range(STEPS):
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        skip = i == 2
        if skip:
            next(model.parameters()).grad[0, 0] = math.inf
        before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
        params_before = [p.detach().clone() for p in model.parameters()]
        recorder = _Recorder()
        with recorder:
            scaler.step(opt)
        assert not SYNC_OPS.intersection(op.split("::")[1] for op in recorder.ops), recorder.ops
        scale = scaler.get_scale()
        scaler.update()
        if skip:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))
            assert all(torch.equal(v, before[k]) for k, v in opt.state[next(model.parameters())].items())
            assert scaler.get_scale() == scale / 2
            ref_model.zero_grad()
        else:
            ref.step()
            for p, q in zip(model.parameters(), ref_model.parameters()):
                assert torch.equal(p, q)
            ref.zero_grad()
        opt.zero_grad()
    assert float(opt.state[next(model.parameters())]["step"]) == STEPS - 1
