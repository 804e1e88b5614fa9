"""Training resumed from a checkpoint goes on exactly as if it had never stopped.

For every optimizer class exported by ``qop.optim``: train a small model, save ``opt.state_dict()`` (and its lr
scheduler's) with ``torch.save``, load it back with ``torch.load(weights_only=True)`` into a fresh optimizer over a
copy of the model, and continue both with the same data: parameters, 8-bit codes, absmax, 32-bit states, step
counters and hyper-parameter vectors stay bitwise equal. Also with percentile clipping (its gradient-norm history),
``GlobalOptimManager`` overrides, ``map_location``, a rollback of a compiled step, and checkpoints that must be
refused (tensors on the "meta" device, states missing or of mixed formats) without touching the optimizer.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn

import qop
from qop.optim import GlobalOptimManager, QopOptimizer

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

OPTIMIZERS = qop.optim.CLASSES
#: steps before the checkpoint and after it
BEFORE, AFTER = 3, 4
#: tensors of at least this many elements get 8-bit states (the two weights; the biases stay 32-bit)
MIN_8BIT = 256


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (tests/conftest.py)


@pytest.fixture(autouse=True)
def _fresh_manager() -> Iterator[None]:
    """Overrides registered by one test never reach another."""
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


def _kwargs(cls: type, **over: Any) -> dict[str, Any]:
    """Constructor arguments: momentum for SGD/LARS (so they keep state), 8-bit states from ``MIN_8BIT`` elements,
    plain classes with ``optim_bits=8`` (``*8bit``/``*32bit`` classes keep their own)."""
    sig = inspect.signature(cls.__init__).parameters
    kw: dict[str, Any] = {"lr": 1e-2}
    if cls.rule == qop.Rule.MOMENTUM:
        kw["momentum"] = 0.9
    if "min_8bit_size" in sig:
        kw["min_8bit_size"] = MIN_8BIT
    if "optim_bits" in sig and not cls.__name__.endswith(("8bit", "32bit")):
        kw["optim_bits"] = 8
    kw.update(over)
    return kw


def _model() -> nn.Sequential:
    """Weights of 960 and 800 elements (8-bit, each with a partial last block) and two small biases (32-bit)."""
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 20))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _groups(model: nn.Sequential, lr: float | None = None) -> list[dict[str, Any]]:
    """Two param groups, the second with an lr of its own."""
    second: dict[str, Any] = {"params": list(model[2].parameters())}
    if lr is not None:
        second["lr"] = lr
    return [{"params": list(model[0].parameters())}, second]


def _train(model: nn.Module, opt: QopOptimizer, steps: range, sched: Any = None) -> None:
    """One forward, backward and step per index of ``steps``, on data drawn from the index alone."""
    for i in steps:
        gen = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(16, 24, generator=gen), torch.randn(16, 20, generator=gen)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def _save_load(obj: Any, map_location: Any = None) -> Any:
    """``torch.save`` to memory, then ``torch.load`` with ``weights_only=True`` (what checkpoints should allow)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True, map_location=map_location)


