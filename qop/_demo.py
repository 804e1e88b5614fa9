"""``python -m qop demo``: a small language model trained with qop's 8-bit Adam beside torch's AdamW, the same
qop step compiled with ``torch.compile``, bitsandbytes' Adam8bit when it is installed, and any other qop formats
named with ``--formats`` (e.g. ``AdamW:optim_bits=16 AdamW4bit``) side by side.

Every run starts from the same weights, sees the same batches and follows the same learning-rate schedule
(warm-up, then cosine decay: the lr changes at every step), so the loss curves differ only by the optimizer,
and the compiled run shows that a changing lr does not recompile the step.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._tinylm import VOCAB, TinyLM, batches, make_corpus
from .bench.formats import parse
from .bench.measure import optimizer_state_bytes

__all__ = [
    "VOCAB",
    "Curve",
    "DemoResult",
    "TinyLM",
    "batches",
    "cli",
    "main",
    "make_corpus",
    "optimizer_state_bytes",
    "run",
]

TORCH, QOP, COMPILED, BNB = "torch AdamW", "qop Adam8bit", "qop Adam8bit compiled", "bnb Adam8bit"


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Curve:
    """One run: logged (step, mean loss) points, final eval loss, state size, time, and for a compiled run its
    graphs and recompiles; ``absent`` says why a run did not take place (a library not installed)."""

    name: str
    points: list[tuple[int, float]] = field(default_factory=list)
    final_loss: float = math.nan
    state_bytes: int = 0
    seconds: float = 0.0  # every step but the first
    first_step_s: float = 0.0  # the first step: state creation, and for a compiled run tracing and compiling
    graphs: int | None = None
    recompiles: int | None = None
    absent: str = ""


@dataclass
class DemoResult:
    """Every run of the demo, the model size and the number of steps."""

    n_params: int
    curves: list[Curve]
    steps: int = 0
    backend: str | None = None

    def curve(self, name: str) -> Curve | None:
        """The run called ``name``, if it took place."""
        return next((c for c in self.curves if c.name == name and not c.absent), None)


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross-entropy."""
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class CountingBackend:
    """A dynamo backend that counts the graphs it is given (1 = one graph, no break, no recompile) and hands
    them to a real backend (inductor by default)."""

    def __init__(self, inner: str = "inductor") -> None:
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        return self.inner(gm, example_inputs)


def lr_lambda(steps: int, warmup: int = 20) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class _Run:
    """One model, its optimizer and scheduler, and the function that takes one training step."""

    curve: Curve
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    step: Callable[[Tensor, Tensor], Tensor]
    backend: CountingBackend | None = None


def _eager_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[Tensor, Tensor], Tensor]:
    def step(x: Tensor, y: Tensor) -> Tensor:
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _bnb_adam8bit() -> tuple[type | None, str]:
    """bitsandbytes' Adam8bit class, or None and why not."""
    try:
        import bitsandbytes
    except Exception as exc:  # not installed, or an install that does not load
        return None, f"not installed ({type(exc).__name__}: pip install bitsandbytes)"
    return bitsandbytes.optim.Adam8bit, ""


def _make_runs(
    reference: TinyLM,
    make_model: Callable[[], TinyLM],
    hp: dict[str, Any],
    steps: int,
    compile_backend: str | None,
    with_bnb: bool,
    formats: Sequence[str] = (),
) -> tuple[list[_Run], list[Curve]]:
    """The runs that take place, and curves of those that cannot (named, with the reason)."""
    import qop

    schedule = lr_lambda(steps)

    def build(name: str, opt_cls: Callable[..., torch.optim.Optimizer], model: nn.Module) -> _Run:
        opt = opt_cls(model.parameters(), **hp)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return _Run(Curve(name), model, opt, sched, _eager_step(model, opt))

    # qop's Adam applies decoupled weight decay like bitsandbytes', so Adam8bit(weight_decay=wd) is AdamW.
    runs = [build(TORCH, torch.optim.AdamW, reference), build(QOP, qop.optim.Adam8bit, make_model())]
    absent: list[Curve] = []
    if compile_backend:
        run = build(COMPILED, qop.optim.Adam8bit, make_model())
        run.backend = CountingBackend(compile_backend)
        run.step = torch.compile(run.step, fullgraph=True, backend=run.backend)
        runs.append(run)
    if with_bnb:
        cls, why = _bnb_adam8bit()
        if cls is None:
            absent.append(Curve(BNB, absent=why))
        else:
            runs.append(build(BNB, cls, make_model()))
    for spec in formats:  # qop optimizers named on the command line; absent where this build has no such class
        fmt = parse(spec)
        if fmt.cls is None:
            absent.append(Curve(fmt.label, absent=fmt.absent))
        else:
            runs.append(build(fmt.label, lambda params, fmt=fmt, **kw: fmt.build(params, **kw), make_model()))
    return runs, absent


