"""A step or a load that fails changes nothing; hyper-parameters survive every way torch touches them.

* a step that raises (a sparse, misshapen or mistyped gradient, a bad assigned hyper-parameter, a bad
  override, in any group) leaves params, states, steps and hyper-parameters exactly as they were;
* ``load_state_dict`` validates the whole state dict before it changes anything, names the parameter and
  key of what it refuses, and loads the legitimate variants (empty entries, other state formats);
* lr set through floats, tensors, in-place writes, schedulers, DCP's state-dict helpers and
  ``add_param_group`` is the lr the kernels use;
* torch.optim's state-dict hooks run, and see what ``state_dict()`` returns;
* arguments that would have no effect are refused.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import qop
from qop import HP
from qop.optim import QopOptimizer

OPTIMIZERS = qop.optim.CLASSES
#: the classes the reliability reports name, and a 32-bit one
FAMILY = [
    "Adam8bit",
    "AdamW8bit",
    "LAMB8bit",
    "AdEMAMix8bit",
    "Lion8bit",
    "SGD8bit",
    "Adam32bit",
    "Adagrad8bit",
    "RMSprop8bit",
    "LARS8bit",
]


def make(name: str, params: Any, **kw: Any) -> QopOptimizer:
    """``name`` over ``params`` with a small lr, momentum for SGD/LARS (so they keep state), 8-bit from 256."""
    cls = getattr(qop.optim, name)
    sig = inspect.signature(cls.__init__).parameters
    args: dict[str, Any] = {"lr": 1e-2}
    if "momentum" in sig and cls.rule == qop.Rule.MOMENTUM:
        args["momentum"] = 0.9
    if "min_8bit_size" in sig:
        args["min_8bit_size"] = 256
    return cls(params, **{**args, **kw})


def snapshot(opt: QopOptimizer) -> Any:
    """Everything a step or a load may change, deep-copied."""
    groups = [
        {k: (v.clone() if isinstance(v, Tensor) else copy.copy(v)) for k, v in g.items() if k != "params"}
        for g in opt.param_groups
    ]
    params = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    state = {
        id(p): {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()} for p, st in opt.state.items()
    }
    return groups, params, state


def assert_unchanged(before: Any, opt: QopOptimizer) -> None:
    groups, params, state = before
    now_groups, now_params, now_state = snapshot(opt)
    for a, b in zip(params, now_params):
        for x, y in zip(a, b):
            assert torch.equal(x, y), "a parameter changed"
    assert set(state) == set(now_state), "states were created or dropped"
    for pid, st in state.items():
        assert set(st) == set(now_state[pid])
        for k, v in st.items():
            w = now_state[pid][k]
            assert torch.equal(v, w) if isinstance(v, Tensor) else v == w, k
    for g, h in zip(groups, now_groups):
        assert torch.equal(g["hp"], h["hp"]), "hyper-parameters changed"
        assert set(g) == set(h)


class Net(nn.Module):
    """A dense Linear and an Embedding that can produce sparse gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 24)
        self.emb = nn.Embedding(40, 32, sparse=True)

    def forward(self, idx: Tensor) -> Tensor:
        return self.lin(self.emb(idx)).square().sum()


def _backward(net: Net, sparse: bool, seed: int = 0) -> None:
    torch.manual_seed(seed)
    net.emb.sparse = sparse
    net(torch.randint(0, 40, (8,))).backward()


# ------------------------------------------------------------------------------- 1. atomic steps
@pytest.mark.parametrize("name", FAMILY)
def test_a_sparse_gradient_changes_nothing(name: str) -> None:
    torch.manual_seed(0)
    net = Net()
    # the bias (24 elements) keeps 32-bit states, the rest 8-bit: two buckets, the sparse one second
    opt = make(name, [{"params": [net.lin.weight, net.lin.bias]}, {"params": [net.emb.weight]}])
    _backward(net, sparse=False)
    opt.step()
    opt.zero_grad()
    _backward(net, sparse=True, seed=1)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\].*dense gradients"):
        opt.step()
    assert_unchanged(before, opt)


