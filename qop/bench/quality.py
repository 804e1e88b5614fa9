"""Training quality of the state formats and of bfloat16 parameters (``python benchmarks/bench_quality.py``).

Two small tasks, each trained from the same initial weights on the same batches with the same lr schedule by
every optimizer: the demo's TinyLM on its procedural addition language, and an MLP on scikit-learn's digits
(8x8 images, shipped with scikit-learn: ``pip install scikit-learn``; without it the task is reported absent).
Rows: torch's fused AdamW in float32 (the reference), qop's AdamW with 32-bit, bfloat16 and 8-bit states,
bitsandbytes' AdamW8bit when installed, qop's 4-bit and FP8 classes when this build has them, and bfloat16
parameters written with nearest rounding or with ``bf16_stochastic_round``.  Columns: final eval loss (of the
weights in float32) and its difference to the reference, state bytes per parameter, and the median CPU time of
``opt.step()`` against torch's fused AdamW on the same model.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .formats import Format, parse
from .measure import optimizer_state_bytes
from .providers import import_optional

Batch = tuple[Tensor, Tensor]
REFERENCE = "torch AdamW(fused) fp32"


@dataclass
class Task:
    """A model (the same initial weights at every call), its training batches (the same sequence at every call),
    its eval batches and its loss; ``absent`` says why it cannot run."""

    name: str
    make_model: Callable[[], nn.Module]
    train: Callable[[], Iterator[Batch]]
    eval: list[Batch]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    lr: float
    absent: str = ""


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x).float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _same_init(factory: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    torch.manual_seed(seed)
    reference = factory()
    return lambda: copy.deepcopy(reference)


def tinylm_task(quick: bool, seed: int) -> Task:
    """The demo's TinyLM (next-token cross-entropy on addition problems)."""
    from .._tinylm import VOCAB, TinyLM, batches, make_corpus

    ctx, d, batch = (16, 32, 4) if quick else (64, 128, 16)
    corpus = make_corpus(500 if quick else 20_000, seed)
    held_out = batches(make_corpus(200 if quick else 2_000, seed + 1), batch, ctx, seed + 2)
    return Task(
        "tinylm",
        _same_init(lambda: TinyLM(len(VOCAB), ctx, d, 2), seed),
        lambda: batches(corpus, batch, ctx, seed),
        [next(held_out) for _ in range(2 if quick else 8)],
        _cross_entropy,
        lr=3e-3,
    )


def digits_task(quick: bool, seed: int) -> Task:
    """An MLP (64-256-256-10) on scikit-learn's digits: 1,500 training images, the other 297 for eval."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return Task("digits", nn.Identity, lambda: iter(()), [], _cross_entropy, 0.0, absent="needs scikit-learn")
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train_idx, eval_idx = order[:1500], order[1500:]
    batch = 16 if quick else 64

    def train() -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        while True:
            pick = train_idx[torch.randint(0, len(train_idx), (batch,), generator=g)]
            yield x[pick], y[pick]

    hidden = 32 if quick else 256
    return Task(
        "digits",
        _same_init(
            lambda: nn.Sequential(
                nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 10)
            ),
            seed,
        ),
        train,
        [(x[eval_idx], y[eval_idx])],
        _cross_entropy,
        lr=1e-3,
    )


TASKS: dict[str, Callable[[bool, int], Task]] = {"tinylm": tinylm_task, "digits": digits_task}


@dataclass
class Provider:
    """One row: how to build its optimizer, the parameters' dtype, or why it is absent."""

    label: str
    build: Callable[..., torch.optim.Optimizer] | None
    dtype: torch.dtype = torch.float32
    absent: str = ""


def _qop(spec: str, dtype: torch.dtype = torch.float32, label: str = "") -> Provider:
    fmt: Format = parse(spec)
    name = label or fmt.label + (" bf16 params" if dtype == torch.bfloat16 else "")
    return Provider(name, None if fmt.cls is None else fmt.build, dtype, fmt.absent)


#: torchao's classes of qop's names (``--torchao``): they compile each parameter shape's step with inductor, which
#: takes minutes on a CPU, and keep float32 states for tensors under 4096 elements or not a multiple of their block.
TORCHAO_CLASSES = ("AdamW8bit", "AdamW4bit", "AdamWFp8")


def _torchao_rows() -> list[Provider]:
    ao = import_optional("torchao")
    rows = []
    for name in TORCHAO_CLASSES:
        cls = None if ao is None else getattr(ao, name, None)
        if cls is None:
            rows.append(Provider(f"torchao {name}", None, absent=f"torchao {name} not installed"))
        else:
            rows.append(Provider(f"torchao {name}", lambda params, _cls=cls, **kw: _cls(params, **kw)))
    return rows


