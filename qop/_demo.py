"""``python -m qop demo``: a small language model trained with qop's 8-bit Adam beside torch's AdamW.

The data are generated here (character-level addition problems such as ``"417+85=502;"``), so the demo
needs no download; both models start from the same weights and see the same batches, so the two loss
curves differ only by the optimizer.  Also home of :func:`optimizer_state_bytes`, which the benchmark
uses to count optimizer memory the same way for every library.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: Characters of the procedural language: digits, the two operators and the end-of-problem mark.
VOCAB = "0123456789+=;"
_STOI = {c: i for i, c in enumerate(VOCAB)}


def _inner_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors holding a (possibly subclassed, e.g. torchao's 8-bit state) tensor's data."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (Tensor, nn.Parameter):
        return [t]
    names, _ = flatten()
    out: list[Tensor] = []
    for name in names:
        out.extend(_inner_tensors(getattr(t, name)))
    return out


def _collect(obj: Any, out: list[Tensor]) -> None:
    """Every tensor reachable from ``obj`` through dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        out.extend(_inner_tensors(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, out)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's per-parameter state, each storage counted once (shared code books too)."""
    tensors: list[Tensor] = []
    _collect(list(opt.state.values()), tensors)
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def n_params(params: Sequence[Tensor]) -> int:
    """Number of elements in a list of parameters."""
    return sum(p.numel() for p in params)


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


# ---------------------------------------------------------------------------------------------- run
@dataclass
class Curve:
    """One optimizer's run: name, logged (step, mean loss) points, final eval loss and state size."""

    name: str
    points: list[tuple[int, float]] = field(default_factory=list)
    final_loss: float = math.nan
    state_bytes: int = 0
    seconds: float = 0.0


@dataclass
class DemoResult:
    """Both runs of the demo and the model size."""

    n_params: int
    curves: list[Curve]


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross-entropy."""
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def run(
    steps: int = 300,
    *,
    batch: int = 16,
    ctx: int = 64,
    d: int = 128,
    layers: int = 2,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    log_every: int = 25,
    verbose: bool = True,
) -> DemoResult:
    """Train two copies of :class:`TinyLM` in lock-step, one with torch AdamW, one with qop Adam8bit."""
    import qop

    torch.manual_seed(seed)
    reference = TinyLM(len(VOCAB), ctx, d, layers)
    models = {"torch AdamW": reference, "qop Adam8bit": TinyLM(len(VOCAB), ctx, d, layers)}
    models["qop Adam8bit"].load_state_dict(reference.state_dict())
    hp = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    # qop's Adam applies decoupled weight decay like bitsandbytes', so Adam8bit(weight_decay=wd) is AdamW.
    opts: dict[str, torch.optim.Optimizer] = {
        "torch AdamW": torch.optim.AdamW(reference.parameters(), **hp),
        "qop Adam8bit": qop.optim.Adam8bit(models["qop Adam8bit"].parameters(), **hp),
    }
    curves = {name: Curve(name) for name in models}
    corpus = make_corpus(20_000, seed)
    held_out = make_corpus(2_000, seed + 1)
    data = batches(corpus, batch, ctx, seed)
    total = n_params(list(reference.parameters()))
    if verbose:
        print(f"TinyLM: {layers} layers, d={d}, {total:,} parameters; batch {batch} x {ctx} tokens; "
              f"{steps} steps, lr {lr}")
        print(f"{'step':>6}  {'torch AdamW':>12}  {'qop Adam8bit':>12}")
    running = dict.fromkeys(models, 0.0)
    count = 0
    for step in range(1, steps + 1):
        x, y = next(data)
        for name, model in models.items():
            t0 = time.perf_counter()
            loss = _loss(model, x, y)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            curves[name].seconds += time.perf_counter() - t0
            running[name] += loss.item()
        count += 1
        if step % log_every == 0 or step == steps or step == 1:
            for name in models:
                curves[name].points.append((step, running[name] / count))
            if verbose:
                a, b = (running[n] / count for n in models)
                print(f"{step:>6}  {a:>12.4f}  {b:>12.4f}")
            running = dict.fromkeys(models, 0.0)
            count = 0
    eval_data = batches(held_out, 64, ctx, seed + 2)
    eval_batches = [next(eval_data) for _ in range(4)]
    with torch.no_grad():
        for name, model in models.items():
            curves[name].final_loss = sum(_loss(model, x, y).item() for x, y in eval_batches) / len(eval_batches)
            curves[name].state_bytes = optimizer_state_bytes(opts[name])
    return DemoResult(total, list(curves.values()))


def report(result: DemoResult) -> str:
    """Final losses, state bytes per parameter and the memory the 8-bit states save."""
    lines = ["", f"{'optimizer':<14} {'final eval loss':>16} {'state B/param':>14} {'state KiB':>10} {'train s':>8}"]
    for c in result.curves:
        lines.append(f"{c.name:<14} {c.final_loss:>16.4f} {c.state_bytes / result.n_params:>14.2f} "
                     f"{c.state_bytes / 1024:>10.1f} {c.seconds:>8.1f}")
    full, q8 = result.curves[0], result.curves[1]
    saved = full.state_bytes - q8.state_bytes
    per_param = saved / result.n_params
    lines.append(f"8-bit states save {saved / 1024:.1f} KiB here ({100 * saved / max(full.state_bytes, 1):.0f}% "
                 f"of AdamW's state), {per_param:.2f} B/param: {per_param * 1e9 / 2**30:.1f} GiB "
                 "for a 1B-parameter model.")
    return "\n".join(lines)


def plot(result: DemoResult, path: str) -> None:
    """Save both loss curves as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"qop demo: --plot needs matplotlib ({exc}); pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in result.curves:
        steps, losses = zip(*c.points)
        ax.plot(steps, losses, label=f"{c.name} ({c.state_bytes / result.n_params:.2f} B/param state)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over logging window)")
    ax.set_title(f"TinyLM on procedural addition, {result.n_params:,} params")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli(argv: Sequence[str] | None = None) -> DemoResult:
    """Parse ``python -m qop demo`` options, train, print the report (and save the plot); return the result."""
    parser = argparse.ArgumentParser(prog="python -m qop demo",
                                     description="Train a tiny LM with qop Adam8bit beside torch AdamW.")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--log-every", type=int, default=25, help="print the mean loss every N steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--plot", metavar="PATH", help="save both loss curves to this PNG")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.log_every < 1:
        parser.error("--steps and --log-every must be >= 1")
    torch.set_num_threads(args.threads)
    result = run(args.steps, batch=args.batch, lr=args.lr, seed=args.seed, log_every=args.log_every)
    print(report(result))
    if args.plot:
        plot(result, args.plot)
        print(f"loss curves saved to {args.plot}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m qop demo``."""
    cli(argv)
    return 0