def _states(opt: QopOptimizer, model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The optimizer's state of each of the model's parameters, in the model's order."""
    return [opt.state[p] for p in model.parameters()]


def _assert_same(a: QopOptimizer, model_a: nn.Module, b: QopOptimizer, model_b: nn.Module) -> None:
    """Parameters, every state tensor (dtype and device too) and the hyper-parameter vectors are bitwise equal."""
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    for sa, sb in zip(_states(a, model_a), _states(b, model_b)):
        assert sa.keys() == sb.keys()
        for key, va in sa.items():
            vb = sb[key]
            assert va.dtype == vb.dtype and va.device == vb.device, key
            assert torch.equal(va, vb), key
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert torch.equal(ga["hp"], gb["hp"])
    assert a.state_dict()["param_groups"] == b.state_dict()["param_groups"]


def _uses_8bit(cls: type) -> bool:
    """Whether ``cls`` (as :func:`_kwargs` builds it) keeps low-bit (8-bit, 4-bit, fp8) states for the weights."""
    return not cls.__name__.endswith("32bit")


# --------------------------------------------------------------------------------- 1. every optimizer
def _check_resume(cls: type, **over: Any) -> None:
    """Save after ``BEFORE`` steps, resume into a fresh optimizer (built with another lr) and its scheduler, then
    ``AFTER`` more steps on both: bitwise the same training."""
    model = _model()
    opt = cls(_groups(model, lr=5e-3), **_kwargs(cls, **over))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    _train(model, opt, range(BEFORE), sched)
    formats = {v.dtype for st in _states(opt, model) for k, v in st.items() if k.startswith("state")}
    low = torch.float8_e4m3fn if cls.__name__.endswith("Fp8") else torch.uint8
    assert formats == ({low, torch.float32} if _uses_8bit(cls) else {torch.float32})

    ckpt = _save_load({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    resumed_model = _model()
    resumed_model.load_state_dict(ckpt["model"])
    resumed = cls(_groups(resumed_model, lr=0.5), **_kwargs(cls, **{**over, "lr": 0.25}))
    resumed_sched = torch.optim.lr_scheduler.LambdaLR(resumed, lambda s: 0.9**s)
    resumed.load_state_dict(ckpt["opt"])
    resumed_sched.load_state_dict(ckpt["sched"])
    _assert_same(opt, model, resumed, resumed_model)
    for st in _states(resumed, resumed_model):
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and float(st["step"]) == BEFORE

    _train(model, opt, range(BEFORE, BEFORE + AFTER), sched)
    _train(resumed_model, resumed, range(BEFORE, BEFORE + AFTER), resumed_sched)
    _assert_same(opt, model, resumed, resumed_model)
    assert float(_states(resumed, resumed_model)[0]["step"]) == BEFORE + AFTER
    assert resumed_sched.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_resume_is_bit_identical(cls: type) -> None:
    """Every optimizer class, at its defaults (SGD/LARS with momentum)."""
    _check_resume(cls)


#: options that add a state or make the rule depend on the step count (which must round-trip exactly)
OPTIONS = [
    ("Adam8bit-amsgrad", "Adam8bit", {"amsgrad": True, "weight_decay": 0.1}),
    ("SGD8bit-nesterov", "SGD8bit", {"nesterov": True, "weight_decay": 0.1}),
    ("LARS8bit-dampening", "LARS8bit", {"dampening": 0.5, "max_unorm": 0.01}),
    ("AdEMAMix8bit-warmups", "AdEMAMix8bit", {"t_alpha": 5, "t_beta3": 5}),
    ("Adagrad8bit-decay-and-init", "Adagrad8bit", {"lr_decay": 0.1, "initial_accumulator_value": 0.5}),
    ("LAMB8bit-weight-decay", "LAMB8bit", {"weight_decay": 0.1}),
]


@pytest.mark.parametrize("name,over", [(n, o) for _, n, o in OPTIONS], ids=[i for i, _, _ in OPTIONS])
def test_resume_with_options(name: str, over: dict[str, Any]) -> None:
    """Options that add a state (amsgrad's max) or depend on the step (AdEMAMix warm-ups, Adagrad's lr decay)."""
    _check_resume(getattr(qop.optim, name), **over)


def test_resume_without_serialization_shares_nothing() -> None:
    """``load_state_dict(other.state_dict())`` copies: stepping the source afterwards leaves the loaded one alone
    (shared tensors would be updated twice per step and drift apart from a third, independent run)."""
    cls = qop.optim.Adam8bit
    models = [_model() for _ in range(3)]
    opts = [cls(_groups(m), **_kwargs(cls)) for m in models]
    for m, o in zip(models, opts):
        _train(m, o, range(BEFORE))
    opts[1].load_state_dict(opts[0].state_dict())
    for m, o in zip(models, opts):
        _train(m, o, range(BEFORE, BEFORE + AFTER))
    _assert_same(opts[0], models[0], opts[1], models[1])
    _assert_same(opts[2], models[2], opts[1], models[1])


# ------------------------------------------------------------------- 2. clipping history, overrides
def test_resume_keeps_the_percentile_clipping_history() -> None:
    """Adam8bit with ``percentile_clipping=5``: the gradient-norm history round-trips and steers the resumed steps
    as it does the original's; a resume that lost it (history reset) would train differently."""
    cls = qop.optim.Adam8bit
    model = _model()
    opt = cls(_groups(model), **_kwargs(cls, percentile_clipping=5))
    _train(model, opt, range(BEFORE))
    sd = _save_load(opt.state_dict())
    for st in sd["state"].values():  # a partly filled history: BEFORE norms, the rest unfilled
        assert st["gnorm_vec"].dtype == torch.float32
        assert int(torch.isfinite(st["gnorm_vec"]).sum()) == BEFORE

    resumed_model, blank_model = _model(), _model()
    resumed_model.load_state_dict(model.state_dict())
    blank_model.load_state_dict(model.state_dict())
    resumed = cls(_groups(resumed_model), **_kwargs(cls, percentile_clipping=5))
    resumed.load_state_dict(sd)
    blank = cls(_groups(blank_model), **_kwargs(cls, percentile_clipping=5))
    blank_sd = copy.deepcopy(sd)
    for st in blank_sd["state"].values():
        st["gnorm_vec"].fill_(math.inf)
    blank.load_state_dict(blank_sd)
    _assert_same(opt, model, resumed, resumed_model)

    for m, o in ((model, opt), (resumed_model, resumed), (blank_model, blank)):
        _train(m, o, range(BEFORE, BEFORE + AFTER))
    _assert_same(opt, model, resumed, resumed_model)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), blank_model.parameters()))


