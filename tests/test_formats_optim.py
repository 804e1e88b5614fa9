"""The 4-bit and fp8 optimizers: classes and defaults, state layout, overrides, state dicts and checkpoints."""

from __future__ import annotations

import inspect
import io

import pytest
import torch
from torch import Tensor

import qop
from qop import reference
from qop._maps import code_book
from qop._schema import StateFormat
from qop.optim import GlobalOptimManager

BIG, SMALL = 5000, 100  # 5000: 40 blocks of 128 (a partial last one), 20 of 256; 100 stays float32
TORCHAO_NAMES = ("Adam4bit", "AdamW4bit", "AdamFp8", "AdamWFp8")


@pytest.fixture(autouse=True)
def _fresh_manager():
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


def _params(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).requires_grad_() for n in (BIG, SMALL)] + [
        torch.randn(50, 101, generator=g).requires_grad_()
    ]


def _grads(params: list[Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _run(opt: torch.optim.Optimizer, params: list[Tensor], steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        _grads(params, i)
        opt.step()


@pytest.mark.parametrize("name", TORCHAO_NAMES)
def test_torchao_classes_and_defaults(name: str) -> None:
    cls = getattr(qop.optim, name)
    assert cls in qop.optim.CLASSES
    sig = inspect.signature(cls)
    assert "optim_bits" not in sig.parameters
    assert sig.parameters["lr"].default == 1e-3
    assert sig.parameters["betas"].default == (0.9, 0.999)
    assert sig.parameters["eps"].default == 1e-8
    assert sig.parameters["weight_decay"].default == (1e-2 if "W" in name else 0)


@pytest.mark.parametrize(
    "name,fmt,dtype,size,blocks",
    [
        ("AdamW4bit", StateFormat.BLOCKWISE4, torch.uint8, (2500,), 40),
        ("AdamWFp8", StateFormat.FP8, torch.float8_e4m3fn, (BIG,), 20),
    ],
)
def test_state_layout_and_small_tensors(name, fmt, dtype, size, blocks) -> None:
    params = _params()
    opt = getattr(qop.optim, name)(params)
    _run(opt, params, 1)
    st = opt.state[params[0]]
    assert st["state1"].dtype == dtype and tuple(st["state1"].shape) == size
    assert st["absmax2"].dtype == torch.float32 and st["absmax2"].numel() == blocks
    assert opt.state[params[1]]["state1"].dtype == torch.float32  # below min_8bit_size
    assert opt.state[params[2]]["state1"].dtype == dtype  # 5050 elements: low-bit, 2-d


@pytest.mark.parametrize("name", TORCHAO_NAMES)
def test_low_bit_adam_follows_32_bit_adam(name: str) -> None:
    """Five steps stay close to the 32-bit trajectory (measured: mean deviation 15% of the mean movement for 4-bit,
    2% for fp8), and the small tensor, float32 in both, follows it exactly."""
    params, ref_params = _params(), _params()
    opt = getattr(qop.optim, name)(params, lr=1e-2)
    ref = (qop.optim.AdamW32bit if "W" in name else qop.optim.Adam32bit)(ref_params, lr=1e-2)
    start = [p.detach().clone() for p in params]
    _run(opt, params, 5)
    _run(ref, ref_params, 5)
    share = 0.25 if "4bit" in name else 0.05
    with torch.no_grad():
        for p, r, s in zip(params, ref_params, start):
            moved = float((r - s).abs().mean())
            assert moved > 1e-2
            assert float((p - r).abs().mean()) < share * moved
        torch.testing.assert_close(params[1], ref_params[1])


@pytest.mark.parametrize(
    "cls", [qop.optim.Lion, qop.optim.SGD, qop.optim.RMSprop, qop.optim.Adagrad, qop.optim.AdEMAMix, qop.optim.LAMB]
)
def test_optim_bits_4_for_other_rules(cls: type) -> None:
    params = _params()
    kwargs = {"momentum": 0.9} if cls is qop.optim.SGD else {}
    opt = cls(params, lr=1e-3, optim_bits=4, **kwargs)
    _run(opt, params, 2)
    assert opt.state[params[0]]["state1"].dtype == torch.uint8
    assert opt.state[params[0]]["state1"].numel() == BIG // 2
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_adagrad_initial_accumulator_in_4_bits() -> None:
    params = _params()
    opt = qop.optim.Adagrad(params, optim_bits=4, initial_accumulator_value=0.3)
    _grads(params, 0)
    for p in params:
        p.grad.zero_()
    opt.step()  # zero gradients: the accumulator keeps its initial value
    st = opt.state[params[0]]
    values = reference.dequantize_state(StateFormat.BLOCKWISE4, st["state1"], st["absmax1"], code_book(False, 4), BIG)
    torch.testing.assert_close(values, torch.full((BIG,), 0.3))


def test_bad_optim_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="optim_bits must be one of 32, 16, 8, 4, 'fp8', got 5"):
        qop.optim.Adam(_params(), optim_bits=5)
    with pytest.raises(ValueError, match="optim_bits='fp8' serves the Adam family only"):
        qop.optim.Lion(_params(), optim_bits="fp8")
    with pytest.raises(ValueError, match="optim_bits must be one of 32, 16, 8, 4, 'fp8', got 12"):
        GlobalOptimManager.get_instance().override_config(_params()[0], "optim_bits", 12)


@pytest.mark.parametrize("override", [8, 32])
def test_manager_keeps_one_parameter_in_other_bits(override: int) -> None:
    """An embedding-like parameter in 8 or 32 bits while the rest is 4-bit; each bucket steps in its format."""
    params = _params()
    GlobalOptimManager.get_instance().override_config(params[2], "optim_bits", override)
    opt = qop.optim.AdamW4bit(params)
    _run(opt, params, 2)
    assert opt.state[params[0]]["state1"].numel() == BIG // 2
    s = opt.state[params[2]]["state1"]
    assert s.dtype == (torch.uint8 if override == 8 else torch.float32) and s.shape == params[2].shape


def _bytes(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


@pytest.mark.parametrize("name", TORCHAO_NAMES)
def test_state_dict_round_trip_through_weights_only_load(name: str) -> None:
    cls = getattr(qop.optim, name)
    params, twin = _params(), _params()
    opt, other = cls(params), cls(twin)
    _run(opt, params, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    with torch.no_grad():
        for p, q in zip(params, twin):
            q.copy_(p)
    other.load_state_dict(loaded)
    for p, q in zip(params, twin):
        for key, value in opt.state[p].items():
            assert value.dtype == other.state[q][key].dtype
            assert torch.equal(_bytes(value), _bytes(other.state[q][key])), key
    _run(opt, params, 2, start=2)
    _run(other, twin, 2, start=2)
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "source,target",
    [("AdamW32bit", "AdamW4bit"), ("AdamW4bit", "AdamW32bit"), ("AdamW8bit", "AdamWFp8"), ("AdamWFp8", "AdamW4bit")],
)
def test_state_dicts_convert_between_formats(source: str, target: str) -> None:
    params = _params()
    src = getattr(qop.optim, source)(params)
    _run(src, params, 2)
    dst = getattr(qop.optim, target)(_params())
    dst.load_state_dict(src.state_dict())
    for p, q in zip(src.param_groups[0]["params"], dst.param_groups[0]["params"]):
        a, b = src.state[p], dst.state[q]
        assert float(b["step"]) == 2
        va, vb = (_values(s, p.numel()) for s in (a, b))
        torch.testing.assert_close(vb, va, rtol=0.2, atol=0.05 * float(va.abs().max()))


def _values(st: dict, numel: int) -> Tensor:
    """The first moment of a state as float32, whatever its format."""
    s = st["state1"]
    if s.dtype == torch.float32:
        return s.reshape(-1)
    if s.dtype == torch.float8_e4m3fn:
        return reference.dequantize_fp8(s, st["absmax1"])
    if s.numel() == numel:
        return reference.dequantize_blockwise(s.reshape(-1), st["absmax1"], qop.dynamic_map(True), 256, torch.float32)
    return reference.dequantize_state(StateFormat.BLOCKWISE4, s, st["absmax1"], code_book(True, 4), numel)


def test_bad_state_dict_is_refused_and_changes_nothing() -> None:
    params = _params()
    opt = qop.optim.AdamW4bit(params)
    _run(opt, params, 1)
    sd = opt.state_dict()
    sd["state"][0]["state1"] = sd["state"][0]["state1"][:-1].clone()  # one byte short of 4-bit
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(ValueError, match=r"\['state1'\] has 2499 torch.uint8 elements, its parameter 5000"):
        opt.load_state_dict(sd)
    for k, v in before.items():
        assert torch.equal(_bytes(v), _bytes(opt.state[params[0]][k]))


def _train_and_load(theirs_cls: type, name: str) -> tuple[list[Tensor], list[Tensor], torch.optim.Optimizer, object]:
    """Three steps of ``theirs_cls``, its state dict loaded into qop's ``name`` on equal parameters."""
    params = _params()[:2]
    theirs = theirs_cls(params, lr=1e-2)
    _run(theirs, params, 3)
    twin = [p.detach().clone().requires_grad_() for p in params]
    ours = getattr(qop.optim, name)(twin, lr=1e-2)
    ours.load_state_dict(theirs.state_dict())
    return params, twin, theirs, ours


def _assert_next_step_close(params, twin, theirs, ours, tol: float) -> None:
    assert float(ours.state[twin[0]]["step"]) == 3
    _run(theirs, params, 1, start=3)
    _run(ours, twin, 1, start=3)
    with torch.no_grad():
        for p, q in zip(params, twin):
            assert float((p - q).abs().max()) < tol


@pytest.mark.parametrize("name", ["AdamW4bit", "AdamWFp8", "AdamW8bit"])
def test_torch_adamw_state_dict_loads(name: str) -> None:
    """torch.optim.AdamW's ``exp_avg``/``exp_avg_sq`` load as values into every format; the next step follows."""
    params, twin, theirs, ours = _train_and_load(torch.optim.AdamW, name)
    assert ours.state[twin[0]]["state1"].dtype != torch.float32
    # within the lr (4-bit: a code of a 16-entry book moves an update by up to ~2/3 of it), half of it otherwise
    _assert_next_step_close(params, twin, theirs, ours, 1e-2 if "4bit" in name else 0.5e-2)


@pytest.mark.parametrize("name", ["AdamW4bit", "AdamWFp8", "AdamW8bit"])
def test_torchao_state_dict_loads_into_the_class_of_the_same_name(name: str) -> None:
    torchao_optim = pytest.importorskip("torchao.optim")
    params, twin, theirs, ours = _train_and_load(getattr(torchao_optim, name), name)
    st = ours.state[twin[0]]
    assert st["state1"].dtype == (torch.float8_e4m3fn if "Fp8" in name else torch.uint8)
    _assert_next_step_close(params, twin, theirs, ours, 1e-2 if "4bit" in name else 0.5e-2)


def test_fresh_fp8_states_are_quantized_zeros() -> None:
    """A fresh fp8 state is made without quantizing a float32 copy: zeros with the floor scale, bit for bit what
    the reference quantizer gives for zeros."""
    p = torch.zeros(5000, requires_grad=True)
    opt = qop.optim.AdamWFp8([p])
    opt._init_state(opt.param_groups[0], p)
    codes, scale = reference.quantize_fp8(torch.zeros(5000))
    for j in (1, 2):
        assert torch.equal(opt.state[p][f"state{j}"].view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(opt.state[p][f"absmax{j}"], scale)
