"""bfloat16 states (``optim_bits=16``) and ``bf16_stochastic_round`` through the optimizers.

* 16-bit states are bfloat16 for every parameter size, follow ``GlobalOptimManager`` overrides, start at the
  rule's initial value and track the 32-bit trajectory;
* ``bf16_stochastic_round``: a seed per group drawn from torch's default generator (none drawn without it), kept in
  ``hp`` and in the state dict; float32 params of such a group are stepped as without it;
* state dicts round-trip through ``torch.save``/``torch.load(weights_only=True)`` and a resumed run replays the
  original bit for bit; 32-bit and 16-bit state dicts load into each other (cast);
* bad arguments raise naming the argument.
"""

from __future__ import annotations

import io

import pytest
import torch

import qop
from qop.optim import GlobalOptimManager

SR_SEED_KEY = "bf16_sr_seed"


def _model(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for n in (5000, 37)]


def _grads(params: list[torch.Tensor], step: int) -> None:
    for i, p in enumerate(params):
        g = torch.Generator().manual_seed(100 * step + i)
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for s in steps:
        _grads(params, s)
        opt.step()


@pytest.fixture(autouse=True)
def _fresh_manager():
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


# ------------------------------------------------------------------------------------ bfloat16 states
@pytest.mark.parametrize("cls", [qop.optim.AdamW, qop.optim.Lion, qop.optim.AdEMAMix, qop.optim.LAMB])
def test_sixteen_bits_keep_bfloat16_states(cls: type) -> None:
    params = _model(torch.float32)
    opt = cls(params, lr=1e-3, optim_bits=16)
    _run(opt, params, range(2))
    for p in params:  # every size: min_8bit_size is about 8-bit states only
        states = [v for k, v in opt.state[p].items() if k.startswith("state")]
        assert states and all(s.dtype == torch.bfloat16 and s.shape == p.shape for s in states)
        assert not any(k.startswith("absmax") for k in opt.state[p])


def test_sixteen_bits_track_thirty_two() -> None:
    p16, p32 = _model(torch.float32), _model(torch.float32)
    o16 = qop.optim.AdamW(p16, lr=1e-2, optim_bits=16)
    o32 = qop.optim.AdamW(p32, lr=1e-2)
    for s in range(10):
        _run(o16, p16, range(s, s + 1))
        _run(o32, p32, range(s, s + 1))
    for a, b in zip(p16, p32):
        assert (a - b).abs().max() < 1e-2 * 10 * 0.05  # within a few percent of the distance travelled
        assert not torch.equal(a, b)


def test_initial_accumulator_value_in_bfloat16() -> None:
    params = _model(torch.float32)
    opt = qop.optim.Adagrad(params, lr=1e-2, optim_bits=16, initial_accumulator_value=0.1)
    _grads(params, 0)
    for p in params:
        g = p.grad.clone()
        opt.step()
        expected = (torch.tensor(0.1).to(torch.bfloat16).float() + g.float() ** 2).to(torch.bfloat16)
        torch.testing.assert_close(opt.state[p]["state1"], expected, rtol=0, atol=0)
        break


def test_manager_override_to_sixteen_bits() -> None:
    params = _model(torch.float32)
    GlobalOptimManager.get_instance().override_config(params[0], "optim_bits", 16)
    opt = qop.optim.Adam8bit(params, lr=1e-3, min_8bit_size=16)
    _run(opt, params, range(1))
    assert opt.state[params[0]]["state1"].dtype == torch.bfloat16
    assert opt.state[params[1]]["state1"].dtype == torch.uint8


def test_thirty_two_and_sixteen_bit_state_dicts_load_into_each_other() -> None:
    params = _model(torch.float32)
    o32 = qop.optim.AdamW(params, lr=1e-3)
    _run(o32, params, range(2))
    o16 = qop.optim.AdamW([p.clone() for p in params], lr=1e-3, optim_bits=16)
    o16.load_state_dict(o32.state_dict())
    for p32, p16 in zip(params, o16.param_groups[0]["params"]):
        for key in ("state1", "state2"):
            assert torch.equal(o16.state[p16][key], o32.state[p32][key].to(torch.bfloat16))
    back = qop.optim.AdamW([p.clone() for p in params], lr=1e-3)
    back.load_state_dict(o16.state_dict())
    assert back.state[back.param_groups[0]["params"][0]]["state1"].dtype == torch.float32


