"""qop.nn: modules that help 8-bit optimizers (:class:`StableEmbedding`)."""

from .modules import StableEmbedding

__all__ = ["StableEmbedding"]