def providers(extra: Sequence[str] = (), torchao: bool = False) -> list[Provider]:
    """Every row, in table order (``extra``: more ``qop.optim`` formats, ``Name[:key=value,...]``; ``torchao``:
    torchao's classes of the same names too)."""
    rows = [Provider(REFERENCE, lambda params, **kw: torch.optim.AdamW(params, fused=True, **kw))]
    rows += [_qop("AdamW"), _qop("AdamW:optim_bits=16"), _qop("AdamW8bit")]
    bnb = import_optional("bnb")
    if bnb is None:
        rows.append(Provider("bnb AdamW8bit", None, absent="bitsandbytes not installed"))
    else:
        rows.append(Provider("bnb AdamW8bit", lambda params, **kw: bnb.AdamW8bit(params, **kw)))
    rows += [_qop("AdamW4bit"), _qop("AdamWFp8")]
    rows += _torchao_rows() if torchao else []
    rows += [
        _qop("AdamW", torch.bfloat16, "qop AdamW bf16 params, nearest rounding"),
        _qop("AdamW:bf16_stochastic_round=True", torch.bfloat16, "qop AdamW bf16 params, stochastic rounding"),
        _qop(
            "AdamW:optim_bits=16,bf16_stochastic_round=True",
            torch.bfloat16,
            "qop AdamW bf16 states + params, stochastic",
        ),
    ]
    return rows + [_qop(spec) for spec in extra]


@dataclass
class Row:
    task: str
    label: str
    final_loss: float = math.nan
    state_bytes_per_param: float = math.nan
    step_ms: float = math.nan
    absent: str = ""
    losses: list[float] = field(default_factory=list)


def _lr_factor(steps: int) -> Callable[[int], float]:
    """Linear warm-up over a tenth of the steps, then cosine decay to 10%."""
    warmup = max(1, steps // 10)
    return lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / steps))


def train_one(task: Task, provider: Provider, steps: int, weight_decay: float) -> Row:
    """Train a fresh copy of the task's model with one provider; time each ``opt.step()``."""
    row = Row(task.name, provider.label, absent=provider.absent or task.absent)
    if row.absent or provider.build is None:
        return row
    model = task.make_model().to(provider.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = provider.build(params, lr=task.lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(steps))
    times = []
    data = task.train()
    for _ in range(steps):
        x, y = next(data)
        loss = task.loss(model, x.to(provider.dtype) if x.is_floating_point() else x, y)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
        sched.step()
        row.losses.append(float(loss.detach()))
    with torch.no_grad():  # the weights themselves, in float32: the optimizers differ, not the forward's dtype
        evaluated = copy.deepcopy(model).float()
        row.final_loss = statistics.fmean(float(task.loss(evaluated, x, y)) for x, y in task.eval)
    row.state_bytes_per_param = optimizer_state_bytes(opt) / sum(p.numel() for p in params)
    row.step_ms = 1e3 * statistics.median(times[1:] or times)  # the first step creates the states
    return row


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """One table per task; loss and time relative to the reference row."""
    out = [f"Training quality ({meta['steps']} steps, {meta['threads']} threads, {meta['cpu']}, torch {meta['torch']})"]
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        ref = next((r for r in mine if r.label == REFERENCE and not r.absent), None)
        out += ["", f"### {task}", ""]
        out.append("| optimizer | final eval loss | vs fp32 AdamW | state B/param | step ms | x fused AdamW |")
        out.append("|---|---|---|---|---|---|")
        for r in mine:
            if r.absent:
                out.append(f"| {r.label} | absent: {r.absent} | | | | |")
                continue
            delta = f"{r.final_loss - ref.final_loss:+.4f}" if ref else "-"
            speed = f"{ref.step_ms / r.step_ms:.2f}" if ref and r.step_ms > 0 else "-"
            out.append(
                f"| {r.label} | {r.final_loss:.4f} | {delta} | {r.state_bytes_per_param:.2f} | {r.step_ms:.3f} "
                f"| {speed} |"
            )
    return "\n".join(out)


def run(
    tasks: Sequence[str],
    steps: int,
    quick: bool,
    seed: int = 0,
    extra: Sequence[str] = (),
    weight_decay: float = 1e-2,
    torchao: bool = False,
) -> list[Row]:
    """Every provider on every task."""
    rows = []
    for name in tasks:
        task = TASKS[name](quick, seed)
        rows += [train_one(task, p, steps, weight_decay) for p in providers(extra, torchao)]
    return rows


def main(argv: Sequence[str] | None = None, prog: str = "python benchmarks/bench_quality.py") -> int:
    """Parse options, train every row, print the markdown table (and write it with ``--out``)."""
    from .measure import cpu_model

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny models and 6 steps (a smoke test)")
    parser.add_argument("--steps", type=int, help="training steps (default 400; 6 with --quick)")
    parser.add_argument("--tasks", default="tinylm,digits", help="comma-separated: tinylm, digits")
    parser.add_argument("--optimizers", nargs="*", default=[], help="more rows: qop.optim Name[:key=value,...]")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--torchao", action="store_true", help="torchao's AdamW8bit/AdamW4bit/AdamWFp8 too (compiles: minutes)"
    )
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    steps = args.steps or (6 if args.quick else 400)
    if steps < 2:
        parser.error("--steps must be >= 2")
    torch.set_num_threads(args.threads)
    if args.torchao:  # torchao compiles its steps here: no pool of compile workers warming up beside the timings
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    rows = run(tasks, steps, args.quick, args.seed, args.optimizers, torchao=args.torchao)
    meta = {"steps": steps, "threads": args.threads, "cpu": cpu_model(), "torch": torch.__version__}
    table = markdown(rows, meta)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0