@pytest.mark.parametrize("name", FAMILY)
def test_a_sparse_gradient_at_the_first_step_creates_no_state(name: str) -> None:
    net = Net()
    opt = make(name, net.parameters())
    _backward(net, sparse=True)
    with pytest.raises(RuntimeError, match="dense gradients"):
        opt.step()
    assert not any(opt.state.values())
    net.emb.weight.grad = None
    opt.step()  # the optimizer still works


#: gradients torch's ``.grad`` setter refuses but ``.grad.data`` (or ``grad_dtype=None``) lets through
BAD_GRADS: list[tuple[str, Callable[[Tensor], Tensor], type, str]] = [
    ("shape", lambda p: torch.zeros(p.numel() + 1), RuntimeError, "shape"),
    ("float64", lambda p: torch.zeros_like(p, dtype=torch.float64), RuntimeError, "float64"),
    ("bf16", lambda p: torch.zeros_like(p, dtype=torch.bfloat16), RuntimeError, "bfloat16"),
]


@pytest.mark.parametrize("case", BAD_GRADS, ids=lambda c: c[0])
@pytest.mark.parametrize("name", ["Adam8bit", "Lion8bit", "Adam32bit"])
def test_a_bad_gradient_in_a_later_group_changes_nothing(name: str, case: tuple) -> None:
    _, bad, exc, match = case
    torch.manual_seed(0)
    a, b, c = (
        torch.randn(300, requires_grad=True),
        torch.randn(20, requires_grad=True),
        torch.randn(500, requires_grad=True),
    )
    opt = make(name, [{"params": [a, b]}, {"params": [c]}])
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt.step()
    for p in (a, b):
        p.grad = torch.randn_like(p)
    c.grad = torch.zeros_like(c)
    c.grad.data = bad(c)
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step()
    assert_unchanged(before, opt)


def test_a_bad_assigned_hyperparameter_in_a_later_group_changes_nothing() -> None:
    a, b = torch.randn(300), torch.randn(300)
    opt = make("AdamW8bit", [{"params": [a]}, {"params": [b]}])
    a.grad, b.grad = torch.randn(300), torch.randn(300)
    opt.step()
    opt.param_groups[0]["lr"] = 0.5  # valid, assigned to the first group
    opt.param_groups[1]["betas"] = (0.9, 1.5)  # invalid, in the second
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.step()
    assert_unchanged(before, opt)
    assert opt.param_groups[0]["lr"] == 0.5  # still assigned, copied at the next good step
    opt.param_groups[1]["betas"] = (0.9, 0.99)
    opt.step()
    assert float(opt.param_groups[0]["hp"][HP.LR]) == 0.5


def test_a_bad_override_changes_nothing() -> None:
    a, b = torch.randn(300), torch.randn(300)
    opt = make("Adam8bit", [a, b])
    manager = qop.optim.GlobalOptimManager.get_instance()
    try:
        manager.override_config(b, "lr", "fast")
        a.grad, b.grad = torch.randn(300), torch.randn(300)
        with pytest.raises(ValueError, match=r"override of param_groups\[0\]\['params'\]\[1\]"):
            opt.step()
        assert not any(opt.state.values())
    finally:
        manager.initialize()


def test_bad_amp_arguments_change_nothing() -> None:
    a = torch.randn(300)
    opt = make("Adam8bit", [a])
    a.grad = torch.randn(300)
    opt.step()
    before = snapshot(opt)
    opt.found_inf = torch.zeros(2)
    with pytest.raises(ValueError, match="found_inf"):
        opt.step()
    assert_unchanged(before, opt)


# ------------------------------------------------------------------------- 2. hyper-parameters
def _lr_used(opt: QopOptimizer, group: int = 0) -> float:
    return float(opt.param_groups[group]["hp"][HP.LR])