@pytest.mark.parametrize("register_again", [True, False], ids=["registered-again", "not-registered-again"])
def test_resume_with_a_32bit_override(register_again: bool) -> None:
    """A weight kept at 32 bits by ``GlobalOptimManager`` (and one with its own weight decay) resumes bitwise when
    the override is registered again. Without it the optimizer's own format (8-bit) decides: the loaded 32-bit
    state is quantized, and training continues within 8-bit precision."""
    cls = qop.optim.AdamW8bit
    manager = GlobalOptimManager.get_instance()
    model = _model()
    manager.override_config(model[0].weight, "optim_bits", 32)
    manager.override_config(model[2].weight, "weight_decay", 0.3)
    opt = cls(_groups(model), **_kwargs(cls))
    _train(model, opt, range(BEFORE))
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32
    assert opt.state[model[2].weight]["state1"].dtype == torch.uint8
    sd = _save_load(opt.state_dict())

    resumed_model = _model()
    resumed_model.load_state_dict(model.state_dict())
    manager.override_config(resumed_model[2].weight, "weight_decay", 0.3)  # a hyper-parameter: not in checkpoints
    if register_again:
        manager.override_config(resumed_model[0].weight, "optim_bits", 32)
    resumed = cls(_groups(resumed_model), **_kwargs(cls))
    resumed.load_state_dict(sd)
    _train(model, opt, range(BEFORE, BEFORE + AFTER))
    _train(resumed_model, resumed, range(BEFORE, BEFORE + AFTER))
    if register_again:
        _assert_same(opt, model, resumed, resumed_model)
        assert resumed.state[resumed_model[0].weight]["state1"].dtype == torch.float32
        return
    assert resumed.state[resumed_model[0].weight]["state1"].dtype == torch.uint8
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, atol=AFTER * 2e-3, rtol=0)


# --------------------------------------------------------------------------------- 3. devices
@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage],
    ids=["str", "device", "dict", "callable"],
)
def test_resume_with_map_location(map_location: Any) -> None:
    """A CPU checkpoint loaded with each form of ``map_location`` resumes bitwise on the CPU."""
    cls = qop.optim.Lion8bit
    model = _model()
    opt = cls(_groups(model), **_kwargs(cls))
    _train(model, opt, range(BEFORE))
    sd = _save_load(opt.state_dict(), map_location=map_location)
    resumed_model = copy.deepcopy(model)
    resumed = cls(_groups(resumed_model), **_kwargs(cls))
    resumed.load_state_dict(sd)
    _train(model, opt, range(BEFORE, BEFORE + AFTER))
    _train(resumed_model, resumed, range(BEFORE, BEFORE + AFTER))
    _assert_same(opt, model, resumed, resumed_model)