# ---------------------------------------------------------------------------------- stochastic rounding
def test_seed_drawn_per_group_only_when_rounding_stochastically() -> None:
    params = _model()
    before = torch.random.get_rng_state()
    plain = qop.optim.AdamW([params[0]], lr=1e-3)
    assert torch.equal(torch.random.get_rng_state(), before)  # nothing drawn
    assert float(plain.param_groups[0][SR_SEED_KEY]) == 0
    torch.manual_seed(0)
    opt = qop.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]]}], lr=1e-3, bf16_stochastic_round=True)
    seeds = [float(g[SR_SEED_KEY]) for g in opt.param_groups]
    assert seeds[0] != seeds[1] and all(0 <= s < 2**24 and s == int(s) for s in seeds)
    torch.manual_seed(0)
    again = qop.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]]}], lr=1e-3, bf16_stochastic_round=True)
    assert [float(g[SR_SEED_KEY]) for g in again.param_groups] == seeds
    given = qop.optim.AdamW([{"params": [params[0]], SR_SEED_KEY: 17}], lr=1e-3, bf16_stochastic_round=True)
    assert float(given.param_groups[0][SR_SEED_KEY]) == 17
    assert float(given.param_groups[0]["hp"][qop.HP.SR_SEED]) == 17


def test_stochastic_rounding_moves_bfloat16_params_that_nearest_rounding_keeps() -> None:
    """A small lr whose updates nearest rounding loses: the stochastic run moves on average like float32."""
    ref = _model(torch.float32)
    sr, rn = _model(), _model()
    opts = [
        qop.optim.SGD(ref, lr=1e-4),
        qop.optim.SGD(sr, lr=1e-4, bf16_stochastic_round=True),
        qop.optim.SGD(rn, lr=1e-4),
    ]
    for _ in range(200):
        for o, ps in zip(opts, (ref, sr, rn)):
            for p in ps:
                p.grad = torch.ones_like(p)
            o.step()
    start = _model(torch.float32)[0]
    moved = lambda p: (start - p.float()).mean().item()
    assert abs(moved(sr[0]) - moved(ref[0])) < 0.1 * moved(ref[0])
    assert moved(rn[0]) < 0.5 * moved(ref[0])


def test_float32_params_of_a_rounding_group_step_as_without_it() -> None:
    a, b = _model(torch.float32), _model(torch.float32)
    oa = qop.optim.AdamW(a, lr=1e-3, bf16_stochastic_round=True)
    ob = qop.optim.AdamW(b, lr=1e-3)
    _run(oa, a, range(3))
    _run(ob, b, range(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bits", [32, 16, 8])
def test_resume_replays_bit_for_bit(bits: int) -> None:
    """Save after 3 steps, resume in a fresh optimizer (its own seed replaced by the saved one), step on: the same
    parameters and states as the run that never stopped."""
    params = _model()
    opt = qop.optim.AdamW(params, lr=1e-3, optim_bits=bits, min_8bit_size=256, bf16_stochastic_round=True)
    _run(opt, params, range(3))
    buf = io.BytesIO()
    torch.save({"params": [p.clone() for p in params], "opt": opt.state_dict()}, buf)
    _run(opt, params, range(3, 6))
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [p.clone() for p in saved["params"]]
    opt2 = qop.optim.AdamW(resumed, lr=1e-3, optim_bits=bits, min_8bit_size=256, bf16_stochastic_round=True)
    assert saved["opt"]["param_groups"][0][SR_SEED_KEY] == float(opt.param_groups[0][SR_SEED_KEY])
    opt2.load_state_dict(saved["opt"])
    assert float(opt2.param_groups[0][SR_SEED_KEY]) == float(opt.param_groups[0][SR_SEED_KEY])
    _run(opt2, resumed, range(3, 6))
    for p, q in zip(params, resumed):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        for key, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][key]), key


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"optim_bits": 12}, ValueError, "optim_bits"),
        ({"bf16_stochastic_round": "yes"}, TypeError, "bf16_stochastic_round"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        qop.optim.AdamW(_model(), lr=1e-3, **kwargs)


@pytest.mark.parametrize("seed", [-1, 2**24, 1.5, float("nan")])
def test_bad_seeds(seed: float) -> None:
    with pytest.raises(ValueError, match=SR_SEED_KEY):
        qop.optim.AdamW([{"params": _model(), SR_SEED_KEY: seed}], lr=1e-3, bf16_stochastic_round=True)


def test_manager_refuses_other_bits() -> None:
    with pytest.raises(ValueError, match="optim_bits"):
        GlobalOptimManager.get_instance().override_config(_model()[0], "optim_bits", 12)