def test_dcp_state_dict_helpers_keep_lr() -> None:
    """DCP's helpers set lr to 0 around a step that creates the states, then put the old lr object back."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    model = nn.Linear(32, 32)
    opt = qop.optim.Adam8bit(model.parameters(), lr=1e-3, min_8bit_size=256)
    sd = get_optimizer_state_dict(model, opt)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-3)
    assert next(iter(sd["param_groups"]))["lr"] == pytest.approx(1e-3)
    w = model.weight.detach().clone()
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    assert _lr_used(opt) == pytest.approx(1e-3)
    assert (model.weight - w).abs().max() > 1e-4  # it trains
    # and through set_optimizer_state_dict into a fresh optimizer
    other = qop.optim.Adam8bit(model.parameters(), lr=0.5, min_8bit_size=256)
    set_optimizer_state_dict(model, other, get_optimizer_state_dict(model, opt))
    assert float(other.param_groups[0]["lr"]) == pytest.approx(1e-3)
    for p in model.parameters():
        for k in ("state1", "state2", "step"):
            assert torch.equal(other.state[p][k], opt.state[p][k])
    model(torch.randn(4, 32)).sum().backward()
    other.step()
    assert _lr_used(other) == pytest.approx(1e-3)


def test_a_displaced_view_keeps_its_value() -> None:
    a = torch.randn(300)
    opt = make("Adam8bit", [a])
    kept = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = torch.tensor(0.0)
    a.grad = torch.randn(300)
    opt.step()
    assert _lr_used(opt) == 0.0 and float(kept) == pytest.approx(1e-2)
    opt.param_groups[0]["lr"] = kept
    opt.step()
    assert _lr_used(opt) == pytest.approx(1e-2)
    assert opt.param_groups[0]["lr"]._base is opt.param_groups[0]["hp"]  # a view again, filled in place later
    opt.param_groups[0]["lr"].fill_(3e-3)
    assert _lr_used(opt) == pytest.approx(3e-3)


ASSIGNED = [
    ("float", lambda i: 1e-3 * (i + 1)),
    ("cpu-0d", lambda i: torch.tensor(1e-3 * (i + 1))),
    ("cpu-1elem", lambda i: torch.tensor([1e-3 * (i + 1)])),
    ("float64", lambda i: torch.tensor(1e-3 * (i + 1), dtype=torch.float64)),
    ("int", lambda i: i % 2),
]


@pytest.mark.parametrize("case", ASSIGNED, ids=lambda c: c[0])
def test_assigned_lr_reaches_the_kernels(case: tuple[str, Callable[[int], Any]]) -> None:
    _, value = case
    a = torch.randn(300)
    opt = make("Adam8bit", [a])
    for i in range(4):
        opt.param_groups[0]["lr"] = value(i)
        a.grad = torch.randn(300)
        opt.step()
        assert _lr_used(opt) == pytest.approx(float(torch.as_tensor(value(i))))
    opt.param_groups[0]["lr"] = torch.tensor([1.0, 2.0])
    before = snapshot(opt)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert_unchanged(before, opt)


def _plateau(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5)


SCHEDULERS: list[tuple[str, Callable[[torch.optim.Optimizer], Any]]] = [
    ("plateau", _plateau),
    ("onecycle", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30)),
    (
        "sequential",
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3), torch.optim.lr_scheduler.ExponentialLR(o, 0.8)],
            milestones=[3],
        ),
    ),
    (
        "chained",
        lambda o: torch.optim.lr_scheduler.ChainedScheduler(
            [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=4), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)]
        ),
    ),
]


@pytest.mark.parametrize("case", SCHEDULERS, ids=lambda c: c[0])
def test_schedulers_drive_the_kernels_like_torch_optim(case: tuple[str, Callable]) -> None:
    """The lr (and OneCycleLR's momentum) a scheduler sets for torch.optim.AdamW is the one qop's kernels read,
    including for a group added after some steps."""
    _, factory = case
    a, b = torch.randn(300), torch.randn(300)
    ta, tb = a.clone(), b.clone()
    opt = make("AdamW8bit", [a], lr=1e-2)
    ref = torch.optim.AdamW([ta], lr=1e-2)
    opt.add_param_group({"params": [b], "lr": 2e-2})
    ref.add_param_group({"params": [tb], "lr": 2e-2})
    sched, ref_sched = factory(opt), factory(ref)
    used = []
    for _ in range(12):
        for p, q in ((a, ta), (b, tb)):
            p.grad = torch.randn(300)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for g, (group, ref_group) in enumerate(zip(opt.param_groups, ref.param_groups)):
            assert _lr_used(opt, g) == pytest.approx(float(ref_group["lr"]), rel=1e-6)
            assert float(group["hp"][HP.BETA1]) == pytest.approx(ref_group["betas"][0], rel=1e-6)
        used.append(_lr_used(opt))
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)
            ref_sched.step(1.0)
        else:
            sched.step()
            ref_sched.step()
    assert len(set(used)) >= 3  # the scheduler did change the lr


# ------------------------------------------------------------------------------- 3. state dicts
def _trained(name: str = "Adam8bit", steps: int = 2, **kw: Any) -> tuple[QopOptimizer, list[Tensor]]:
    torch.manual_seed(0)
    params = [torch.randn(300), torch.randn(20), torch.randn(17, 31)]
    opt = make(name, params, **kw)
    for i in range(steps):
        torch.manual_seed(i)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, params


def _corrupt(sd: dict, fn: Callable[[dict], None]) -> dict:
    sd = copy.deepcopy(sd)
    fn(sd)
    return sd


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def fn(sd: dict) -> None:
        d = sd
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value(d.get(path[-1])) if callable(value) else value

    return fn


def _delete(*path: Any) -> Callable[[dict], None]:
    def fn(sd: dict) -> None:
        d = sd
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]

    return fn


def _lion_state_dict(sd: dict) -> None:
    lion, _ = _trained("Lion8bit")
    sd.clear()
    sd.update(lion.state_dict())


CORRUPTIONS: list[tuple[str, Callable[[dict], None], str]] = [
    ("drop-state2", _delete("state", 0, "state2"), r"\[0\] lacks 'state2'"),
    ("drop-absmax1", _delete("state", 0, "absmax1"), r"\[0\] lacks 'absmax1'"),
    ("drop-step", _delete("state", 2, "step"), r"\[2\] has states but no 'step'"),
    ("codes-as-float", _set(("state", 0, "state1"), lambda t: t.float()), r"\[0\] has 'absmax1' but 'state1'"),
    ("float-as-codes", _set(("state", 1, "state1"), lambda t: t.to(torch.uint8)), r"\[1\] lacks 'absmax1'"),
    ("state-float64", _set(("state", 1, "state2"), lambda t: t.double()), r"\[1\]\['state2'\] must be float32"),
    ("state-numel", _set(("state", 2, "state2"), lambda t: t.flatten()[:-1].contiguous()), "elements"),
    ("absmax-count", _set(("state", 0, "absmax2"), lambda t: t[:1].clone()), r"\['absmax2'\] must be float32 with 2"),
    ("absmax-fp16", _set(("state", 0, "absmax2"), lambda t: t.half()), r"\['absmax2'\] must be float32"),
    ("absmax-nan", _set(("state", 0, "absmax1"), lambda t: t.fill_(float("nan"))), "finite"),
    ("absmax-negative", _set(("state", 0, "absmax1"), lambda t: -t), ">= 0"),
    ("extra-state3", _set(("state", 0, "state3"), lambda _: torch.zeros(300)), r"has 'state3'"),
    ("unknown-key", _set(("state", 0, "exp_avg"), lambda _: torch.zeros(300)), "unknown key"),
    ("step-negative", _set(("state", 0, "step"), lambda _: torch.tensor(-1.0)), "whole number >= 0"),
    ("step-nan", _set(("state", 0, "step"), lambda _: torch.tensor(float("nan"))), "whole number >= 0"),
    ("step-fraction", _set(("state", 0, "step"), lambda _: 2.5), "whole number >= 0"),
    ("step-vector", _set(("state", 0, "step"), lambda _: torch.zeros(2)), "must be a number"),
    ("step-string", _set(("state", 0, "step"), lambda _: "2"), "must be a number"),
    ("meta-tensor", _set(("state", 1, "state1"), lambda t: t.to("meta")), "holds no data"),
    ("not-a-dict", _set(("state", 1), lambda _: [1, 2]), "must be a dict"),
    ("unknown-id", _set(("state", 7), lambda _: {}), "unknown parameter id 7"),
    ("truncated-groups", _set(("param_groups",), lambda g: []), "0 param groups"),
    ("truncated-params", _set(("param_groups", 0, "params"), lambda ids: ids[:-1]), "has 2 params"),
    ("repeated-id", _set(("param_groups", 0, "params"), lambda ids: [ids[0], ids[0], ids[2]]), "repeated"),
    ("lr-string", _set(("param_groups", 0, "lr"), "fast"), "lr must be a number"),
    ("lr-negative", _set(("param_groups", 0, "lr"), -1.0), "lr must be >= 0"),
    ("betas-short", _set(("param_groups", 0, "betas"), (0.9,)), "betas must be a tuple of 2"),
    ("gnorm-length", _set(("state", 0, "gnorm_vec"), lambda _: torch.zeros(7)), "gnorm_vec"),
    ("lion-into-adam", _lion_state_dict, "lacks 'state2'"),
    ("no-state", _delete("state"), "must have a dict 'state'"),
]


@pytest.mark.parametrize("case", CORRUPTIONS, ids=lambda c: c[0])
def test_a_corrupted_state_dict_is_refused_and_changes_nothing(case: tuple) -> None:
    _, corrupt, match = case
    opt, _ = _trained()
    sd = _corrupt(opt.state_dict(), corrupt)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(before, opt)


def test_empty_entries_load() -> None:
    """Reading ``opt.state[p]`` of a parameter that has not stepped creates an empty entry (a defaultdict)."""
    opt, params = _trained()
    fresh = torch.randn(64)
    opt.add_param_group({"params": [fresh]})
    assert opt.state[fresh] == {}
    sd = opt.state_dict()
    other = make("Adam8bit", [p.clone() for p in params])
    other.add_param_group({"params": [fresh.clone()]})
    other.load_state_dict(sd)
    assert not other.state[other.param_groups[1]["params"][0]]


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("Adam32bit", "Adam8bit"),
        ("Adam8bit", "Adam32bit"),
        ("Lion32bit", "Lion8bit"),
        ("AdEMAMix8bit", "AdEMAMix32bit"),
    ],
)
def test_state_dicts_of_the_other_format_load_converted(src: str, dst: str) -> None:
    """32-bit states load into an 8-bit optimizer quantized, 8-bit ones into a 32-bit optimizer dequantized; the
    trajectories then agree to 8-bit precision."""
    opt, params = _trained(src, steps=3)
    other = make(dst, [p.clone() for p in params])
    other.load_state_dict(opt.state_dict())
    eight = other if dst.endswith("8bit") else opt
    thirty_two = opt if eight is other else other
    for p, q in zip(opt.param_groups[0]["params"], other.param_groups[0]["params"]):
        st8, st32 = eight.state[q if eight is other else p], thirty_two.state[p if eight is other else q]
        assert torch.equal(st8["step"], st32["step"])
        for j, signed in enumerate(eight.state_signed):
            key = f"state{j + 1}"
            if key not in st8 or st8[key].dtype != torch.uint8:
                continue  # a parameter below min_8bit_size
            values = qop.ops.dequantize_blockwise(
                st8[key].reshape(-1), st8[f"absmax{j + 1}"], qop.dynamic_map(signed), 256
            )
            assert st32[key].dtype == torch.float32
            torch.testing.assert_close(
                values, st32[key].reshape(-1), atol=0.02 * float(st32[key].abs().max()), rtol=0.1
            )
    for i in range(3):
        torch.manual_seed(10 + i)
        for p, q in zip(opt.param_groups[0]["params"], other.param_groups[0]["params"]):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        other.step()
    for p, q in zip(opt.param_groups[0]["params"], other.param_groups[0]["params"]):
        # Lion's sign update moves an element by 2 lr where 8-bit rounding flips the sign of its tiny momentum
        diff = (p - q).abs()
        assert float(diff.max()) <= 2 * 3 * 1e-2 + 1e-6
        assert float(diff.gt(1e-3).float().mean()) < 0.01


def test_format_keys_stay_the_optimizers() -> None:
    opt, params = _trained("Adam32bit")
    other = make("Adam8bit", [p.clone() for p in params])
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["optim_bits"] == 8
    assert other.state[other.param_groups[0]["params"][0]]["state1"].dtype == torch.uint8


# ------------------------------------------------------------------------------------- hooks
def test_state_dict_hooks_see_what_state_dict_returns() -> None:
    opt, _ = _trained()
    seen: dict[str, Any] = {}
    opt.register_state_dict_pre_hook(lambda o: seen.setdefault("pre", o))
    opt.register_state_dict_post_hook(lambda o, sd: seen.setdefault("post", copy.deepcopy(sd)))
    sd = opt.state_dict()
    assert seen["pre"] is opt
    group = seen["post"]["param_groups"][0]
    assert "hp" not in group and isinstance(group["lr"], float) and isinstance(group["betas"][0], float)
    assert group == sd["param_groups"][0]


def test_load_state_dict_hooks_run() -> None:
    opt, params = _trained()
    sd = opt.state_dict()
    other = make("Adam8bit", [p.clone() for p in params])
    calls: list[str] = []

    def pre(o: QopOptimizer, state_dict: dict) -> dict:
        calls.append("pre")
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.125
        return state_dict

    other.register_load_state_dict_pre_hook(pre)
    other.register_load_state_dict_post_hook(lambda o: calls.append(f"post {float(o.param_groups[0]['lr'])}"))
    other.load_state_dict(sd)
    assert calls == ["pre", "post 0.125"]
    assert _lr_used(other) == 0.125


def test_state_dict_post_hook_result_is_returned() -> None:
    opt, _ = _trained()
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    assert opt.state_dict()["extra"] == 1


# ------------------------------------------------------------------------- 5. ignored arguments
FIXED_BITS = [
    c
    for c in OPTIMIZERS
    if c.__name__.endswith(("8bit", "32bit")) and "optim_bits" in inspect.signature(c.__init__).parameters
]


@pytest.mark.parametrize("cls", FIXED_BITS, ids=lambda c: c.__name__)
def test_fixed_bits_classes_refuse_other_optim_bits(cls: type) -> None:
    default = inspect.signature(cls.__init__).parameters["optim_bits"].default
    make(cls.__name__, [torch.randn(300)], optim_bits=default)
    other = 8 if default == 32 else 32
    with pytest.raises(ValueError, match="optim_bits"):
        make(cls.__name__, [torch.randn(300)], optim_bits=other)


@pytest.mark.parametrize(
    "cls", [c for c in OPTIMIZERS if "block_wise" in inspect.signature(c.__init__).parameters], ids=lambda c: c.__name__
)
def test_block_wise_false_is_refused_where_it_would_be_ignored(cls: type) -> None:
    default = inspect.signature(cls.__init__).parameters["block_wise"].default
    if default is False:  # LAMB: bitsandbytes' default, documented as block-wise in qop
        make(cls.__name__, [torch.randn(300)], block_wise=False)
        return
    with pytest.raises(ValueError, match="block_wise"):
        make(cls.__name__, [torch.randn(300)], block_wise=False)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_every_argument_reaches_the_optimizer(cls: type) -> None:
    """Each constructor argument is kept in the group defaults, where the engine reads it (or raises)."""
    opt = make(cls.__name__, [torch.randn(300)])
    for name in inspect.signature(cls.__init__).parameters:
        if name in ("self", "params", "args"):
            continue
        assert name in opt.defaults, f"{cls.__name__}({name}=...) is accepted but not kept"


def test_override_of_is_paged_is_read() -> None:
    a, b = torch.randn(300), torch.randn(300)
    opt = make("Adam8bit", [a, b])
    manager = qop.optim.GlobalOptimManager.get_instance()
    try:
        manager.override_config(a, "is_paged", True)
        assert opt._paged(opt.param_groups[0], a) is (a.device.type == "cuda")
        assert not opt._paged(opt.param_groups[0], b)
    finally:
        manager.initialize()


def test_a_clipped_parameter_needs_its_history() -> None:
    opt, _ = _trained(percentile_clipping=50)
    sd = opt.state_dict()
    del sd["state"][1]["gnorm_vec"]
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"\[1\] lacks 'gnorm_vec'"):
        opt.load_state_dict(sd)
    assert_unchanged(before, opt)


def test_override_of_block_wise_false_is_refused() -> None:
    with pytest.raises(ValueError, match="block_wise"):
        qop.optim.GlobalOptimManager.get_instance().override_config(torch.randn(3), "block_wise", False)
