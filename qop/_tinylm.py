"""The demo's model and data: a small GPT and a procedural character-level language of addition problems.

The data are generated here (problems such as ``"417+85=502;"``), so the demo needs no download; the same
seed gives the same corpus and the same batches, so runs differ only by their optimizer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

#: Characters of the procedural language: digits, the two operators and the end-of-problem mark.
VOCAB = "0123456789+=;"
_STOI = {c: i for i, c in enumerate(VOCAB)}


# ---------------------------------------------------------------------------------------------- data
def make_corpus(n_problems: int, seed: int, max_operand: int = 999) -> Tensor:
    """A token stream of ``a+b=c;`` addition problems, the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    ab = torch.randint(0, max_operand + 1, (n_problems, 2), generator=g).tolist()
    text = "".join(f"{a}+{b}={a + b};" for a, b in ab)
    return torch.tensor([_STOI[c] for c in text], dtype=torch.long)


def batches(corpus: Tensor, batch: int, ctx: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless random windows of the corpus as (inputs, next-token targets)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(ctx + 1)
    while True:
        start = torch.randint(0, corpus.numel() - ctx - 1, (batch, 1), generator=g)
        window = corpus[start + offsets]
        yield window[:, :-1], window[:, 1:]


# --------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then a 4x MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        """Residual attention and MLP."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """A small GPT: token and position embeddings, ``layers`` blocks, a final norm and a tied head."""

    def __init__(self, vocab: int, ctx: int, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases (keeps the first logits near uniform)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))
