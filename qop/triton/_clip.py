"""Percentile clipping: ``qop::percentile_clip`` for a whole list of gradients in one launch.

Each program sums the squares of one chunk of one gradient (tiles of ``BLOCK``) and adds the sum to
its tensor's slot of ``norms`` with an atomic.  The last program of a tensor to finish (an atomic
chunk counter, as in ``_step``) takes the total and resets the slot and the counter, so the cached
buffers are ready for the next call and the next CUDA-graph replay.  It then records ``||g|| * pre``
in slot ``t % 100`` of the tensor's history, sorts the history (+inf marks unfilled slots) and writes
``pre * min(1, q / ||g||)``, q the entry ``min(floor(filled * percentile / 100), filled - 1)``.

Like the step, the eager call is one launch over the multi-tensor table (``_multi_tensor``: the grad
in slot P, the history in slot S1), and the torch.compile decomposition one launch per tensor with
every tensor it writes passed as an argument.  Timing runs of the autotuner need no care: a run
recomputes and rewrites the same values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from .._schema import HISTORY
from . import _multi_tensor as mt
from ._common import _div, is_interpreted, launch, tuning_size
from ._multi_tensor import K_N_SLOTS, K_SLOT_NUMEL, K_SLOT_P, K_SLOT_S1, K_SLOT_STEP, load_slot

_HISTORY = tl.constexpr(HISTORY)
_HISTORY_P2 = tl.constexpr(triton.next_power_of_2(HISTORY))


@triton.jit
def _clip_kernel(
    g_ptr,
    h_ptr,
    step_ptr,
    pre_ptr,
    out_ptr,
    table_ptr,
    chunks_ptr,
    work_ptr,
    norms_ptr,
    numel,
    tensor_index,
    size_class,
    PERCENTILE: tl.constexpr,
    MULTI: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One chunk of one gradient; see the module docstring.  ``size_class`` only keys the autotuner."""
    pid = tl.program_id(0).to(tl.int64)
    # The same prologue as _step's, inlined on purpose: behind a shared @triton.jit helper, inductor's
    # mutation analysis counts table_ptr and chunks_ptr as written (tests/test_triton.py checks that).
    if MULTI:
        ti = tl.load(chunks_ptr + 2 * pid)
        start = tl.load(chunks_ptr + 2 * pid + 1)
        row = table_ptr + ti * K_N_SLOTS
        numel = tl.load(row + K_SLOT_NUMEL)
        g_ptr = load_slot(row, K_SLOT_P, g_ptr, False)
        h_ptr = load_slot(row, K_SLOT_S1, h_ptr, False)
        step_ptr = load_slot(row, K_SLOT_STEP, step_ptr, False)
    else:
        ti = tensor_index
        start = pid * CHUNK
        numel = pid * 0 + numel  # a tensor even where Triton specializes numel == 1 to a constant
    n_chunks = tl.maximum((numel + CHUNK - 1) // CHUNK, 1)
    end = tl.minimum(start + CHUNK, numel)

    acc = tl.zeros((BLOCK,), tl.float64)  # float64 sums, as reference.l2_norm
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < end, other=0.0).to(tl.float64)
        acc += g * g
    tl.atomic_add(norms_ptr + 2 * ti, tl.sum(acc))
    done = tl.atomic_add(work_ptr + 1 + ti, 1)
    if done == n_chunks - 1:  # the last program of this tensor: every other sum is in
        total = tl.atomic_add(norms_ptr + 2 * ti, 0.0)  # an atomic read: past every other program's add
        tl.store(norms_ptr + 2 * ti, 0.0)
        tl.store(work_ptr + 1 + ti, 0)
        pre = tl.load(pre_ptr)
        gnorm = tl.sqrt(total).to(tl.float32) * pre  # float64 sum, correctly rounded sqrt
        t = tl.load(step_ptr) + 1.0
        hundred = tl.full((), 100.0, tl.float32)
        slot = (t - tl.floor(_div(t, hundred)) * hundred).to(tl.int32)  # torch.remainder(t, 100)
        r = tl.arange(0, _HISTORY_P2)
        history = tl.load(h_ptr + r, mask=r < _HISTORY, other=float("inf"))
        history = tl.where(r == slot, gnorm, history)
        tl.store(h_ptr + r, history, mask=r < _HISTORY)
        filled = tl.minimum(t, hundred)
        idx = tl.minimum(tl.floor(_div(filled * PERCENTILE, hundred)), filled - 1.0).to(tl.int32)
        q = tl.sum(tl.where(r == idx, tl.sort(history), 0.0))
        scale = tl.where(gnorm > q, _div(q, tl.where(gnorm > 0, gnorm, 1.0)), 1.0)
        tl.store(out_ptr + ti, pre * scale)


