"""Long runs stay steady: no memory growth over many eager steps, no recompile over many compiled steps.

A leak of one small object per step is invisible in a test of a few steps and fatal to a run of millions; a
recompile triggered by a changing lr stalls training at every change. These tests run long enough to see both:
100,000 eager steps with the process's resident memory (``/proc/self/statm``) and Python's allocated blocks read
at intervals, and 10,000 compiled steps with the lr changed at every one by a scheduler and by ``fill_``.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.eval_frame
import torch._dynamo.utils

import qop
from qop import HP
from qop.optim import QopOptimizer

MiB = 1 << 20
#: allowed growth of the resident set from the first reading after the warm-up to the last
RSS_BOUND = 2 * MiB
#: allowed growth of Python's allocated blocks over the same span (a leak of one object per step adds ~90,000)
BLOCKS_BOUND = 2_000
STATM = "/proc/self/statm"
requires_statm = pytest.mark.skipif(not os.path.exists(STATM), reason="reads the resident set from /proc/self/statm")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tensors are tiny: one intra-op thread is fastest, and steadier on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def _fresh_dynamo() -> Iterator[None]:
    """The compiled test starts with empty dynamo caches and counters, and leaves none behind."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _rss() -> int:
    """Resident set size of this process in bytes (second field of ``/proc/self/statm``, in pages)."""
    with open(STATM) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _adam8bit(seed: int = 0) -> QopOptimizer:
    """Adam8bit over two 4096-element params (8-bit states) and a 100-element one (32-bit states), two groups,
    gradients set once (a step neither frees nor replaces them)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in (4096, 4096, 100)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 1e-4}]
    return qop.optim.Adam8bit(groups, lr=1e-4, min_8bit_size=4096)


def _readings(step: Callable[[], None], steps: int, intervals: int, warmup: int) -> tuple[list[int], list[int]]:
    """Run ``warmup`` steps, then ``steps`` more, reading (after a collection) the resident set and Python's
    allocated blocks before the first of them and after each of ``intervals`` equal parts."""
    for _ in range(warmup):
        step()
    rss, blocks = [], []
    for part in range(intervals + 1):
        if part:
            for _ in range(steps // intervals):
                step()
        gc.collect()
        rss.append(_rss())
        blocks.append(sys.getallocatedblocks())
    return rss, blocks


def _leaks(rss: list[int], blocks: list[int]) -> bool:
    """Whether the readings grew past either bound from the first to the last."""
    return rss[-1] - rss[0] >= RSS_BOUND or blocks[-1] - blocks[0] >= BLOCKS_BOUND


def _report(rss: list[int], blocks: list[int]) -> str:
    """The readings as growth from the first, for assertion messages."""
    kib = [(r - rss[0]) // 1024 for r in rss]
    return f"resident set growth (KiB) {kib}, allocated blocks growth {[b - blocks[0] for b in blocks]}"


# ------------------------------------------------------------------------------------------- memory
@requires_statm
def test_100k_eager_steps_do_not_grow_memory() -> None:
    """100,000 eager Adam8bit steps (8-17 s: ~0.1 ms each) after 2,000 warm-up steps: the resident set grows by less
    than ``RSS_BOUND`` and Python's allocated blocks by less than ``BLOCKS_BOUND``; states and buckets stay put."""
    opt = _adam8bit()
    opt.step()
    states = {id(v) for st in opt.state.values() for v in st.values()}
    plans = len(opt._plans)
    rss, blocks = _readings(opt.step, steps=100_000, intervals=10, warmup=2_000)
    assert not _leaks(rss, blocks), _report(rss, blocks)
    assert {id(v) for st in opt.state.values() for v in st.values()} == states
    assert len(opt._plans) == plans
    for st in opt.state.values():
        assert float(st["step"]) == 102_001


@requires_statm
def test_the_memory_readings_catch_a_small_leak() -> None:
    """The same readings over 20,000 steps that each keep one 0-d tensor alive exceed the bounds: the test above
    would see a leak of that size (about 0.5 KiB a step) well before its 100,000 steps."""
    opt = _adam8bit()
    kept: list[torch.Tensor] = []

    def leaky_step() -> None:
        opt.step()
        kept.append(torch.zeros(()))

    rss, blocks = _readings(leaky_step, steps=20_000, intervals=4, warmup=500)
    # (resident memory alone may not show it: the allocator can serve the kept tensors from memory the steps'
    # temporaries freed; the count of allocated blocks does)
    assert blocks[-1] - blocks[0] >= BLOCKS_BOUND, _report(rss, blocks)
    assert _leaks(rss, blocks)


# --------------------------------------------------------------------------------------- recompiles
class _CountingBackend:
    """``aot_eager``, counting the graphs it is handed (1 over a whole run = no graph break and no recompile)."""

    def __init__(self) -> None:
        self.inner = torch._dynamo.lookup_backend("aot_eager")
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        return self.inner(gm, example_inputs)


def _cache_entries(fn: Callable[..., Any]) -> list[Any]:
    """Dynamo's cache entries (compiled code and its guards) for the code object of ``fn``."""
    return torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__)


def _set_lrs(opts: tuple[QopOptimizer, ...], scheds: tuple[Any, ...], i: int) -> None:
    """Step each scheduler (group 0 and 1), then overwrite group 1's lr in place: two lr changes per step."""
    for opt, sched in zip(opts, scheds):
        sched.step()
        opt.param_groups[1]["lr"].fill_(1e-4 * (1 + i % 7))


@requires_statm
@pytest.mark.usefixtures("_fresh_dynamo")
def test_10k_compiled_steps_never_recompile() -> None:
    """10,000 steps of ``torch.compile(lambda: opt.step(), fullgraph=True)`` with the lr changed at every step by
    LambdaLR and by ``fill_``: one graph and one cache entry from the first step to the last, no memory growth after
    a warm-up, and the same results as an eager twin fed the same lrs and gradients. 10-30 s (1-3 ms a step with
    ``aot_eager`` and the eager twin): 10,000 is about the most that fits ~30 s."""
    opt, ref = _adam8bit(), _adam8bit()
    lam = lambda s: 1.0 / (1.0 + 1e-3 * s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lam)
    backend = _CountingBackend()
    fn = lambda: opt.step()
    step = torch.compile(fn, backend=backend, fullgraph=True)
    step()
    ref.step()
    (entry,) = _cache_entries(fn)
    i = 0

    def both() -> None:
        nonlocal i
        i += 1
        _set_lrs((opt, ref), (sched, ref_sched), i)
        step()
        ref.step()

    with torch._dynamo.config.patch(error_on_recompile=True):
        rss, blocks = _readings(both, steps=9_500, intervals=5, warmup=499)
    assert i == 9_999
    assert backend.graphs == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    entries = _cache_entries(fn)
    assert len(entries) == 1 and entries[0].compile_id == entry.compile_id
    assert not _leaks(rss, blocks), _report(rss, blocks)

    assert float(opt.param_groups[0]["hp"][HP.LR]) == pytest.approx(1e-4 * lam(i))
    assert float(opt.param_groups[1]["hp"][HP.LR]) == pytest.approx(1e-4 * (1 + i % 7))
    for ga, gb in zip(opt.param_groups, ref.param_groups):
        assert torch.equal(ga["hp"], gb["hp"])
        for p, q in zip(ga["params"], gb["params"]):
            assert torch.equal(p, q)
            for key, v in opt.state[p].items():
                assert torch.equal(v, ref.state[q][key]), key
    assert float(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 10_000
