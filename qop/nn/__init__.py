"""qop.nn: modules that help 8-bit optimizers (:class:`StableEmbedding`) and a linear layer with 8-bit
weights (:class:`QuantizedLinear`)."""

from .modules import StableEmbedding
from .quantized import QuantizedLinear, quantize_linear_layers

__all__ = ["QuantizedLinear", "StableEmbedding", "quantize_linear_layers"]