#: First entry: the interpreter's and CUDA-graph capture's choice.  A reduction: wide tiles, many warps.
CONFIGS = [
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]
_clip = triton.autotune(CONFIGS, key=["size_class", "MULTI"])(_clip_kernel)


def percentile_clip(
    grads: Sequence[Tensor],
    gnorm_vecs: Sequence[Tensor],
    steps: Sequence[Tensor],
    percentile: int,
    prescale: Tensor,
    *,
    multi: bool = True,
    chunk: int | None = None,
    config: dict | None = None,
) -> Tensor:
    """``qop::percentile_clip`` on CUDA (or under TRITON_INTERPRET=1 on CPU tensors).

    ``multi``: one launch for all tensors (eager) or one per tensor (the torch.compile decomposition);
    ``chunk`` / ``config`` (``{"BLOCK": ..., "num_warps": ...}``) override the defaults, for tests.
    """
    _checks.check_percentile_clip(grads, gnorm_vecs, steps, percentile, prescale)
    n = len(grads)
    out = torch.empty(n, dtype=torch.float32, device=prescale.device)
    if n == 0:
        return out
    chunk = chunk or mt.CHUNK
    device = prescale.device
    if multi:
        rows = [[g, None, h, None, None, None, None, None, s] for g, h, s in zip(grads, gnorm_vecs, steps)]
        meta = mt.metadata(rows, chunk)
        total = sum(g.numel() for g in grads)
        launch(
            _clip,
            (meta.n_chunks,),
            ("clip", tuning_size(total), grads[0].dtype, percentile),
            device,
            config,
            g_ptr=grads[0],
            h_ptr=gnorm_vecs[0],
            step_ptr=steps[0],
            pre_ptr=prescale,
            out_ptr=out,
            table_ptr=meta.table,
            chunks_ptr=meta.chunks,
            work_ptr=meta.work,
            norms_ptr=meta.norms,
            numel=0,
            tensor_index=0,
            size_class=tuning_size(total),
            PERCENTILE=percentile,
            MULTI=True,
            CHUNK=chunk,
        )
        return out
    work = torch.zeros(1 + n, dtype=torch.int32, device=device)
    norms = torch.zeros(n, 2, dtype=torch.float64, device=device)
    for i in range(n):
        numel = grads[i].numel()
        args = dict(
            g_ptr=grads[i],
            h_ptr=gnorm_vecs[i],
            step_ptr=steps[i],
            pre_ptr=prescale,
            out_ptr=out,
            table_ptr=work,
            chunks_ptr=work,
            work_ptr=work,
            norms_ptr=norms,
            numel=numel,
            tensor_index=i,
            size_class=tuning_size(numel),
            PERCENTILE=percentile,
            MULTI=False,
            CHUNK=chunk,
        )
        grid = (mt.n_programs(numel, chunk),)
        if config is not None or is_interpreted(_clip):
            launch(_clip, grid, ("clip1", tuning_size(numel), grads[i].dtype, percentile), device, config, **args)
        else:
            torch.library.wrap_triton(_clip)[grid](**args)
    return out