class _Progress:
    """One line on stderr, rewritten in place while the runs train (only on a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.start = total, enabled and sys.stderr.isatty(), time.perf_counter()

    def update(self, step: int, note: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step) if step else math.nan
        sys.stderr.write(
            f"\r[demo] step {step}/{self.total} ({100 * step // self.total}%), {elapsed:.0f} s, "
            f"~{eta:.0f} s left {note}\x1b[K"
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run(
    steps: int = 200,
    *,
    batch: int = 16,
    ctx: int = 64,
    d: int = 128,
    layers: int = 2,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    log_every: int = 25,
    compile_backend: str | None = "aot_eager",
    with_bnb: bool = True,
    verbose: bool = True,
    formats: Sequence[str] = (),
) -> DemoResult:
    """Train copies of :class:`TinyLM` in lock-step: torch AdamW, qop Adam8bit eager and compiled (unless
    ``compile_backend`` is None), bitsandbytes' Adam8bit (when ``with_bnb`` and installed), and one run per
    ``formats`` entry (``qop.optim`` ``Name[:key=value,...]``)."""
    torch.manual_seed(seed)
    reference = TinyLM(len(VOCAB), ctx, d, layers)

    def make_model() -> TinyLM:
        model = TinyLM(len(VOCAB), ctx, d, layers)
        model.load_state_dict(reference.state_dict())
        return model

    hp = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    trace_flag = torch._dynamo.config.trace_autograd_ops
    torch._dynamo.config.trace_autograd_ops = True  # lets dynamo trace loss.backward() into the graph
    try:
        runs, absent = _make_runs(reference, make_model, hp, steps, compile_backend, with_bnb, formats)
        total = sum(p.numel() for p in reference.parameters())
        if verbose:
            print(
                f"TinyLM: {layers} layers, d={d}, {total:,} parameters; batch {batch} x {ctx} tokens; {steps} steps, "
                f"lr {lr} (20-step warm-up, cosine decay)"
            )
            for c in absent:
                print(f"{c.name}: {c.absent}")
            print(f"{'step':>6}  " + "  ".join(f"{r.curve.name:>26}" for r in runs))
        _train(runs, batches(make_corpus(20_000, seed), batch, ctx, seed), steps, log_every, verbose)
    finally:
        torch._dynamo.config.trace_autograd_ops = trace_flag
    eval_data = batches(make_corpus(2_000, seed + 1), 64, ctx, seed + 2)
    eval_batches = [next(eval_data) for _ in range(4)]
    with torch.no_grad():
        for r in runs:
            r.curve.final_loss = sum(_loss(r.model, x, y).item() for x, y in eval_batches) / len(eval_batches)
            r.curve.state_bytes = optimizer_state_bytes(r.opt)
            if r.backend is not None:
                r.curve.graphs = r.backend.graphs
                r.curve.recompiles = max(0, r.backend.graphs - 1)
    return DemoResult(total, [r.curve for r in runs] + absent, steps, compile_backend)


def _train(runs: list[_Run], data: Iterator[tuple[Tensor, Tensor]], steps: int, log_every: int, verbose: bool) -> None:
    """Step every run on the same batch, ``steps`` times, logging the mean loss every ``log_every`` steps."""
    progress = _Progress(steps, verbose)
    running = [torch.zeros(()) for _ in runs]
    count = 0
    for step in range(1, steps + 1):
        x, y = next(data)
        for i, r in enumerate(runs):
            if step == 1 and r.backend is not None:
                progress.update(0, f"(compiling {r.curve.name}'s step)")
            t0 = time.perf_counter()
            loss = r.step(x, y)
            r.sched.step()
            dt = time.perf_counter() - t0
            if step == 1:
                r.curve.first_step_s = dt
            else:
                r.curve.seconds += dt
            running[i] += loss
        count += 1
        progress.update(step)
        if step % log_every == 0 or step == steps or step == 1:
            means = [float(v) / count for v in running]
            for r, mean in zip(runs, means):
                r.curve.points.append((step, mean))
            if verbose:
                progress.done()
                print(f"{step:>6}  " + "  ".join(f"{m:>26.4f}" for m in means))
            running = [torch.zeros(()) for _ in runs]
            count = 0
    progress.done()


# -------------------------------------------------------------------------------------------- report
def report(result: DemoResult) -> str:
    """Final losses, state bytes per parameter, time per step, what 8-bit states save, what compiling did."""
    steps = max(1, result.steps - 1)
    lines = [
        "",
        f"{'run':<26} {'final eval loss':>16} {'state B/param':>14} {'state KiB':>10} {'ms/step':>8} "
        f"{'first step s':>13}",
    ]
    for c in result.curves:
        if c.absent:
            lines.append(f"{c.name:<26} {c.absent}")
            continue
        lines.append(
            f"{c.name:<26} {c.final_loss:>16.4f} {c.state_bytes / result.n_params:>14.2f} "
            f"{c.state_bytes / 1024:>10.1f} {1e3 * c.seconds / steps:>8.1f} {c.first_step_s:>13.2f}"
        )
    full, q8 = result.curve(TORCH), result.curve(QOP)
    if full is not None and q8 is not None:
        saved = full.state_bytes - q8.state_bytes
        per_param = saved / result.n_params
        lines.append(
            f"8-bit states save {saved / 1024:.1f} KiB here ({100 * saved / max(full.state_bytes, 1):.0f}% "
            f"of AdamW's state), {per_param:.2f} B/param: {per_param * 1e9 / 2**30:.1f} GiB "
            "for a 1B-parameter model."
        )
    compiled = result.curve(COMPILED)
    if compiled is not None and q8 is not None:
        speed = (q8.seconds / compiled.seconds) if compiled.seconds else math.nan
        lines.append(
            f"torch.compile(fullgraph=True, backend={result.backend!r}) of the whole step (forward, backward, "
            "qop step, zero_grad): "
            f"{compiled.graphs} graph, {compiled.recompiles} recompiles in {result.steps} steps while the "
            f"lr changed every step; first call {compiled.first_step_s:.1f} s (tracing and compiling), then "
            f"{speed:.2f}x the eager step's speed; final loss {compiled.final_loss:.4f} vs eager "
            f"{q8.final_loss:.4f}."
            + (
                " (aot_eager runs eager kernels: --backend inductor for generated code.)"
                if result.backend == "aot_eager"
                else ""
            )
        )
    bnb = result.curve(BNB)
    if bnb is not None and q8 is not None and bnb.seconds:
        lines.append(
            f"bitsandbytes' Adam8bit: final loss {bnb.final_loss:.4f} vs qop's {q8.final_loss:.4f}, "
            f"{bnb.state_bytes / result.n_params:.2f} B/param of state, training steps "
            f"with qop's {bnb.seconds / max(q8.seconds, 1e-9):.1f}x as fast (the same model: the optimizers differ)."
        )
    return "\n".join(lines)


def cli(argv: Sequence[str] | None = None) -> DemoResult:
    """Parse ``python -m qop demo`` options, train, print the report (and save the plot); return the result."""
    parser = argparse.ArgumentParser(
        prog="python -m qop demo",
        description="Train a tiny LM with qop Adam8bit (eager and compiled) beside torch "
        "AdamW and bitsandbytes' Adam8bit.",
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--log-every", type=int, default=25, help="print the mean loss every N steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--plot", metavar="PATH", help="save the loss curves to this PNG")
    parser.add_argument(
        "--backend",
        default="aot_eager",
        help="torch.compile backend of the compiled run: aot_eager (default: dynamo and AOTAutograd trace the "
        "whole step in seconds, eager kernels run it) or inductor (generated code; its first compile takes about a "
        "minute on 2 cores, cached afterwards)",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled run")
    parser.add_argument("--no-bnb", action="store_true", help="leave out bitsandbytes' Adam8bit")
    parser.add_argument(
        "--formats",
        nargs="+",
        default=[],
        metavar="NAME[:key=value,...]",
        help="more qop optimizers side by side, e.g. AdamW:optim_bits=16 AdamW8bit AdamW4bit (classes this build "
        "lacks are reported absent)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.log_every < 1:
        parser.error("--steps and --log-every must be >= 1")
    torch.set_num_threads(args.threads)
    result = run(
        args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        log_every=args.log_every,
        compile_backend=None if args.no_compile else args.backend,
        with_bnb=not args.no_bnb,
        formats=args.formats,
    )
    print(report(result))
    if args.plot:
        from ._demo_plot import plot

        plot(result, args.plot)
        print(f"loss curves saved to {args.plot}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m qop demo``."""
    cli(argv)
    return 0
