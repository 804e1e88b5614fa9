"""``qop.nn.QuantizedLinear`` and ``qop.export``: 8-bit weights through ``torch.export`` to core ATen.

Checks that the layer is close to the float layer it came from, that export keeps ``qop::dequantize_blockwise``
as one op, that ``qop.export.decompose`` leaves no qop op and computes the same numbers, that a saved program
loads back, and that ``torch.compile`` still sees the custom op (the decomposition is for export only).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import qop
import qop.export
from qop.nn import QuantizedLinear, quantize_linear_layers


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(96, 200), torch.nn.GELU(), torch.nn.Linear(200, 10), torch.nn.Linear(10, 10)
    )
    return quantize_linear_layers(model, min_size=1000)


@pytest.mark.parametrize("shape", [(70, 300), (64, 64), (1, 4097), (33, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_is_close_to_the_float_layer(shape: tuple[int, int], dtype: torch.dtype) -> None:
    out_f, in_f = shape
    torch.manual_seed(1)
    linear = torch.nn.Linear(in_f, out_f).to(dtype)
    layer = QuantizedLinear.from_float(linear)
    assert layer.weight_codes.dtype == torch.uint8 and layer.weight_codes.shape == (out_f, in_f)
    assert layer.weight_absmax.shape == (-(-in_f * out_f // 256),)
    assert torch.equal(layer.code, qop.dynamic_map(signed=True))
    # every weight within one code step of its block's scale: the map's widest gap near 1 is < 2 %
    w = linear.weight.detach().float()
    err = (layer.dequantize_weight() - w).abs().reshape(-1)
    scale = layer.weight_absmax.repeat_interleave(256)[: w.numel()]
    assert bool((err <= 0.02 * scale + 1e-7).all())
    x = torch.randn(32, in_f).to(dtype)
    ref, out = linear(x).float(), layer(x).float()
    assert out.dtype == torch.float32 and layer(x).dtype == dtype
    tol = 0.01 if dtype == torch.float32 else 0.03
    assert (out - ref).norm() <= tol * ref.norm(), ((out - ref).norm() / ref.norm()).item()


def test_quantized_linear_state_dict_round_trip() -> None:
    layer = QuantizedLinear.from_float(torch.nn.Linear(40, 30))
    state = layer.state_dict()
    assert set(state) == {"weight_codes", "weight_absmax", "code", "bias"}
    other = QuantizedLinear(40, 30)
    other.load_state_dict(state)
    x = torch.randn(3, 40)
    assert torch.equal(other(x), layer(x))
    no_bias = QuantizedLinear.from_float(torch.nn.Linear(40, 30, bias=False))
    assert no_bias.bias is None and "bias=False" in repr(no_bias)


def test_quantize_linear_layers_replaces_large_ones_only() -> None:
    model = _model()
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["QuantizedLinear", "GELU", "QuantizedLinear", "Linear"]


def test_export_keeps_the_op_and_decomposition_removes_it(tmp_path: Path) -> None:
    model = _model().eval()
    x = torch.randn(8, 96)
    expected = model(x)
    ep = torch.export.export(model, (x,))
    assert _targets(ep.graph_module).count("qop.dequantize_blockwise.default") == 2
    decomposed = qop.export.decompose(ep)
    targets = _targets(decomposed.graph_module)
    assert not [t for t in targets if t.startswith("qop.")], targets
    assert "aten.index.Tensor" in targets and "aten.mul.Tensor" in targets
    got = decomposed.module()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # a new batch, not the one traced with
    x2 = torch.randn(8, 96)
    torch.testing.assert_close(decomposed.module()(x2), model(x2), rtol=0, atol=1e-6)
    # round trip through a file: the decomposed program needs nothing of qop's to load and run
    path = tmp_path / "model.pt2"
    torch.export.save(decomposed, path)
    loaded = torch.export.load(path)
    assert not [t for t in _targets(loaded.graph_module) if t.startswith("qop.")]
    torch.testing.assert_close(loaded.module()(x), expected, rtol=0, atol=1e-6)


def test_decomposition_matches_the_kernel_on_odd_sizes() -> None:
    code = qop.dynamic_map(signed=True)
    for n, blocksize, dtype in (
        (1, 256, torch.float32),
        (257, 256, torch.bfloat16),
        (1000, 64, torch.float16),
        (0, 256, torch.float32),
    ):
        A = torch.randn(n) * 3
        q, absmax = qop.ops.quantize_blockwise(A, code, blocksize)
        kernel = qop.ops.dequantize_blockwise(q, absmax, code, blocksize, dtype)
        ours = qop.export.dequantize_blockwise_decomposition(q, absmax, code, blocksize, dtype)
        assert ours.dtype == dtype and torch.equal(ours, kernel), (n, blocksize, dtype)


def test_user_table_entry_works_with_run_decompositions() -> None:
    """The documented form: qop's entries merged into the caller's own table."""
    model = torch.nn.Sequential(QuantizedLinear.from_float(torch.nn.Linear(64, 64)))
    x = torch.randn(2, 64)
    ep = torch.export.export(model, (x,))
    table = torch.export.default_decompositions()
    table.update(qop.export.decompositions())
    out = ep.run_decompositions(table)
    assert "qop.dequantize_blockwise.default" not in _targets(out.graph_module)
    assert "qop.dequantize_blockwise.default" in _targets(ep.run_decompositions().graph_module)  # default: kept


def test_compile_keeps_the_custom_op() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    model = _model()
    x = torch.randn(4, 96)
    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    assert sum("qop.dequantize_blockwise" in t for t in _targets(graphs[0])) == 2
    torch.testing.assert_close(out, model(x))


def test_tensorrt_registration_skips_cleanly_without_it() -> None:
    installed = importlib.util.find_spec("torch_tensorrt") is not None
    assert qop.export.TENSORRT_REGISTERED is installed  # done at import when it is installed
    assert qop.export.register_tensorrt() is installed