@requires_cuda
@pytest.mark.gpu
def test_resume_after_moving_the_model_to_cuda() -> None:
    """A checkpoint saved on the CPU resumes a model moved to CUDA, whether ``torch.load`` maps it there or leaves it
    on the CPU (the optimizer then moves each state to its parameter's device): the first CUDA step follows the CPU
    one (params to float rounding, 8-bit codes within one step), and both resumes train on bitwise alike."""
    cls = qop.optim.Adam8bit
    model = _model()
    opt = cls(_groups(model), **_kwargs(cls))
    _train(model, opt, range(BEFORE))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    models, opts = [], []
    for map_location in ("cuda", "cpu"):
        buf.seek(0)
        sd = torch.load(buf, weights_only=True, map_location=map_location)
        moved = copy.deepcopy(model).cuda()
        resumed = cls(_groups(moved), **_kwargs(cls))
        resumed.load_state_dict(sd)
        for st in _states(resumed, moved):
            assert all(v.device.type == "cuda" for v in st.values())
        models.append(moved)
        opts.append(resumed)

    for i in range(BEFORE, BEFORE + AFTER):  # the same gradients on every device
        for p, *qs in zip(model.parameters(), *(m.parameters() for m in models)):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * i + p.numel()))
            p.grad = g
            for q in qs:
                q.grad = g.cuda()
        for o in (opt, *opts):
            o.step()
        if i == BEFORE:
            for p, q in zip(model.parameters(), models[0].parameters()):
                torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6)
                for key, v in opt.state[p].items():
                    w = opts[0].state[q][key].cpu()
                    if v.dtype == torch.uint8:
                        assert (v.int() - w.int()).abs().max() <= 1, key
                    else:
                        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-7)
    _assert_same(opts[0], models[0], opts[1], models[1])


# ------------------------------------------------------------------------------- 4. compiled steps
def test_rollback_of_a_compiled_step() -> None:
    """A compiled ``opt.step()`` rolled back to a checkpoint (loaded into the same optimizer) goes on with the
    loaded states, not the ones its graph was traced with: it equals an eager run that did the same."""
    cls = qop.optim.Adam8bit
    torch._dynamo.reset()
    models = [_model(), _model()]
    opts = [cls(_groups(m), **_kwargs(cls)) for m in models]
    compiled = torch.compile(opts[0].step, backend="aot_eager", fullgraph=True)
    steps: list[Callable[[], Any]] = [compiled, opts[1].step]

    def run(indices: range) -> None:
        for i in indices:
            for m, step in zip(models, steps):
                gen = torch.Generator().manual_seed(100 + i)
                x, y = torch.randn(16, 24, generator=gen), torch.randn(16, 20, generator=gen)
                nn.functional.mse_loss(m(x), y).backward()
                step()
                for p in m.parameters():
                    p.grad = None

    try:
        run(range(BEFORE))
        ckpts = [_save_load({"model": m.state_dict(), "opt": o.state_dict()}) for m, o in zip(models, opts)]
        run(range(BEFORE, BEFORE + AFTER))
        for m, o, ckpt in zip(models, opts, ckpts):
            m.load_state_dict(ckpt["model"])
            o.load_state_dict(ckpt["opt"])
        assert float(opts[0].state[models[0][0].weight]["step"]) == BEFORE
        run(range(BEFORE, BEFORE + AFTER))
        _assert_same(opts[0], models[0], opts[1], models[1])
        assert float(opts[0].state[models[0][0].weight]["step"]) == BEFORE + AFTER
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------- 5. refused checkpoints
def _trained(cls: type = qop.optim.Adam8bit, **over: Any) -> tuple[nn.Sequential, QopOptimizer]:
    """A model and its optimizer after ``BEFORE`` steps (states created, history recorded)."""
    model = _model()
    opt = cls(_groups(model), **_kwargs(cls, **over))
    _train(model, opt, range(BEFORE))
    return model, opt


