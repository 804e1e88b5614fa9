"""The fused optimizer step kernel: one kernel for every rule and state format (the constexpr ``QUANT``: float32,
8-bit, 4-bit, fp8), one or many tensors.

Each program owns one chunk of one tensor and walks it in tiles of ``BLOCK`` elements laid out as
``[BLOCK // ROW, ROW]`` (one row per block of the format: 256, 128 for 4-bit; the 4-bit and fp8 tiles are read
and written by ``_lowbit``): load param and grad, dequantize the states, apply the
rule in float32 (``_rules._rule``, selected by the constexpr ``RULE``), write the param and requantize the
states with a fresh absmax per row.  Hyper-parameters, the step count, the gradient scale and the
found-inf flag are read from device memory; only the rule, the flags and the tile sizes are constexpr.

``PASS`` 0 is the whole step.  Flag.UNORM_CLIP takes two launches: ``PASS`` 1 accumulates each tensor's
``sum(u^2)`` and ``sum(p^2)`` with atomics, ``PASS`` 2 is the step with the clip factor applied.
The last program of a tensor to finish (an atomic chunk counter) writes the new step count and
resets the counter and the sums, so no other launch is needed and the buffers are ready for the next
call (and the next CUDA-graph replay).

The launchers that run it (one launch for many tensors, or one per tensor under torch.compile) are in
``_step.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._schema import FP8_FIRST_ZERO_FREE_STATE, HP, Flag, StateFormat
from . import _lowbit
from ._common import (
    _code_book,
    _encode,
    _lookup,
    _round_to,
    _row_absmax,
    _sr_key,
    _stochastic_round_bf16,
)
from ._multi_tensor import K_N_SLOTS, K_SLOT_A1, K_SLOT_G, K_SLOT_NUMEL, K_SLOT_P, K_SLOT_S1, K_SLOT_STEP, load_slot
from ._rules import _rule, _schedule, _unorm_clip

_HP_LR = tl.constexpr(int(HP.LR))
_HP_BETA1 = tl.constexpr(int(HP.BETA1))
_HP_BETA2 = tl.constexpr(int(HP.BETA2))
_HP_BETA3 = tl.constexpr(int(HP.BETA3))
_HP_EPS = tl.constexpr(int(HP.EPS))
_HP_WD = tl.constexpr(int(HP.WEIGHT_DECAY))
_HP_ALPHA = tl.constexpr(int(HP.ALPHA))
_HP_DAMPENING = tl.constexpr(int(HP.DAMPENING))
_HP_LR_DECAY = tl.constexpr(int(HP.LR_DECAY))
_HP_MAX_UNORM = tl.constexpr(int(HP.MAX_UNORM))
_HP_T_ALPHA = tl.constexpr(int(HP.T_ALPHA))
_HP_T_BETA3 = tl.constexpr(int(HP.T_BETA3))
_HP_SR_SEED = tl.constexpr(int(HP.SR_SEED))
_STOCHASTIC_ROUND = tl.constexpr(int(Flag.STOCHASTIC_ROUND))

#: ``QUANT``: the states' format (``StateFormat``), a constexpr: one kernel branch per format.
_F32 = tl.constexpr(int(StateFormat.FLOAT32))
_B8 = tl.constexpr(int(StateFormat.BLOCKWISE8))
_B4 = tl.constexpr(int(StateFormat.BLOCKWISE4))
_FP8 = tl.constexpr(int(StateFormat.FP8))
_FP8_FIRST_ZERO_FREE_STATE = tl.constexpr(FP8_FIRST_ZERO_FREE_STATE)


# ----------------------------------------------------------------------------------- state access
@triton.jit
def _load_state(
    s_ptr,
    a_ptr,
    code,
    code_ptr,
    offs,
    mask,
    blocks,
    block_mask,
    off,
    rows,
    end,
    QUANT: tl.constexpr,
    GATHER: tl.constexpr,
    ROW: tl.constexpr,
):
    """A state tile in float32, plus what a dry run writes back (codes and absmax, or the values)."""
    if QUANT == _B4:
        x, absmax = _lowbit.load4(s_ptr, a_ptr, code_ptr, off, rows, end, blocks, block_mask, ROW)
        return x, x, absmax
    elif QUANT == _FP8:
        return _lowbit.load_fp8(s_ptr, a_ptr, offs, mask, blocks, block_mask)
    elif QUANT == _B8:
        q = tl.load(s_ptr + offs, mask=mask, other=0)
        absmax = tl.load(a_ptr + blocks, mask=block_mask, other=0.0)
        x = _lookup(code, code_ptr, q.to(tl.int32), GATHER) * absmax[:, None]
        return x, q, absmax
    else:  # float32 or bfloat16 values
        x = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return x, x, x


@triton.jit
def _store_state(
    s_ptr,
    a_ptr,
    x,
    old_q,
    old_absmax,
    mids,
    floor,
    code_ptr,
    offs,
    mask,
    blocks,
    block_mask,
    dry,
    off,
    rows,
    end,
    QUANT: tl.constexpr,
    GATHER: tl.constexpr,
    ROW: tl.constexpr,
    J: tl.constexpr,
):
    """Write state ``J`` of a tile; blockwise formats: requantize each row (one block) against a fresh absmax."""
    if QUANT == _B4:
        _lowbit.store4(s_ptr, a_ptr, code_ptr, x, old_absmax, off, rows, mask, end, blocks, block_mask, dry, ROW)
    elif QUANT == _FP8:
        zero_free: tl.constexpr = J >= _FP8_FIRST_ZERO_FREE_STATE
        _lowbit.store_fp8(s_ptr, a_ptr, x, old_q, old_absmax, offs, mask, blocks, block_mask, dry, zero_free)
    elif QUANT == _B8:
        absmax = _row_absmax(tl.where(mask, x, 0.0))
        scale = tl.where(absmax > 0, absmax, 1.0)
        q = _encode(x, scale[:, None], mids, floor, code_ptr, GATHER)
        tl.store(s_ptr + offs, tl.where(dry, old_q.to(tl.int32), q).to(tl.uint8), mask=mask)
        tl.store(a_ptr + blocks, tl.where(dry, old_absmax, absmax), mask=block_mask)
    else:  # values, rounded to nearest-even when bfloat16
        tl.store(s_ptr + offs, _round_to(tl.where(dry, old_q, x), s_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------- kernel
@triton.jit
def _step_kernel(
    p_ptr,
    g_ptr,
    s1_ptr,
    s2_ptr,
    s3_ptr,
    a1_ptr,
    a2_ptr,
    a3_ptr,
    step_ptr,
    code1_ptr,
    code2_ptr,
    code3_ptr,
    hp_ptr,
    gscale_ptr,
    found_inf_ptr,
    table_ptr,
    chunks_ptr,
    work_ptr,
    norms_ptr,
    numel,
    tensor_index,
    size_class,
    RULE: tl.constexpr,
    FLAGS: tl.constexpr,
    N_STATES: tl.constexpr,
    QUANT: tl.constexpr,
    PASS: tl.constexpr,
    MULTI: tl.constexpr,
    HAS_GSCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    GATHER: tl.constexpr,
    CHUNK: tl.constexpr,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Step over one chunk.  MULTI: the chunk and its tensor come from the metadata tables and the
    pointer arguments only carry element types; otherwise the pointers are the tensor's own and
    program i owns elements [i*CHUNK, (i+1)*CHUNK).  ``size_class`` only keys the autotuner."""
    pid = tl.program_id(0).to(tl.int64)
    if MULTI:
        ti = tl.load(chunks_ptr + 2 * pid)
        start = tl.multiple_of(tl.load(chunks_ptr + 2 * pid + 1), CHUNK)
        row = table_ptr + ti * K_N_SLOTS
        numel = tl.load(row + K_SLOT_NUMEL)
        if ALIGNED:
            numel = tl.multiple_of(numel, 16)
        p_ptr = load_slot(row, K_SLOT_P, p_ptr, ALIGNED)
        g_ptr = load_slot(row, K_SLOT_G, g_ptr, ALIGNED)
        s1_ptr = load_slot(row, K_SLOT_S1, s1_ptr, ALIGNED)
        s2_ptr = load_slot(row, K_SLOT_S1 + 1, s2_ptr, ALIGNED)
        s3_ptr = load_slot(row, K_SLOT_S1 + 2, s3_ptr, ALIGNED)
        a1_ptr = load_slot(row, K_SLOT_A1, a1_ptr, ALIGNED)
        a2_ptr = load_slot(row, K_SLOT_A1 + 1, a2_ptr, ALIGNED)
        a3_ptr = load_slot(row, K_SLOT_A1 + 2, a3_ptr, ALIGNED)
        step_ptr = load_slot(row, K_SLOT_STEP, step_ptr, False)
    else:
        ti = tensor_index
        start = pid * CHUNK
        numel = pid * 0 + numel  # a tensor even where Triton specializes numel == 1 to a constant
    n_chunks = tl.maximum((numel + CHUNK - 1) // CHUNK, 1)

    old_step = tl.load(step_ptr)
    t = old_step + 1.0
    keep = True
    if HAS_FOUND_INF:
        keep = tl.load(found_inf_ptr).to(tl.float32) == 0.0
    dry = tl.load(work_ptr) != 0  # autotuner timing run: write back what was read
    gscale = 1.0
    if HAS_GSCALE:
        gscale = tl.load(gscale_ptr + ti)
    end = tl.minimum(start + CHUNK, numel)
    end = tl.where(keep, end, start)  # found_inf: touch nothing

    lr = tl.load(hp_ptr + _HP_LR)
    b1 = tl.load(hp_ptr + _HP_BETA1)
    b2 = tl.load(hp_ptr + _HP_BETA2)
    eps = tl.load(hp_ptr + _HP_EPS)
    wd = tl.load(hp_ptr + _HP_WD)
    alpha = tl.load(hp_ptr + _HP_ALPHA)
    damp = tl.load(hp_ptr + _HP_DAMPENING)
    c1, c2, lr_eff, decay, alpha_t, b3_t = _schedule(
        t,
        lr,
        b1,
        b2,
        tl.load(hp_ptr + _HP_BETA3),
        wd,
        alpha,
        tl.load(hp_ptr + _HP_LR_DECAY),
        tl.load(hp_ptr + _HP_T_ALPHA),
        tl.load(hp_ptr + _HP_T_BETA3),
        RULE,
        FLAGS,
    )
    sr_key = tl.full((), 0, tl.uint32)
    if _STOCHASTIC_ROUND & FLAGS:
        sr_key = _sr_key(tl.load(hp_ptr + _HP_SR_SEED), t)
    clip = 1.0
    if PASS == 2:
        sum_u2 = tl.load(norms_ptr + 2 * ti)
        sum_p2 = tl.load(norms_ptr + 2 * ti + 1)
        clip = _unorm_clip(sum_u2, sum_p2, tl.load(hp_ptr + _HP_MAX_UNORM))

    code1, mids1, floor1 = 0.0, 0.0, 0  # placeholders where a state is absent or 32-bit
    code2, mids2, floor2 = 0.0, 0.0, 0
    code3, mids3, floor3 = 0.0, 0.0, 0
    if QUANT == _B8:
        if N_STATES >= 1:
            code1, mids1, floor1 = _code_book(code1_ptr)
        if N_STATES >= 2:
            code2, mids2, floor2 = _code_book(code2_ptr)
        if N_STATES >= 3:
            code3, mids3, floor3 = _code_book(code3_ptr)

    NB: tl.constexpr = BLOCK // ROW  # one row of a tile per block of the format: its absmax is a row reduction
    rows = tl.arange(0, NB)
    tile = rows[:, None] * ROW + tl.arange(0, ROW)[None, :]
    acc_u2 = tl.zeros((NB, ROW), tl.float64)  # float64 sums, as reference.l2_norm
    acc_p2 = tl.zeros((NB, ROW), tl.float64)
    for off in range(start, end, BLOCK):
        offs = off + tile
        mask = offs < end
        blocks = off // ROW + rows
        block_mask = off + rows * ROW < end
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gscale
        m1, q1, am1 = 0.0, 0.0, 0.0  # placeholders where a state is absent
        m2, q2, am2 = 0.0, 0.0, 0.0
        m3, q3, am3 = 0.0, 0.0, 0.0
        if N_STATES >= 1:
            m1, q1, am1 = _load_state(
                s1_ptr, a1_ptr, code1, code1_ptr, offs, mask, blocks, block_mask, off, rows, end, QUANT, GATHER, ROW
            )
        if N_STATES >= 2:
            m2, q2, am2 = _load_state(
                s2_ptr, a2_ptr, code2, code2_ptr, offs, mask, blocks, block_mask, off, rows, end, QUANT, GATHER, ROW
            )
        if N_STATES >= 3:
            m3, q3, am3 = _load_state(
                s3_ptr, a3_ptr, code3, code3_ptr, offs, mask, blocks, block_mask, off, rows, end, QUANT, GATHER, ROW
            )
        m1, m2, m3, u = _rule(
            p, g, m1, m2, m3, t, b1, b2, eps, wd, alpha, damp, c1, c2, alpha_t, b3_t, RULE, FLAGS, N_STATES
        )
        if PASS == 1:
            u64, p64 = u.to(tl.float64), p.to(tl.float64)
            acc_u2 += tl.where(mask, u64 * u64, 0.0)
            acc_p2 += tl.where(mask, p64 * p64, 0.0)
        else:
            new_p = tl.where(dry, p, p * decay - lr_eff * clip * u)
            if _STOCHASTIC_ROUND & FLAGS:  # bfloat16 params (checked)
                tl.store(p_ptr + offs, _stochastic_round_bf16(new_p, sr_key, offs), mask=mask)
            else:
                tl.store(p_ptr + offs, _round_to(new_p, p_ptr.dtype.element_ty), mask=mask)
            if N_STATES >= 1:
                _store_state(
                    s1_ptr,
                    a1_ptr,
                    m1,
                    q1,
                    am1,
                    mids1,
                    floor1,
                    code1_ptr,
                    offs,
                    mask,
                    blocks,
                    block_mask,
                    dry,
                    off,
                    rows,
                    end,
                    QUANT,
                    GATHER,
                    ROW,
                    0,
                )
            if N_STATES >= 2:
                _store_state(
                    s2_ptr,
                    a2_ptr,
                    m2,
                    q2,
                    am2,
                    mids2,
                    floor2,
                    code2_ptr,
                    offs,
                    mask,
                    blocks,
                    block_mask,
                    dry,
                    off,
                    rows,
                    end,
                    QUANT,
                    GATHER,
                    ROW,
                    1,
                )
            if N_STATES >= 3:
                _store_state(
                    s3_ptr,
                    a3_ptr,
                    m3,
                    q3,
                    am3,
                    mids3,
                    floor3,
                    code3_ptr,
                    offs,
                    mask,
                    blocks,
                    block_mask,
                    dry,
                    off,
                    rows,
                    end,
                    QUANT,
                    GATHER,
                    ROW,
                    2,
                )

    if PASS == 1:
        tl.atomic_add(norms_ptr + 2 * ti, tl.where(dry, 0.0, tl.sum(acc_u2)))
        tl.atomic_add(norms_ptr + 2 * ti + 1, tl.where(dry, 0.0, tl.sum(acc_p2)))
    else:
        # The last program of this tensor (every other one has read the step and the sums before
        # its acq_rel increment) advances the step and resets the counter and the sums.
        done = tl.atomic_add(work_ptr + 1 + ti, 1)
        last = done == n_chunks - 1
        advance = tl.where(dry, 0.0, tl.where(keep, 1.0, 0.0))
        tl.store(step_ptr, old_step + advance, mask=last)
        tl.store(work_ptr + 1 + ti, 0, mask=last)
        if PASS == 2:
            tl.store(norms_ptr + 2 * ti, tl.where(dry, sum_u2, 0.0), mask=last)
            tl.store(norms_ptr + 2 * ti + 1, tl.where(dry, sum_p2, 0.0), mask=last)


# --------------------------------------------------------------------------------------- autotuning
#: First entry: the interpreter's and CUDA-graph capture's fallback.  Tiles of 2-8 blocks of 256 with
#: 4 or 8 warps (4-8 elements per thread, 16-byte vector loads); the kernel is memory bound, so these
#: only trade occupancy against loads in flight.  16 elements per thread needs ~200 registers for
#: three 8-bit states (sm_90, ptxas), so larger tiles are left out.
CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=8),
    triton.Config({"BLOCK": 2048}, num_warps=8),
]
_KEY = ["size_class", "RULE", "FLAGS", "N_STATES", "QUANT", "PASS", "MULTI"]
_MUTATED = ["p_ptr", "s1_ptr", "s2_ptr", "s3_ptr", "a1_ptr", "a2_ptr", "a3_ptr", "step_ptr", "work_ptr", "norms_ptr"]


def _dry_run_on(kwargs, reset_only=False):
    """Autotuner timing runs of a multi-tensor launch write back what they read (see ``dry``)."""
    if not reset_only:
        kwargs["work_ptr"][:1].fill_(1)


def _dry_run_off(kwargs, exception=None):
    kwargs["work_ptr"][:1].fill_(0)


# Multi-tensor launches write through addresses read from a table, which ``restore_value`` cannot
# snapshot; their timing runs are dry runs instead (same traffic, same bytes written back).
_step_multi = triton.autotune(CONFIGS, key=_KEY, pre_hook=_dry_run_on, post_hook=_dry_run_off)(_step_kernel)
# Per-tensor launches (the torch.compile decomposition) pass every tensor they write as an argument;
# inductor supports ``restore_value`` (not hooks) and clones mutated arguments itself when tuning.
_step_single = triton.autotune(CONFIGS, key=_KEY, restore_value=_MUTATED)(_step_kernel)
