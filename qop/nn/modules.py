"""Modules that help 8-bit optimizers: an embedding whose optimizer state stays in 32 bits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..optim.manager import GlobalOptimManager


class StableEmbedding(torch.nn.Embedding):
    """``torch.nn.Embedding`` followed by a ``LayerNorm``, Xavier-uniform initialised, whose weight keeps
    32-bit optimizer states under any qop optimizer (a ``GlobalOptimManager`` module override), as
    bitsandbytes' ``StableEmbedding``: embeddings see sparse, very uneven gradients that 8-bit states track
    poorly. The layer norm runs in the norm's dtype (float32 unless changed) and the output is cast back to
    the weight's dtype.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse,
            _weight=_weight,
            device=device,
            dtype=dtype,
        )
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device)
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: Tensor) -> Tensor:
        emb = F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return self.norm(emb.to(self.norm.weight.dtype)).to(self.weight.dtype)