def _snapshot(opt: QopOptimizer) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Copies of every state tensor and hyper-parameter vector, to check later that nothing was written."""
    states = [{k: v.clone() for k, v in st.items()} for st in opt.state.values()]
    return states, [g["hp"].clone() for g in opt.param_groups]


def _assert_unchanged(opt: QopOptimizer, before: tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]) -> None:
    """``opt`` holds what :func:`_snapshot` recorded: a refused load wrote nothing."""
    states, hps = before
    assert len(opt.state) == len(states)
    for st, old in zip(opt.state.values(), states):
        assert st.keys() == old.keys()
        for key, v in st.items():
            assert v.device == old[key].device and torch.equal(v, old[key]), key
    for g, hp in zip(opt.param_groups, hps):
        assert torch.equal(g["hp"], hp)


def _meta_checkpoint() -> dict[str, Any]:
    """A trained Adam8bit's state dict loaded with ``map_location="meta"``: shapes and dtypes, no data."""
    _, source = _trained(lr=3e-2)
    sd = _save_load(source.state_dict(), map_location="meta")
    assert all(v.device.type == "meta" for st in sd["state"].values() for v in st.values())
    return sd


def test_meta_checkpoint_leaves_the_optimizer_unchanged() -> None:
    """Loading a checkpoint whose tensors are on the "meta" device fails before it writes anything: the optimizer
    keeps its states and hyper-parameters and trains on as if the load had not been tried."""
    sd = _meta_checkpoint()
    model, opt = _trained()
    twin_model, twin = _trained()
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="meta"):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, before)
    _train(model, opt, range(BEFORE, BEFORE + AFTER))
    _train(twin_model, twin, range(BEFORE, BEFORE + AFTER))
    _assert_same(opt, model, twin, twin_model)


def test_meta_checkpoint_is_refused_with_a_clear_error() -> None:
    """The refusal is the engine's own ValueError, naming the meta device."""
    sd = _meta_checkpoint()
    _, opt = _trained()
    with pytest.raises(ValueError, match=r"^qop: .*meta"):
        opt.load_state_dict(sd)


def _drop_state2(sd: dict[str, Any]) -> None:
    """Adam's second moment lost (as in a checkpoint written by a one-state optimizer)."""
    for st in sd["state"].values():
        st.pop("state2")
        st.pop("absmax2", None)


def _state2_as_float32(sd: dict[str, Any]) -> None:
    """8-bit first moments beside a 32-bit second moment: formats one bucket cannot hold."""
    for st in sd["state"].values():
        if st["state2"].dtype == torch.uint8:  # 8-bit state1 with a float32 state2
            st["state2"] = torch.zeros(st["state2"].shape, dtype=torch.float32)
            st.pop("absmax2")


def _from_lion(sd: dict[str, Any]) -> None:
    """The states of a Lion8bit (one moment) under Adam8bit's param groups."""
    _, lion = _trained(qop.optim.Lion8bit)
    lion_sd = _save_load(lion.state_dict())
    sd["state"] = lion_sd["state"]


BROKEN = [("missing-state2", _drop_state2), ("mixed-formats", _state2_as_float32), ("lion-into-adam", _from_lion)]


@pytest.mark.parametrize("break_it", [b for _, b in BROKEN], ids=[n for n, _ in BROKEN])
def test_checkpoint_with_unusable_states_is_refused_at_load(break_it: Callable[[dict[str, Any]], None]) -> None:
    """An Adam8bit checkpoint whose states do not fit the rule (two moments in one format, 8-bit states with their
    absmax) is refused by ``load_state_dict`` with a ValueError naming the entry, and nothing is written."""
    model, opt = _trained()
    sd = _save_load(opt.state_dict())
    break_it(sd)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"^qop: .*state2"):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, before)
    _train(model, opt, range(BEFORE, BEFORE + 1))
