"""Launchers of the fused step kernel (``_kernel.py``): ``qop::step`` on CUDA, one launch over every tensor of a
call (eager) or one launch per tensor with every written tensor an argument (what torch.compile traces); two
launches with Flag.UNORM_CLIP.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .._schema import BLOCKSIZE, FORMAT_BLOCKSIZE, MAX_STATES, Flag, StateFormat, n_states, split_states
from . import _multi_tensor as mt
from ._common import GATHER, is_interpreted, launch, tuning_size
from ._kernel import _step_multi, _step_single


# ------------------------------------------------------------------------------------------ launchers
def _passes(flags: int, unorm: Tensor | None) -> tuple[int, ...]:
    """Launches of a step: the whole step, or with UNORM_CLIP the norms then the step (the norms alone when
    ``unorm`` gives them: they are copied into the sums that the second pass reads and resets)."""
    if not flags & Flag.UNORM_CLIP:
        return (0,)
    return (2,) if unorm is not None else (1, 2)


def _run_multi(
    rule,
    flags,
    params,
    grads,
    states,
    absmax,
    steps,
    hp,
    codes,
    gscale,
    found_inf,
    unorm,
    chunk: int | None,
    config: dict | None,
    fmt: StateFormat = StateFormat.FLOAT32,
) -> None:
    """One launch (two with UNORM_CLIP) over all tensors, driven by cached device metadata."""
    n = len(params)
    if n == 0:
        return
    k = n_states(rule, flags, len(states[0]) > 0)
    quant = absmax is not None
    chunk = chunk or mt.CHUNK
    rows = []
    for i in range(n):
        row: list[Tensor | None] = [params[i], grads[i], None, None, None, None, None, None, steps[i]]
        for j in range(k):
            row[mt.SLOT_S1 + j] = states[j][i]
            if quant:
                row[mt.SLOT_A1 + j] = absmax[j][i]
        rows.append(row)
    meta = mt.metadata(rows, chunk)
    total = sum(p.numel() for p in params)
    like = [states[j][0] if j < k else hp for j in range(3)]
    like_absmax = [absmax[j][0] if quant and j < k else hp for j in range(3)]
    args = _args(
        params[0],
        grads[0],
        like,
        like_absmax,
        steps[0],
        codes,
        hp,
        gscale,
        found_inf,
        meta.table,
        meta.chunks,
        meta.work,
        meta.norms,
        0,
        0,
        total,
    )
    if unorm is not None and flags & Flag.UNORM_CLIP:
        meta.norms.copy_(unorm)
    for pass_ in _passes(flags, unorm):
        consts = _consts(rule, flags, k, fmt, pass_, True, gscale, found_inf, meta.aligned, chunk)
        key = ("step", total.bit_length(), params[0].dtype, like[0].dtype, *consts.values())
        launch(_step_multi, (meta.n_chunks,), key, params[0].device, config, **args, **consts)


def _run_single(
    rule,
    flags,
    params,
    grads,
    states,
    absmax,
    steps,
    hp,
    codes,
    gscale,
    found_inf,
    unorm,
    chunk: int | None,
    config: dict | None,
    fmt: StateFormat = StateFormat.FLOAT32,
) -> None:
    """One launch per tensor with every tensor an explicit argument: what torch.compile traces."""
    n = len(params)
    if n == 0:
        return
    k = n_states(rule, flags, len(states[0]) > 0)
    quant = absmax is not None
    chunk = chunk or mt.CHUNK
    work = torch.zeros(1 + n, dtype=torch.int32, device=hp.device)
    norms = torch.zeros(n, 2, dtype=torch.float64, device=hp.device) if flags & Flag.UNORM_CLIP else hp
    if unorm is not None and flags & Flag.UNORM_CLIP:
        norms = unorm.to(torch.float64, copy=True)  # the second pass resets the sums it reads: never the caller's
    for i in range(n):
        numel = params[i].numel()
        st = [states[j][i] if j < k else hp for j in range(3)]
        am = [absmax[j][i] if quant and j < k else hp for j in range(3)]
        args = _args(
            params[i], grads[i], st, am, steps[i], codes, hp, gscale, found_inf, hp, hp, work, norms, numel, i, numel
        )
        grid = (mt.n_programs(numel, chunk),)
        for pass_ in _passes(flags, unorm):
            consts = _consts(rule, flags, k, fmt, pass_, False, gscale, found_inf, False, chunk)
            if config is not None or is_interpreted(_step_single):
                key = ("step1", tuning_size(numel), params[i].dtype, st[0].dtype, *consts.values())
                launch(_step_single, grid, key, params[i].device, config, **args, **consts)
            else:
                torch.library.wrap_triton(_step_single)[grid](**args, **consts)


def _args(
    p, g, states, absmax, step, codes, hp, gscale, found_inf, table, chunks, work, norms, numel, tensor_index, size
) -> dict:
    codes = codes if codes is not None else (hp, hp, hp)
    return dict(
        p_ptr=p,
        g_ptr=g,
        s1_ptr=states[0],
        s2_ptr=states[1],
        s3_ptr=states[2],
        a1_ptr=absmax[0],
        a2_ptr=absmax[1],
        a3_ptr=absmax[2],
        step_ptr=step,
        code1_ptr=codes[0],
        code2_ptr=codes[1],
        code3_ptr=codes[2],
        hp_ptr=hp,
        gscale_ptr=hp if gscale is None else gscale,
        found_inf_ptr=hp if found_inf is None else found_inf,
        table_ptr=table,
        chunks_ptr=chunks,
        work_ptr=work,
        norms_ptr=norms,
        numel=numel,
        tensor_index=tensor_index,
        size_class=tuning_size(size),
    )


def _consts(rule, flags, n_states, fmt, pass_, multi, gscale, found_inf, aligned, chunk) -> dict:
    return dict(
        RULE=int(rule),
        FLAGS=int(flags),
        N_STATES=n_states,
        QUANT=int(fmt),
        PASS=pass_,
        MULTI=multi,
        HAS_GSCALE=gscale is not None,
        HAS_FOUND_INF=found_inf is not None,
        ALIGNED=aligned,
        GATHER=GATHER,
        CHUNK=chunk,
        ROW=FORMAT_BLOCKSIZE.get(StateFormat(fmt), BLOCKSIZE),
    )


def step(
    rule,
    flags,
    params,
    grads,
    states,
    absmax,
    codes,
    steps,
    hp,
    gscale=None,
    found_inf=None,
    unorm=None,
    *,
    multi: bool = True,
    chunk: int | None = None,
    config: dict | None = None,
) -> None:
    """``qop::step`` on CUDA (or under TRITON_INTERPRET=1 on CPU tensors).

    ``multi``: one launch for all tensors (eager) or one per tensor (the torch.compile decomposition);
    ``chunk`` / ``config`` (``{"BLOCK": ..., "num_warps": ...}``) override the defaults, for tests.
    """
    k, fmt = _checks.check_step(rule, flags, params, grads, states, absmax, codes, steps, hp, gscale, found_inf, unorm)
    if config is not None and (config["BLOCK"] % BLOCKSIZE or config["BLOCK"] <= 0):
        raise ValueError(f"qop: BLOCK must be a positive multiple of {BLOCKSIZE}, got {config['BLOCK']}")
    n = len(params)
    nested = split_states(states, n)
    # the state format: one branch per format, each the same kernel with its own constexprs
    if fmt in (StateFormat.FLOAT32, StateFormat.BFLOAT16):  # values: the state pointers' type says which
        blocks, books = None, None
    elif fmt == StateFormat.BLOCKWISE8:
        blocks, books = split_states(absmax, n), [*codes, *[hp] * (MAX_STATES - k)]
    elif fmt == StateFormat.BLOCKWISE4:
        blocks, books = split_states(absmax, n), [*codes, *[hp] * (MAX_STATES - k)]
    elif fmt == StateFormat.FP8:  # the kernel reads and writes the bytes (its own exact e4m3fn conversion)
        nested = [[s.view(torch.uint8) for s in st] for st in nested]
        blocks, books = split_states(absmax, n), None
    else:  # pragma: no cover - a format that _checks knows and this kernel does not
        raise NotImplementedError(f"qop: no Triton kernel for {fmt.name} states")
    nested += [[] for _ in range(MAX_STATES - len(nested))]  # the launchers take three lists
    run = _run_multi if multi else _run_single
    run(rule, flags, params, grads, nested, blocks, steps, hp, books, gscale, found_inf, unorm, chunk, config, fmt)
