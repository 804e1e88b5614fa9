"""Distributed training with qop optimizers: FSDP2 with every state format, DCP checkpoints, DDP and compiled steps.

Four spawns of 2 processes and two of 3 (gloo on the CPU, initialised through a file in a temporary directory:
no ports) run several checks each (starting torch and qop takes seconds per process), write what they measured to
files and let the parent assert.  A rank that raises ends its spawn at once (the others are terminated);
collectives time out after ``TIMEOUT`` seconds, so a rank stuck in one fails too; and each spawn is killed
after its own deadline (a few ``TIMEOUT``, since the machine may be shared), so no test hangs.  A spawn whose
ranks did not all reach the process group is retried once.
"""

from __future__ import annotations

import copy
import datetime
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import qop
from qop import BLOCKSIZE

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed"),
]

WORLD = 2
#: seconds, for the process group's collectives and for a whole spawn
TIMEOUT = float(os.environ.get("QOP_DIST_TIMEOUT", 60))
DOCS = Path(__file__).resolve().parent.parent / "docs" / "distributed.md"


# ------------------------------------------------------------------------------------------- spawning
def _worker(rank: int, fn: Callable[..., None], world: int, run_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # two ranks on two cores; also makes every run bit-reproducible
    dist.init_process_group(
        "gloo",
        init_method=f"file://{run_dir}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    Path(run_dir, f"joined{rank}").touch()
    try:
        fn(rank, world, Path(run_dir), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., None], tmp_path: Path, *args: Any, world: int = WORLD, timeout: float = 2 * TIMEOUT
) -> Path:
    """Run ``fn(rank, world, run_dir, *args)`` on ``world`` spawned ranks within ``timeout`` seconds; returns
    ``run_dir``."""
    for attempt in range(2):
        run_dir = tmp_path / f"run{attempt}"
        run_dir.mkdir()
        ctx = mp.start_processes(
            _worker, args=(fn, world, str(run_dir), args), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__}: ranks still running after {timeout:.0f} s")
            return run_dir
        except mp.ProcessExitedException:
            joined = sum(Path(run_dir, f"joined{r}").exists() for r in range(world))
            if attempt == 0 and joined < world:  # a start-up failure: retry once
                continue
            raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
    raise AssertionError("unreachable")


def run_all(rank: int, world: int, run_dir: Path, *fns: Callable[[int, int, Path], None]) -> None:
    """Several checks in one spawn (starting torch and qop in a process takes seconds)."""
    for fn in fns:
        fn(rank, world, run_dir)


# ------------------------------------------------------------------------------------- models, data
class Net(nn.Module):
    """Linear layers, plus a one-row parameter that leaves rank 1 an empty shard under FSDP2.

    ``uneven``: 100x48 and 65x100 weights, whose shards start inside a 256-block (a block split between the
    ranks) and, for 65 rows, are uneven, and a 9x515 one whose second shard starts at an odd element (a 4-bit
    head of odd length); otherwise 128x64 and 64x128, whose shards start on a block.
    """

    def __init__(self, uneven: bool) -> None:
        super().__init__()
        d_in, hidden, mid = (48, 100, 65) if uneven else (64, 128, 64)
        self.d_in = d_in
        self.l1 = nn.Linear(d_in, hidden)  # >= 4096 weights: 8-bit states (bias: 32-bit)
        self.l2 = nn.Linear(hidden, mid)
        self.row = nn.Parameter(torch.randn(1, 4608) * 0.02)  # 8-bit; its only row lives on rank 0
        self.out = nn.Linear(mid, 3)  # 32-bit states
        self.odd = nn.Parameter(torch.randn(9, 515) * 0.02) if uneven else None  # rows 0..4 and 5..8

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.l2(torch.relu(self.l1(x))))
        y = self.out(h) + (self.row.view(-1)[: h.shape[-1]] * h).sum(-1, keepdim=True)
        if self.odd is not None:
            xr = x.repeat(1, -(-self.odd.shape[1] // x.shape[-1]))[:, : self.odd.shape[1]]
            y = y + 0.1 * (xr @ self.odd.T).square().sum(-1, keepdim=True)
        return y


def make_net(uneven: bool) -> Net:
    torch.manual_seed(0)
    return Net(uneven)


def batches(net: Net, n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """``n`` global batches of 8 samples."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, net.d_in, generator=g), torch.randn(n, 8, 3, generator=g)


def my_half(t: Tensor, rank: int) -> Tensor:
    return t[:, rank * 4 : rank * 4 + 4]


def train(model: nn.Module, opt: torch.optim.Optimizer, xs: Tensor, ys: Tensor, step: Callable | None = None) -> None:
    for x, y in zip(xs, ys):
        nn.functional.mse_loss(model(x), y).backward()
        (step or opt.step)()
        opt.zero_grad()


def shard(model: Net, reshard_after_forward: bool = True) -> Net:
    from torch.distributed.fsdp import fully_shard

    for m in (model.l1, model.l2, model.out):
        fully_shard(m, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((full(p) - full(q)).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@torch.no_grad()
def mean_diff(a: nn.Module, b: nn.Module) -> float:
    """Mean absolute difference over all the elements of two models' parameters."""
    diffs = [(full(p) - full(q)).abs().reshape(-1) for p, q in zip(a.parameters(), b.parameters())]
    return float(torch.cat(diffs).mean())


LR = {"Lion8bit": 1e-3}
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "Adam8bit": lambda p, lr: qop.optim.Adam8bit(p, lr=lr),
    "AdamW8bit": lambda p, lr: qop.optim.AdamW8bit(p, lr=lr),
    "Lion8bit": lambda p, lr: qop.optim.Lion8bit(p, lr=lr),
    "LAMB8bit": lambda p, lr: qop.optim.LAMB8bit(p, lr=lr),
    "SGD8bit": lambda p, lr: qop.optim.SGD8bit(p, lr=lr, momentum=0.9),
    "Adam32bit": lambda p, lr: qop.optim.Adam32bit(p, lr=lr),
    "LARS8bit": lambda p, lr: qop.optim.LARS8bit(p, lr=lr, momentum=0.9),
    "Adam8bit-percentile": lambda p, lr: qop.optim.Adam8bit(p, lr=lr, percentile_clipping=50),
    "AdamW4bit": lambda p, lr: qop.optim.AdamW4bit(p, lr=lr),
    "AdamWFp8": lambda p, lr: qop.optim.AdamWFp8(p, lr=lr),
    "AdamW-bf16": lambda p, lr: qop.optim.AdamW(p, lr=lr, optim_bits=16),
}
#: the formats beyond 8 bits: packed 4-bit codes, fp8 values, bfloat16 states
FORMAT_OPTIMIZERS = ["AdamW4bit", "AdamWFp8", "AdamW-bf16"]
#: those whose full state dict the tests gather: gloo has no float8 collectives (NCCL has)
GATHERED = ["AdamW4bit", "AdamW-bf16"]
DDP_OPTIMIZERS = ["Adam8bit", "AdamW8bit", "Lion8bit", "LAMB8bit", "SGD8bit", "Adam32bit"]


def make_opt(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](model.parameters(), LR.get(name, 1e-2))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the states that FSDP2 shards (not the 0-d steps nor the percentile histories, kept whole)."""
    return sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for k, t in st.items()
        if isinstance(t, Tensor) and t.dim() > 0 and k != "gnorm_vec"
    )


# --------------------------------------------------------------------------------------------- FSDP2
N_STEPS = 6


def _fsdp_parity(rank: int, world: int, run_dir: Path) -> None:
    results: dict[str, Any] = {}
    for uneven in (False, True):
        base = make_net(uneven)
        xs, ys = batches(base, N_STEPS)
        for i, name in enumerate(OPTIMIZERS):
            ref = copy.deepcopy(base)
            ref_opt = make_opt(name, ref)
            train(ref, ref_opt, xs, ys)
            model = shard(copy.deepcopy(base), reshard_after_forward=i % 2 == 0)
            opt = make_opt(name, model)
            train(model, opt, my_half(xs, rank), my_half(ys, rank))
            key = f"{name}/{'uneven' if uneven else 'aligned'}"
            results[key] = {
                "diff": max_diff(model, ref),
                "mean": mean_diff(model, ref),
                "moved": max_diff(model, base),
                "bytes": state_bytes(opt),
                "bytes_one_process": state_bytes(ref_opt),
            }
            if name == "Adam8bit" and uneven:
                results["layout"] = {
                    n: (
                        tuple(opt.state[p]["state1"].shape),
                        opt.state[p]["state1"].dtype,
                        tuple(opt.state[p]["absmax1"].shape) if "absmax1" in opt.state[p] else None,
                    )
                    for n, p in model.named_parameters()
                }
    torch.save(results, run_dir / f"fsdp{rank}.pt")


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One spawn for the FSDP2 and the DDP comparisons."""
    return launch(run_all, tmp_path_factory.mktemp("parity"), _fsdp_parity, _ddp_parity, timeout=3 * TIMEOUT)


def test_fsdp2_matches_one_process(parity_run):
    """FSDP2 (2 ranks, reshard_after_forward True and False, uneven and empty shards, 8- and 32-bit states in
    one group) against one process on the same global batches, for every optimizer."""
    run_dir = parity_run
    r0, r1 = (torch.load(run_dir / f"fsdp{r}.pt") for r in range(WORLD))
    for key, res in r0.items():
        if key == "layout":
            continue
        name, model = key.split("/")
        lr = LR.get(name, 1e-2)
        assert res["diff"] == r1[key]["diff"]  # both ranks see the same full parameters
        print(
            f"{key:28s} max abs param diff {res['diff']:.3e}, mean {res['mean']:.1e} (moved {res['moved']:.3e}); "
            "state bytes per rank "
            f"{res['bytes']} / {r1[key]['bytes']}, one process {res['bytes_one_process']}"
        )
        assert res["moved"] > 1e-4, key  # training happened
        if name == "Adam32bit":
            tol = 1e-6
        elif model == "aligned":  # same blocks as one process: only the reduction's rounding differs
            tol = 0.05 * lr
        else:
            # a block split between ranks has an absmax per rank, so its codes differ a little; where that or the
            # reduction's rounding flips the code of a tiny second moment, an element's steps differ by up to ~lr
            # each: a few elements move differently, the rest as in one process (states in wrong places would
            # move whole tensors differently: a mean difference of a good part of lr)
            tol = 3.0 * lr
            assert res["mean"] <= 0.05 * lr, f"{key}: mean abs param difference {res['mean']:.3g}"
        assert res["diff"] <= tol, f"{key}: max abs param difference {res['diff']:.3g} > {tol:.3g}"
        # the ranks' states add up to the one-process states, plus an absmax per block split between ranks (three
        # weights, two states) and, for 4-bit codes, a byte per state for the head of odd length of ``odd``
        assert 0 <= r0[key]["bytes"] + r1[key]["bytes"] - res["bytes_one_process"] <= 4 * 3 * 2 + 2
    # states of the local shard; 8 bits decided on the global size (l1.weight: 4800, 2400 per rank)
    lay0, lay1 = r0["layout"], r1["layout"]
    assert lay0["l1.weight"] == ((50, 48), torch.uint8, (10,))  # elements 0..2399: blocks 0..9
    assert lay1["l1.weight"] == ((50, 48), torch.uint8, (10,))  # 2400..4799: blocks 9..18 (9 split)
    assert lay0["l2.weight"] == ((33, 100), torch.uint8, (13,)) and lay1["l2.weight"][0] == (32, 100)
    assert lay0["row"] == ((1, 4608), torch.uint8, (18,)) and lay1["row"] == ((0, 4608), torch.uint8, (0,))
    assert lay0["l1.bias"][1] == torch.float32 and lay0["l1.bias"][2] is None


# ----------------------------------------------------------------------------------------------- DCP
def _states(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """A copy of every parameter's optimizer state, by parameter name."""
    return {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}


CKPT_OPT = "Adam8bit-percentile"  # codes, absmax, 32-bit states and percentile histories


def _dcp_roundtrip(rank: int, world: int, run_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )
    from torch.utils._pytree import tree_map_only

    base = make_net(uneven=True)
    xs, ys = batches(base, 6)
    xs, ys = my_half(xs, rank), my_half(ys, rank)
    model = shard(copy.deepcopy(base))
    opt = make_opt(CKPT_OPT, model)
    train(model, opt, xs[:3], ys[:3])
    # the local states before saving: saving makes blocks split between ranks canonical (one code at most)
    before = _states(opt, model)
    layouts = {n: qop.optim._distributed.layout(p) for n, p in model.named_parameters()}
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(run_dir / "ckpt"))
    gathered = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    gathered = tree_map_only(Tensor, Tensor.clone, gathered)  # as torch.optim's, it holds the live 0-d tensors
    after = _states(opt, model)
    train(model, opt, xs[3:], ys[3:])

    fresh = shard(copy.deepcopy(base))
    fresh_opt = make_opt(CKPT_OPT, fresh)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(run_dir / "ckpt"))
    set_state_dict(fresh, fresh_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    loaded = _states(fresh_opt, fresh)
    train(fresh, fresh_opt, xs[3:], ys[3:])

    results = {
        "resume_diff": max_diff(fresh, model),
        "loaded_equal": all(torch.equal(full(loaded[n][k]), full(after[n][k])) for n in after for k in after[n]),
        "before": before,
        "after": after,
        "layouts": layouts,
        "final": {n: full(p) for n, p in model.named_parameters()},
    }
    # the gathered (full) state dict loads too, here into a fresh sharded optimizer
    from_full = shard(copy.deepcopy(base))
    from_full_opt = make_opt(CKPT_OPT, from_full)
    set_optimizer_state_dict(from_full, from_full_opt, gathered, options=StateDictOptions(full_state_dict=True))
    results["full_unequal"] = [
        f"{n}.{k}"
        for n, p in from_full.named_parameters()
        for k in after[n]
        if not torch.equal(full(from_full_opt.state[p][k]), full(after[n][k]))
    ]
    if rank == 0:
        torch.save(gathered, run_dir / "gathered.pt")
    torch.save(results, run_dir / f"dcp{rank}.pt")


def local_block_values(absmax: Tensor, lay: Any) -> Tensor:
    """Per element of a rank's shard, the absmax of its block (a partial head block, then 256-blocks)."""
    sizes = [min(BLOCKSIZE, lay.numel - lo) for lo in range(lay.head, lay.numel, BLOCKSIZE)]
    sizes = ([lay.head] if lay.head else []) + sizes
    return absmax.repeat_interleave(torch.tensor(sizes, dtype=torch.long)) if sizes else absmax[:0]


def test_dcp_resume_and_reshard(tmp_path):
    """DCP: saved on 2 ranks, resumed on 2 ranks bit-identically; loaded into one process (no process group)
    and on 3 ranks exactly as saved, within one code step of the states before saving, and training goes on;
    the gathered state dict and the DCP checkpoint describe the same state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict, set_state_dict

    run_dir = launch(_dcp_roundtrip, tmp_path)
    r = [torch.load(run_dir / f"dcp{k}.pt", weights_only=False) for k in range(WORLD)]
    for k in range(WORLD):
        assert r[k]["resume_diff"] == 0.0
        assert r[k]["loaded_equal"] and not r[k]["full_unequal"], r[k]["full_unequal"]

    # one process, no process group: the plain model and optimizer load the sharded checkpoint
    assert not dist.is_initialized()
    base = make_net(uneven=True)
    model = copy.deepcopy(base)
    opt = make_opt(CKPT_OPT, model)
    model_sd, optim_sd = get_state_dict(model, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(run_dir / "ckpt"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    errors, split_blocks = {}, 0
    for n, p in model.named_parameters():
        st = opt.state[p]
        for j, key in ((0, "state1"), (1, "state2")):
            if st[key].dtype != torch.uint8:  # float32 states: exactly the ranks' pieces
                pieces = [r[k]["before"][n][key].reshape(-1) for k in range(WORLD)]
                assert torch.equal(st[key].reshape(-1), torch.cat(pieces))
                continue
            code = qop.dynamic_map(signed=opt.state_signed[j])
            loaded = st[key].reshape(-1).long()
            assert torch.equal(loaded, torch.cat([r[k]["after"][n][key].reshape(-1) for k in range(WORLD)]).long())
            # values before saving (each rank's blocks) against the loaded ones (global blocks)
            before = torch.cat(
                [
                    code[r[k]["before"][n][key].reshape(-1).long()]
                    * local_block_values(r[k]["before"][n][f"absmax{j + 1}"], r[k]["layouts"][n])
                    for k in range(WORLD)
                ]
            )
            absmax = st[f"absmax{j + 1}"].repeat_interleave(BLOCKSIZE)[: loaded.numel()]
            now = code[loaded] * absmax
            up, down = code[(loaded + 1).clamp(max=255)] - code[loaded], code[loaded] - code[(loaded - 1).clamp(min=0)]
            gap = torch.maximum(up, down)  # one code step around the loaded code
            err = (now - before).abs() / (gap * absmax).clamp_min(1e-30)
            errors[f"{n}.{key}"] = float(err.max())
            changed = set(((now != before).nonzero().view(-1) // BLOCKSIZE).tolist())
            starts = {r[k]["layouts"][n].start for k in range(WORLD) if r[k]["layouts"][n].numel}
            split = {s // BLOCKSIZE for s in starts if s % BLOCKSIZE}
            split_blocks += len(split)
            assert changed <= split, f"{n}.{key}: values changed outside the blocks split between ranks"
    print("value error of the loaded states, in code steps:", errors)
    assert max(errors.values()) <= 1.0, errors
    assert split_blocks > 0  # the model does split blocks
    torch.save(errors, run_dir / "code_errors.pt")

    # the gathered state dict loads into one process as the same state as the DCP checkpoint
    other = copy.deepcopy(base)
    other_opt = make_opt(CKPT_OPT, other)
    set_optimizer_state_dict(other, other_opt, torch.load(run_dir / "gathered.pt", weights_only=False))
    for p, q in zip(model.parameters(), other.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, other_opt.state[q][k]), k

    # training goes on from the loaded state, within 8-bit tolerance of the 2-rank run
    xs, ys = batches(base, 6)
    train(model, opt, xs[3:], ys[3:])
    final = r[0]["final"]
    diff = torch.no_grad()(lambda: max(float((p - final[n]).abs().max()) for n, p in model.named_parameters()))()
    assert diff <= 1e-2, diff

    # and on 3 ranks: other shard boundaries, other blocks split between ranks
    (tmp_path / "three").mkdir()
    three_dir = launch(_dcp_load_on_three, tmp_path / "three", run_dir, world=3)
    for k in range(3):
        res = torch.load(three_dir / f"three{k}.pt")
        assert not res["unequal"], res["unequal"]
        assert res["diff"] <= 1e-2, res["diff"]


def _dcp_load_on_three(rank: int, world: int, run_dir: Path, saved: Path) -> None:
    """Load the 2-rank checkpoint on 3 ranks: the states are the saved ones, training goes on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_state_dict,
    )

    base = make_net(uneven=True)
    model = shard(copy.deepcopy(base))
    opt = make_opt(CKPT_OPT, model)
    model_sd, optim_sd = get_state_dict(model, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(saved / "ckpt"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    gathered = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    expected = torch.load(saved / "gathered.pt", weights_only=False)
    unequal = [
        f"{n}.{k}"
        for n, st in expected["state"].items()
        for k, v in st.items()
        if not torch.equal(gathered["state"][n][k], v)
    ]
    xs, ys = batches(base, 6)
    train(model, opt, xs[3:], ys[3:])  # the whole batch on every rank: the averaged gradient is the same
    final = torch.load(saved / "dcp0.pt", weights_only=False)["final"]
    with torch.no_grad():
        diff = max(float((full(p) - final[n]).abs().max()) for n, p in model.named_parameters())
    torch.save({"unequal": unequal, "diff": diff}, run_dir / f"three{rank}.pt")


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_parity(rank: int, world: int, run_dir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    base = make_net(uneven=True)
    xs, ys = batches(base, N_STEPS)
    results = {}
    for name in DDP_OPTIMIZERS:
        ref = copy.deepcopy(base)
        train(ref, make_opt(name, ref), xs, ys)
        model = DDP(copy.deepcopy(base))
        train(model, make_opt(name, model), my_half(xs, rank), my_half(ys, rank))
        results[name] = {"diff": max_diff(model.module, ref), "moved": max_diff(model.module, base)}
    torch.save(results, run_dir / f"ddp{rank}.pt")


def test_ddp_matches_one_process(parity_run):
    """DDP with each optimizer matches one process on the same global batches."""
    run_dir = parity_run
    results = torch.load(run_dir / "ddp0.pt")
    for name, res in results.items():
        lr = LR.get(name, 1e-2)
        print(f"DDP {name:12s} max abs param diff {res['diff']:.3e}")
        assert res["moved"] > 1e-4
        assert res["diff"] <= (1e-6 if name == "Adam32bit" else 0.05 * lr), (name, res)


# ------------------------------------------------------------------------------------------- compiled
#: inductor's C++ code generation takes over a minute on two cores, so CI traces through AOTAutograd
#: (functionalization included) and runs the graph eagerly; QOP_DIST_COMPILE_BACKEND=inductor for the full path
COMPILE_BACKEND = os.environ.get("QOP_DIST_COMPILE_BACKEND", "aot_eager")


def _compiled_step(rank: int, world: int, run_dir: Path) -> None:
    from torch._dynamo.utils import counters

    base = make_net(uneven=True)
    xs, ys = batches(base, 3)
    xs, ys = my_half(xs, rank), my_half(ys, rank)
    out = {}
    # split blocks (two entries per shard) and global gradient norms; packed 4-bit codes with an odd head
    for name in (CKPT_OPT, "AdamW4bit"):
        runs = []
        for compiled in (False, True):
            model = shard(copy.deepcopy(base))
            opt = make_opt(name, model)
            step = torch.compile(opt.step, fullgraph=True, backend=COMPILE_BACKEND) if compiled else opt.step
            counters.clear()
            train(model, opt, xs, ys, step)
            runs.append(model)
        out[name] = {"diff": max_diff(*runs), "graphs": int(counters["stats"]["unique_graphs"])}
        torch._dynamo.reset()
    torch.save(out, run_dir / f"compiled{rank}.pt")


def _other_placements(rank: int, world: int, run_dir: Path) -> None:
    """A parameter sharded on dim 1 is refused at its first step, before any state is made."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    p = nn.Parameter(distribute_tensor(torch.randn(64, 96), mesh, [Shard(1)]))
    p.grad = distribute_tensor(torch.ones(64, 96), mesh, [Shard(1)])
    opt = qop.optim.AdamW4bit([p], min_8bit_size=0)
    try:
        opt.step()
        error = "stepped"
    except NotImplementedError as exc:
        error = str(exc)
    Path(run_dir, f"placements{rank}").write_text(f"{error}\nstate: {dict(opt.state[p])}")


def _mixed_formats(rank: int, world: int, run_dir: Path) -> None:
    """One FSDP2 optimizer over three state formats (AdamW4bit, module overrides put l1.weight in 8 bits and
    l2.weight in fp8), against one process with the same overrides."""
    base = make_net(uneven=True)
    xs, ys = batches(base, 4)

    def run(model: Net, xs: Tensor, ys: Tensor) -> torch.optim.Optimizer:
        manager = qop.optim.GlobalOptimManager.get_instance()
        manager.register_module_override(model.l1, "weight", {"optim_bits": 8})
        manager.register_module_override(model.l2, "weight", {"optim_bits": "fp8"})
        opt = qop.optim.AdamW4bit(model.parameters(), lr=1e-2)
        train(model, opt, xs, ys)
        return opt

    ref = copy.deepcopy(base)
    run(ref, xs, ys)
    model = shard(copy.deepcopy(base))
    opt = run(model, my_half(xs, rank), my_half(ys, rank))
    params = dict(model.named_parameters())
    kinds = {n: (str(opt.state[p]["state1"].dtype), opt.state[p]["state1"].numel()) for n, p in params.items()}
    numels = {n: p.to_local().numel() for n, p in params.items()}  # elements of the local shard
    out = {"diff": max_diff(model, ref), "mean": mean_diff(model, ref), "kinds": kinds, "numels": numels}
    torch.save(out, run_dir / f"mixed{rank}.pt")


@pytest.fixture(scope="module")
def docs_and_compile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One spawn for the documentation's examples, the compiled step and placements other than dim-0 shards."""
    return launch(
        run_all,
        tmp_path_factory.mktemp("docs"),
        _run_docs,
        _compiled_step,
        _other_placements,
        _mixed_formats,
        timeout=3 * TIMEOUT,
    )


def test_mixed_formats_in_one_fsdp2_optimizer(docs_and_compile_run):
    """Per-parameter overrides under FSDP2: 4-bit, 8-bit and fp8 states in one optimizer, each of the local shard,
    training like one process (split blocks aside: see test_fsdp2_matches_one_process)."""
    lr = 1e-2
    for k in range(WORLD):
        res = torch.load(Path(docs_and_compile_run, f"mixed{k}.pt"))
        kinds, numels = res["kinds"], res["numels"]
        assert kinds["l1.weight"] == ("torch.uint8", numels["l1.weight"])  # 8-bit codes: one per element
        assert kinds["l2.weight"] == ("torch.float8_e4m3fn", numels["l2.weight"])
        assert kinds["odd"][0] == "torch.uint8" and kinds["odd"][1] < numels["odd"]  # packed 4-bit codes
        assert kinds["l1.bias"][0] == "torch.float32"
        assert res["diff"] <= 3 * lr and res["mean"] <= 0.05 * lr, res


def test_other_placements_refused(docs_and_compile_run):
    for k in range(WORLD):
        error, state = Path(docs_and_compile_run, f"placements{k}").read_text().splitlines()
        assert error == (
            "qop: DTensor parameters must be sharded on dim 0 (FSDP2's default) or replicated, got (Shard(dim=1),)"
        )
        assert state == "state: {}"


def test_compiled_fsdp2_step(docs_and_compile_run):
    """``torch.compile(opt.step, fullgraph=True)`` over FSDP2 parameters: one graph (no graph break, no
    recompile over three steps) that computes what the eager step does.  (The optimizer step alone: the
    FSDP2 forward/backward are left eager.)"""
    run_dir = docs_and_compile_run
    for k in range(WORLD):
        for name, res in torch.load(run_dir / f"compiled{k}.pt").items():
            assert res["graphs"] == 1, (name, res)
            assert res["diff"] <= 1e-6, (name, res)


# ----------------------------------------------------------------------------------------------- docs
def doc_blocks() -> list[str]:
    """The python code blocks of docs/distributed.md, in order."""
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)


def _run_docs(rank: int, world: int, run_dir: Path) -> None:
    cwd = os.getcwd()
    os.chdir(run_dir)  # the examples write their checkpoints to relative paths
    try:
        namespace: dict[str, Any] = {"__name__": "docs"}
        for block in doc_blocks():
            exec(compile(block, str(DOCS), "exec"), namespace)
    finally:
        os.chdir(cwd)
    torch.save({"ok": True}, run_dir / f"docs{rank}.pt")


def test_docs_examples_run(docs_and_compile_run):
    """Every code block of docs/distributed.md runs, on 2 ranks, in order."""
    assert len(doc_blocks()) >= 2
    run_dir = docs_and_compile_run
    assert all(torch.load(run_dir / f"docs{k}.pt")["ok"] for k in range(WORLD))


def test_sharded_layout_blocks():
    """Layout arithmetic: the blocks of a shard are the global 256-blocks it touches, the first one partial
    when the shard starts inside a block."""
    from qop.optim._distributed import Layout
    from qop.optim._sharded_state import _block_range

    lay = Layout(start=2400, numel=2400, total=4800, local_shape=(50, 48))  # 2400 = 9 * 256 + 96
    assert (lay.head, lay.first_block, lay.nblocks) == (160, 9, 10)
    assert _block_range(lay, 0) == (0, 160) and _block_range(lay, 1) == (160, 416)
    assert _block_range(lay, 9) == (2208, 2400)  # the last block: from 160 + 8 * 256 to the end
    assert Layout(0, 4608, 4608, (1, 4608)).nblocks == 18 and Layout(4608, 0, 4608, (0, 4608)).nblocks == 0
    tiny = Layout(start=300, numel=100, total=1000, local_shape=(100,))
    assert (tiny.head, tiny.nblocks) == (100, 1)


# ------------------------------------------------------------------------------ 4-bit, fp8 and bf16 states
def test_sharded_4bit_packing():
    """4-bit codes of a shard are packed per op entry (a head of odd length takes a byte of its own); the pieces
    of every shard come out of the packed codes of the whole parameter, and unpack to the shard's codes."""
    from qop import reference
    from qop._schema import StateFormat
    from qop.optim._distributed import Layout, pack_local, unpack_local
    from qop.optim._sharded_state import _local_packed

    total = 9 * 515
    codes = torch.randint(0, 16, (total,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = reference.pack4(codes)
    for start, numel in ((0, 2575), (2575, 2060), (1545, 1545), (4000, 635), (4635, 0), (129, 3)):
        lay = Layout(start, numel, total, (numel,), 128)
        local = pack_local(codes[start : start + numel], lay)
        assert local.numel() == lay.entries(StateFormat.BLOCKWISE4)[-1].s1
        assert torch.equal(unpack_local(local, lay), codes[start : start + numel])
        assert torch.equal(_local_packed(whole, lay), local)
    head, body = Layout(2575, 2060, total, (4, 515), 128).entries(StateFormat.BLOCKWISE4)
    assert (head.lo, head.hi, head.s0, head.s1, head.a0, head.a1, head.head) == (0, 113, 0, 57, 0, 1, True)
    assert (body.lo, body.hi, body.s0, body.s1, body.a0, body.a1, body.head) == (113, 2060, 57, 1031, 1, 17, False)


def _dcp_formats(rank: int, world: int, run_dir: Path) -> None:
    """Per format: train, DCP save, go on; a fresh sharded optimizer loads the checkpoint and goes on too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )
    from torch.utils._pytree import tree_map_only

    base = make_net(uneven=True)
    xs, ys = batches(base, 6)
    xs, ys = my_half(xs, rank), my_half(ys, rank)
    results, cross = {}, {}
    for name in FORMAT_OPTIMIZERS:
        model = shard(copy.deepcopy(base))
        opt = make_opt(name, model)
        train(model, opt, xs[:3], ys[:3])
        before = _states(opt, model)  # saving makes blocks split between ranks canonical
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(run_dir / name))
        gathered = None
        if name in GATHERED:
            gathered = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
            gathered = tree_map_only(Tensor, Tensor.clone, gathered)
            if rank == 0:
                torch.save(gathered, run_dir / f"{name}-gathered.pt")
        after = _states(opt, model)
        layouts = {n: qop.optim._distributed.layout(p) for n, p in model.named_parameters()}
        from_full_unequal = None
        if gathered is not None:  # the gathered (full) state dict loads into a fresh sharded optimizer as the state
            from_full = shard(copy.deepcopy(base))
            from_full_opt = make_opt(name, from_full)
            set_optimizer_state_dict(from_full, from_full_opt, gathered, options=StateDictOptions(full_state_dict=True))
            got = _states(from_full_opt, from_full)
            from_full_unequal = [f"{n}.{k}" for n in after for k in after[n] if not torch.equal(got[n][k], after[n][k])]
            if name == "AdamW4bit":  # and into sharded optimizers of other formats, converted
                for target in ("AdamWFp8", "AdamW8bit"):
                    other = shard(copy.deepcopy(base))
                    other_opt = make_opt(target, other)
                    options = StateDictOptions(full_state_dict=True)
                    set_optimizer_state_dict(other, other_opt, gathered, options=options)
                    cross[target] = {"states": _states(other_opt, other), "after": after, "layouts": layouts}
        train(model, opt, xs[3:], ys[3:])

        fresh = shard(copy.deepcopy(base))
        fresh_opt = make_opt(name, fresh)
        model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(run_dir / name))
        set_state_dict(fresh, fresh_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        loaded = _states(fresh_opt, fresh)
        train(fresh, fresh_opt, xs[3:], ys[3:])
        results[name] = {
            "resume_diff": max_diff(fresh, model),
            "unequal": [f"{n}.{k}" for n in after for k in after[n] if not torch.equal(loaded[n][k], after[n][k])],
            "from_full_unequal": from_full_unequal,
            "before": before,
            "after": after,
            "layouts": layouts,
            "final": {n: full(p).detach().clone() for n, p in model.named_parameters()},
        }
    torch.save(results, run_dir / f"formats{rank}.pt")
    torch.save(cross, run_dir / f"cross{rank}.pt")


def _formats_on_three(rank: int, world: int, run_dir: Path, saved: Path) -> None:
    """Load each 2-rank checkpoint on 3 ranks (other shard boundaries, other split blocks); training goes on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = {}
    for name in FORMAT_OPTIMIZERS:
        base = make_net(uneven=True)
        model = shard(copy.deepcopy(base))
        opt = make_opt(name, model)
        model_sd, optim_sd = get_state_dict(model, opt)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(saved / name))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        loaded = _states(opt, model)
        layouts = {n: qop.optim._distributed.layout(p) for n, p in model.named_parameters()}
        xs, ys = batches(base, 6)
        train(model, opt, xs[3:], ys[3:])
        final = torch.load(saved / "formats0.pt", weights_only=False)[name]["final"]
        with torch.no_grad():
            diff = max(float((full(p) - final[n]).abs().max()) for n, p in model.named_parameters())
        out[name] = {"loaded": loaded, "layouts": layouts, "diff": diff}
    torch.save(out, run_dir / f"three{rank}.pt")


def _values(opt: Any, st: dict[str, Tensor], j: int, lay: Any, fmt: Any) -> Tensor:
    """Float32 values of state ``j`` (flat) of a local shard laid out as ``lay`` (or of a whole parameter)."""
    from qop._schema import FORMAT_BLOCKSIZE
    from qop.optim._distributed import dequantize_local

    q = st[f"state{j + 1}"]
    if fmt not in FORMAT_BLOCKSIZE:
        return q.float().reshape(-1).clone()  # never a view of a live state
    books = opt._codes.get((q.device, fmt))
    return dequantize_local(fmt, q, st[f"absmax{j + 1}"], books[j] if books else None, lay)


def test_dcp_formats_resume_and_reshard(tmp_path):
    """4-bit codes (an odd head included), fp8 values and bfloat16 states of FSDP2 shards through DCP: resumed on
    2 ranks bit-identically; loaded into one process as exactly the values the ranks held after saving, which
    differ from those before saving only in blocks split between ranks and by one code at most; the gathered
    state dict loads as the same state; loaded on 3 ranks as the same values; training goes on from each."""
    import dataclasses

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict, set_state_dict

    from qop._maps import code_book
    from qop._schema import FORMAT_BLOCKSIZE, StateFormat
    from qop.optim import _formats
    from qop.optim._distributed import layout
    from qop.optim._formats import format_of

    run_dir = launch(_dcp_formats, tmp_path)
    r = [torch.load(run_dir / f"formats{k}.pt", weights_only=False) for k in range(WORLD)]
    assert not dist.is_initialized()
    seen = set()
    values: dict[tuple[str, str, int], Tensor] = {}  # the loaded states of one process, as float32 values
    for name in FORMAT_OPTIMIZERS:
        for k in range(WORLD):
            assert r[k][name]["resume_diff"] == 0.0, name
            assert not r[k][name]["unequal"], (name, r[k][name]["unequal"])
            assert r[k][name]["from_full_unequal"] == ([] if name in GATHERED else None), name
        base = make_net(uneven=True)
        model = copy.deepcopy(base)
        opt = make_opt(name, model)
        model_sd, optim_sd = get_state_dict(model, opt)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(run_dir / name))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        if name in GATHERED:  # the gathered state dict loads as the same state
            other = copy.deepcopy(base)
            other_opt = make_opt(name, other)
            gathered = torch.load(run_dir / f"{name}-gathered.pt", weights_only=False)
            set_optimizer_state_dict(other, other_opt, gathered)
            for p, q in zip(model.parameters(), other.parameters()):
                for key, v in opt.state[p].items():
                    assert torch.equal(v, other_opt.state[q][key]), (name, key)
        for n, p in model.named_parameters():
            st = opt.state[p]
            fmt = format_of(st, p.numel(), opt._format(opt.param_groups[0], p))
            seen.add(fmt)
            lays = [dataclasses.replace(r[k][name]["layouts"][n], block=layout(p, fmt).block) for k in range(WORLD)]
            for j in range(2):
                now = values[name, n, j] = _values(opt, st, j, layout(p, fmt), fmt)
                after = torch.cat([_values(opt, r[k][name]["after"][n], j, lays[k], fmt) for k in range(WORLD)])
                before = torch.cat([_values(opt, r[k][name]["before"][n], j, lays[k], fmt) for k in range(WORLD)])
                assert torch.equal(now, after), (name, n, j)
                if fmt not in FORMAT_BLOCKSIZE:
                    assert torch.equal(before, after), (name, n, j)
                    continue
                bs = FORMAT_BLOCKSIZE[fmt]
                changed = set(((now != before).nonzero().view(-1) // bs).tolist())
                split = {lay.start // bs for lay in lays if lay.numel and lay.start % bs}
                assert changed <= split, (name, n, j, changed, split)
                scale = st[f"absmax{j + 1}"].repeat_interleave(bs)[: now.numel()]
                if fmt == StateFormat.FP8:  # one e4m3 step: 2^-3 of the value, 2^-9 of the scale below 2^-6
                    step = now.abs() / 8 + scale / 512
                else:
                    book = code_book(opt.state_signed[j], 4)
                    step = (book[1:] - book[:-1]).max() * scale
                assert bool(((now - before).abs() <= step).all()), (name, n, j)
        xs, ys = batches(base, 6)
        train(model, opt, xs[3:], ys[3:])
        final = r[0][name]["final"]
        with torch.no_grad():
            diff = max(float((p - final[n]).abs().max()) for n, p in model.named_parameters())
        assert diff <= 1e-2, (name, diff)
    assert {StateFormat.BLOCKWISE4, StateFormat.FP8, StateFormat.BFLOAT16} <= seen

    # the gathered 4-bit state dict loaded into sharded fp8 and 8-bit optimizers: each rank's states are in the
    # optimizer's format and hold the 4-bit values of its elements, within that format's resolution
    model = make_net(uneven=True)
    for target in ("AdamWFp8", "AdamW8bit"):
        ours, theirs = make_opt(target, model), make_opt("AdamW4bit", model)
        for k in range(WORLD):
            c = torch.load(run_dir / f"cross{k}.pt", weights_only=False)[target]
            for n, p in model.named_parameters():
                fmt, fmt4 = ours._format(ours.param_groups[0], p), theirs._format(theirs.param_groups[0], p)
                lay, lay4 = (dataclasses.replace(c["layouts"][n], block=layout(p, f).block) for f in (fmt, fmt4))
                for j in range(2):
                    if fmt in FORMAT_BLOCKSIZE:  # the code books of the loading optimizer, made on its first step
                        ours._codes.setdefault((p.device, fmt), _formats.books(fmt, ours.state_signed, p.device))
                    got = _values(ours, c["states"][n], j, lay, fmt)
                    if fmt in FORMAT_BLOCKSIZE:
                        theirs._codes.setdefault((p.device, fmt4), _formats.books(fmt4, theirs.state_signed, p.device))
                    want = _values(theirs, c["after"][n], j, lay4, fmt4)
                    assert got.shape == want.shape, (target, n, j)
                    if want.numel():
                        assert float((got - want).abs().max()) <= 0.07 * float(want.abs().max()), (target, n, j)

    (tmp_path / "three").mkdir()
    three_dir = launch(_formats_on_three, tmp_path / "three", run_dir, world=3)
    three = [torch.load(three_dir / f"three{k}.pt", weights_only=False) for k in range(3)]
    for name in FORMAT_OPTIMIZERS:
        model = make_net(uneven=True)
        opt = make_opt(name, model)
        for n, p in model.named_parameters():
            fmt = opt._format(opt.param_groups[0], p)
            lays = [dataclasses.replace(three[k][name]["layouts"][n], block=layout(p, fmt).block) for k in range(3)]
            for j in range(2):
                pieces = [_values(opt, three[k][name]["loaded"][n], j, lays[k], fmt) for k in range(3)]
                assert torch.equal(torch.cat(pieces), values[name, n, j]), (name, n, j)
        for k in range(3):
            assert three[k][name]["diff"] <= 1e-2, (name, three[k][name]["diff"])
