"""State dicts corrupted at random: each is refused cleanly, or loads and then trains exactly like the original.

hypothesis draws up to three corruptions of a trained optimizer's state dict (drop, duplicate, retype or reshape
a tensor; set a step negative, NaN, infinite or fractional; truncate the groups or a group's params).  Loading it
into a fresh optimizer either raises ``ValueError`` (and leaves that optimizer untouched) or succeeds, and then a
few more steps give params and states bit-identical to those of an optimizer that loaded the clean state dict.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor

import qop
from qop.optim import QopOptimizer

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

#: distinct numels, so that a state moved to another parameter never fits it
SHAPES = [(300,), (23,), (17, 31), (700,)]
STEPS = 3


def _build(seed: int = 0) -> tuple[QopOptimizer, list[Tensor]]:
    torch.manual_seed(seed)
    params = [torch.randn(s) for s in SHAPES]
    opt = qop.optim.AdamW8bit(
        [{"params": params[:3]}, {"params": params[3:], "percentile_clipping": 50}], lr=1e-2, min_8bit_size=256
    )
    return opt, params


def _train(opt: QopOptimizer, steps: int, seed: int) -> None:
    for i in range(steps):
        torch.manual_seed(seed + i)
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.randn_like(p)
        opt.step()


def _reference_state_dict() -> tuple[dict[str, Any], list[Tensor]]:
    opt, params = _build()
    _train(opt, STEPS, seed=100)
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]


CLEAN, PARAMS = _reference_state_dict()


def _tensor_slots(sd: dict[str, Any]) -> list[tuple[Any, str]]:
    return [(pid, k) for pid, entry in sd["state"].items() for k, v in entry.items() if isinstance(v, Tensor)]


@st.composite
def corruption(draw: Any, sd: dict[str, Any]) -> str:
    """Apply one random corruption to ``sd`` in place; returns its description."""
    kind = draw(st.sampled_from(["drop", "duplicate", "retype", "reshape", "step", "groups"]))
    slots = _tensor_slots(sd)
    if kind == "drop":
        pid, key = draw(st.sampled_from(slots)) if slots else (None, None)
        if pid is None or len(sd["state"][pid]) <= 1:  # an empty entry is a legitimate state dict
            return "none"
        del sd["state"][pid][key]
        return f"drop {pid}/{key}"
    if kind == "duplicate":
        what = draw(st.sampled_from(["key", "entry", "param-id"]))
        if what == "key" and slots:
            pid, key = draw(st.sampled_from(slots))
            target = draw(st.sampled_from(["state1", "state2", "state3", "absmax1", "absmax3", "gnorm_vec"]))
            sd["state"][pid][target] = sd["state"][pid][key].clone()
            return f"duplicate {pid}/{key} as {target}"
        if what == "entry":
            ids = sorted(sd["state"])
            src, dst = draw(st.sampled_from(ids)), draw(st.sampled_from(ids))
            sd["state"][dst] = copy.deepcopy(sd["state"][src])
            return f"duplicate entry {src} as {dst}"
        group = draw(st.sampled_from(sd["param_groups"]))
        group["params"] = [*group["params"], group["params"][0]]
        return "duplicate a param id"
    if kind == "retype" and slots:
        pid, key = draw(st.sampled_from(slots))
        dtype = draw(
            st.sampled_from(
                [torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.float32, torch.bool]
            )
        )
        sd["state"][pid][key] = sd["state"][pid][key].to(dtype)
        return f"retype {pid}/{key} to {dtype}"
    if kind == "reshape" and slots:
        pid, key = draw(st.sampled_from(slots))
        t = sd["state"][pid][key]
        how = draw(st.sampled_from(["flatten", "shorter", "longer", "row", "empty"]))
        flat = t.reshape(-1)
        sd["state"][pid][key] = {
            "flatten": flat.clone(),
            "shorter": flat[:-1].clone(),
            "longer": torch.cat([flat, flat[:1]]),
            "row": flat.reshape(1, -1).clone(),
            "empty": flat[:0].clone(),
        }[how]
        return f"reshape {pid}/{key} {how}"
    if kind == "step":
        pid = draw(st.sampled_from(sorted(sd["state"])))
        value = draw(st.sampled_from([-1.0, float("nan"), float("inf"), 1.5, -3]))
        as_tensor = draw(st.booleans())
        sd["state"][pid]["step"] = torch.tensor(value) if as_tensor else value
        return f"step {pid} = {value}"
    if kind == "groups":
        if draw(st.booleans()):
            sd["param_groups"] = sd["param_groups"][:-1]
            return "drop the last group"
        group = draw(st.sampled_from(sd["param_groups"]))
        group["params"] = group["params"][:-1]
        return "truncate a group's params"
    return "none"


def _fresh() -> tuple[QopOptimizer, list[Tensor]]:
    opt, params = _build(seed=1)  # other values: a load must overwrite everything
    with torch.no_grad():
        for p, q in zip(params, PARAMS):
            p.copy_(q)
    return opt, params


def _same(a: QopOptimizer, b: QopOptimizer) -> bool:
    for ga, gb in zip(a.param_groups, b.param_groups):
        if not torch.equal(ga["hp"], gb["hp"]):
            return False
        for p, q in zip(ga["params"], gb["params"]):
            if not torch.equal(p, q):
                return False
            sa, sb = a.state.get(p, {}), b.state.get(q, {})
            if set(sa) != set(sb) or not all(torch.equal(sa[k], sb[k]) for k in sa):
                return False
    return True


@hypothesis.settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(hypothesis.HealthCheck)
)
@hypothesis.given(data=st.data())
def test_a_corrupted_state_dict_is_refused_or_harmless(data: Any) -> None:
    sd = copy.deepcopy(CLEAN)
    n = data.draw(st.integers(1, 3))
    what = [data.draw(corruption(sd)) for _ in range(n)]
    opt, _ = _fresh()
    untouched, _ = _fresh()
    try:
        opt.load_state_dict(sd)
    except ValueError as exc:
        assert str(exc).startswith("qop: "), exc
        assert _same(opt, untouched), f"{what}: a refused load changed the optimizer"
        return
    ref, _ = _fresh()
    ref.load_state_dict(copy.deepcopy(CLEAN))
    _train(opt, 2, seed=200)
    _train(ref, 2, seed=200)
    assert _same(opt, ref), f"{what}: accepted, but trains differently"
