"""``QuantizedLinear``: a linear layer whose weight is stored in qop's blockwise 8-bit format.

The weight is kept as ``uint8`` codes into the signed dynamic map plus one float32 absmax per 256-element
block (the format of qop's 8-bit optimizer states, ~1 byte per weight); ``forward`` dequantizes it with
``qop::dequantize_blockwise``, so the layer traces under ``torch.compile`` and ``torch.export`` as that op,
which ``qop.export`` decomposes into core ATen ops for runtimes that do not know it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .._maps import dynamic_map
from .._schema import BLOCKSIZE


class QuantizedLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W`` held as blockwise 8-bit codes (buffers ``weight_codes``,
    ``weight_absmax``, ``code``); the bias, when present, stays in floating point."""

    weight_codes: Tensor
    weight_absmax: Tensor
    code: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        blocksize: int = BLOCKSIZE,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if blocksize <= 0:
            raise ValueError(f"qop: blocksize must be positive, got {blocksize}")
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        nblocks = -(-in_features * out_features // blocksize)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax", torch.zeros(nblocks, dtype=torch.float32, device=device))
        self.register_buffer("code", dynamic_map(True, device or "cpu").clone())
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, blocksize: int = BLOCKSIZE) -> QuantizedLinear:
        """Quantize a ``torch.nn.Linear``'s weight (``qop.ops.quantize_blockwise``, signed map); copy its bias."""
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            blocksize,
            device=weight.device,
            dtype=weight.dtype,
        )
        codes, absmax = ops.quantize_blockwise(weight.contiguous(), layer.code, blocksize)
        layer.weight_codes.copy_(codes)
        layer.weight_absmax.copy_(absmax)
        if linear.bias is not None:
            assert layer.bias is not None
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight in floating point: ``code[codes] * absmax[block]``."""
        return ops.dequantize_blockwise(self.weight_codes, self.weight_absmax, self.code, self.blocksize, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Dequantize the weight in the input's dtype and apply it."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, blocksize={self.blocksize}"
        )


def quantize_linear_layers(module: torch.nn.Module, min_size: int = 4096) -> torch.nn.Module:
    """Replace, in place, every ``torch.nn.Linear`` of ``module`` with at least ``min_size`` weights by a
    :class:`QuantizedLinear` (smaller ones gain little and lose the most accuracy); returns ``module``."""
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear and child.weight.numel() >= min_size:
            setattr(module, name, QuantizedLinear.from_float(child))
        else:
            quantize_linear_layers(child, min_size)
    return module
