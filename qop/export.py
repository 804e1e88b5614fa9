"""Exporting models that use qop's blockwise 8-bit format: decompositions of the ``qop`` ops into core ATen.

``qop::dequantize_blockwise`` stays one custom op everywhere qop runs it (eager, ``torch.compile``, the
graph of ``torch.export.export``): its kernels are faster than the ATen ops it is made of.  Runtimes that only
know core ATen (ExecuTorch, TensorRT, AOTInductor elsewhere) get it decomposed by passing
:func:`decompositions` to ``ExportedProgram.run_decompositions``, or by calling :func:`decompose`:

    ep = torch.export.export(model, (x,))
    ep = qop.export.decompose(ep)            # core ATen, no qop op left

The decomposition lives in a table the caller passes rather than in a ``CompositeImplicitAutograd`` kernel,
which would replace the op by its pieces in eager mode and under ``torch.compile`` too.  With
``torch_tensorrt`` installed, importing this module also hands the decomposition to Torch-TensorRT's lowering.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def dequantize_blockwise_decomposition(
    A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype
) -> Tensor:
    """``code[A] * absmax[block]`` in core ATen ops (index, pad, view, mul), computed in float32 like the kernels."""
    n = A.numel()
    nblocks = absmax.numel()
    values = code.to(torch.float32)[A.reshape(-1).to(torch.int64)]
    values = torch.nn.functional.pad(values, (0, nblocks * blocksize - n))
    scaled = values.view(nblocks, blocksize) * absmax.to(torch.float32).view(nblocks, 1)
    return scaled.reshape(-1)[:n].view(A.shape).to(dtype)


def decompositions() -> dict[Any, Callable[..., Any]]:
    """``{qop op overload: its decomposition}``: merge into a decomposition table for ``run_decompositions``."""
    return {torch.ops.qop.dequantize_blockwise.default: dequantize_blockwise_decomposition}


def decomposition_table() -> dict[Any, Callable[..., Any]]:
    """Core ATen's default export decompositions plus qop's."""
    table = torch.export.default_decompositions()
    for op, fn in decompositions().items():
        table[op] = fn
    return table


def decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` decomposed to core ATen, qop's ops included."""
    return ep.run_decompositions(decomposition_table())


def register_tensorrt() -> bool:
    """Teach Torch-TensorRT's lowering qop's decompositions, so a model with ``QuantizedLinear`` layers
    compiles with it (the pieces have TensorRT converters).  False, and nothing done, without torch_tensorrt."""
    try:
        from torch_tensorrt.dynamo.lowering._decompositions import register_torch_trt_decomposition
    except ImportError:
        return False
    except Exception as exc:  # a broken install must not break qop
        warnings.warn(f"qop: torch_tensorrt is installed but could not be loaded ({exc!r})", stacklevel=2)
        return False
    for op, fn in decompositions().items():
        register_torch_trt_decomposition(op)(fn)
    return True


#: Whether qop's decompositions were handed to Torch-TensorRT when this module was imported (it is when
#: ``torch_tensorrt`` is installed; ``register_tensorrt()`` does it again after a later install).
TENSORRT_REGISTERED = importlib.util.find_spec("torch_tensorrt") is not None and register_tensorrt()
