"""Pure-PyTorch reference of every ``qop`` op: the oracle of tests and benchmarks.

It is also registered as the kernel for devices that have no native one (see ``qop/__init__.py``).
Written for clarity, one tensor at a time; the math is float32 whatever the parameter dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._schema import (
    FORMAT_BLOCKSIZE,
    FP8_FIRST_ZERO_FREE_STATE,
    FP8_MAX,
    FP8_MIN_ABSMAX,
    HISTORY,
    HP,
    MIX32_MULTIPLIERS,
    Flag,
    Rule,
    StateFormat,
    n_states,
    state_format,
)


# ----------------------------------------------------------------------------------------- quantize
def nearest_code(x: Tensor, code: Tensor) -> Tensor:
    """Index of the entry of the sorted ``code`` nearest to each ``x`` (ties go to the lower entry).

    The index is the number of midpoints ``0.5 * (code[i] + code[i + 1])`` strictly below x.
    """
    mids = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(mids.contiguous(), x.contiguous(), right=False).to(torch.uint8)


def unsigned_floor(code: Tensor) -> Tensor:
    """The smallest code a positive value may take with ``code`` (a 0-d int64 tensor, no host sync).

    A code book is *unsigned* when no entry is negative (or NaN) and some entry is positive, like
    ``dynamic_map(signed=False)``: the floor is then the number of its zero entries (in a sorted book,
    the index of the smallest positive entry), so that a positive value never rounds to zero, which
    would turn a second moment into 0 under a non-zero first moment.  Other books: 0 (no floor).
    """
    unsigned = (code >= 0).all() & (code > 0).any()
    return torch.where(unsigned, (code == 0).sum(), 0)


def encode(x: Tensor, normed: Tensor, code: Tensor) -> Tensor:
    """Codes of values ``x`` normalized by their block's absmax to ``normed``: the nearest code, raised to
    ``unsigned_floor(code)`` where ``x > 0`` (judged on x, so a positive x whose quotient underflows
    to 0 still takes the floor)."""
    q = nearest_code(normed, code)
    floor = unsigned_floor(code).to(torch.uint8)
    return torch.where(x > 0, torch.maximum(q, floor), q)


def quantize_blockwise(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """uint8 codes shaped like A and the float32 absmax of each block of ``blocksize`` elements."""
    n = A.numel()
    nblocks = -(-n // blocksize)
    x = A.reshape(-1).float()
    pad = nblocks * blocksize - n
    blocks = torch.nn.functional.pad(x, (0, pad)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1) if nblocks else torch.zeros(0, device=A.device)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (blocks / scale[:, None]).reshape(-1)[:n]
    q = encode(x, normed, code.float())
    return q.view(A.shape), absmax.float()


def dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    """``code[A] * absmax[block]`` in float32, returned in ``dtype``."""
    n = A.numel()
    values = code.float()[A.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).view(A.shape).to(dtype)


# ------------------------------------------------------------------------------ 4-bit and fp8 states
def pack4(q: Tensor) -> Tensor:
    """4-bit codes (uint8 values < 16, any shape) packed two per byte: element 2i in the low nibble, 2i+1 in the
    high one (an odd count leaves the last high nibble 0)."""
    flat = q.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack4(packed: Tensor, numel: int) -> Tensor:
    """The ``numel`` 4-bit codes of :func:`pack4`'s bytes, as uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:numel]


def quantize_fp8(x: Tensor, zero_free: bool = False) -> tuple[Tensor, Tensor]:
    """float8_e4m3fn codes of float32 ``x`` (flat) and one float32 scale ``max(absmax, 1e-12) / 448`` per
    FP8_BLOCKSIZE-block: ``x / scale`` rounded to nearest-even (``zero_free``: see :func:`fp8_zero_free`)."""
    bs = FORMAT_BLOCKSIZE[StateFormat.FP8]
    n = x.numel()
    nblocks = -(-n // bs)
    blocks = torch.nn.functional.pad(x.reshape(-1).float(), (0, nblocks * bs - n)).view(nblocks, bs)
    absmax = blocks.abs().amax(dim=1) if nblocks else x.new_zeros(0, dtype=torch.float32)
    scale = torch.clamp(absmax, min=FP8_MIN_ABSMAX) / FP8_MAX
    codes = (blocks / scale[:, None]).reshape(-1)[:n].to(torch.float8_e4m3fn)
    return (fp8_zero_free(codes, x) if zero_free else codes), scale


def fp8_zero_free(codes: Tensor, x: Tensor) -> Tensor:
    """fp8 ``codes`` of the values ``x`` with every positive value whose code is 0 raised to the smallest
    subnormal (byte 1): the second moments' rule (FP8_FIRST_ZERO_FREE_STATE)."""
    b = codes.reshape(-1).view(torch.uint8)
    raised = torch.where((b == 0) & (x.reshape(-1) > 0), torch.ones_like(b), b)
    return raised.view(torch.float8_e4m3fn).view(codes.shape)


def dequantize_fp8(codes: Tensor, scale: Tensor) -> Tensor:
    """``code * scale`` in float32, flat."""
    n = codes.numel()
    bs = FORMAT_BLOCKSIZE[StateFormat.FP8]
    return codes.reshape(-1).float() * scale.float().repeat_interleave(bs)[:n]


def quantize_state(fmt: StateFormat, x: Tensor, code: Tensor | None, j: int = 0) -> tuple[Tensor, Tensor | None]:
    """A float32 state (flat; state ``j`` of its tensor) in a format: the state tensor (flat) and its absmax/scales
    (None for float32 and bfloat16)."""
    if fmt == StateFormat.FLOAT32:
        return x.reshape(-1).float(), None
    if fmt == StateFormat.BFLOAT16:  # .to() rounds to nearest-even
        return x.reshape(-1).to(torch.bfloat16), None
    if fmt == StateFormat.FP8:
        return quantize_fp8(x, zero_free=j >= FP8_FIRST_ZERO_FREE_STATE)
    assert code is not None
    q, a = quantize_blockwise(x.reshape(-1).float(), code, FORMAT_BLOCKSIZE[fmt])
    return (pack4(q) if fmt == StateFormat.BLOCKWISE4 else q), a


def dequantize_state(fmt: StateFormat, state: Tensor, absmax: Tensor | None, code: Tensor | None, numel: int) -> Tensor:
    """A state of ``numel`` values in a format, as flat float32: the one place that reads each format."""
    if fmt in (StateFormat.FLOAT32, StateFormat.BFLOAT16):
        return state.reshape(-1).float()
    assert absmax is not None
    if fmt == StateFormat.FP8:
        return dequantize_fp8(state, absmax)
    assert code is not None
    q = unpack4(state.reshape(-1), numel) if fmt == StateFormat.BLOCKWISE4 else state.reshape(-1)
    return dequantize_blockwise(q, absmax, code, FORMAT_BLOCKSIZE[fmt], torch.float32)


# ------------------------------------------------------------------------------------------- rules
def _beta3_schedule(t: Tensor, b1: Tensor, b3: Tensor, t_beta3: Tensor) -> Tensor:
    """AdEMAMix beta3 warm-up: exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), capped at b3."""
    frac = t / t_beta3
    lb1, lb3 = torch.log(b1), torch.log(b3)
    return torch.minimum(torch.exp(lb1 * lb3 / ((1 - frac) * lb3 + frac * lb1)), b3)


def rule_update(
    rule: int, flags: int, p: Tensor, g: Tensor, states: list[Tensor], t: Tensor, hp: Tensor
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Apply one rule to float32 tensors.

    Returns ``(new_states, u, lr_eff, decay)``: the parameter update is
    ``p_new = p * decay - lr_eff * scale * u`` where ``scale`` is the update-norm clip (1 if off).
    """
    lr, b1, b2, b3 = hp[HP.LR], hp[HP.BETA1], hp[HP.BETA2], hp[HP.BETA3]
    eps, wd, alpha = hp[HP.EPS], hp[HP.WEIGHT_DECAY], hp[HP.ALPHA]
    one = torch.ones((), dtype=torch.float32, device=p.device)
    decay = one
    lr_eff = lr
    if rule == Rule.ADAM:
        m, v = states[0], states[1]
        if flags & Flag.L2_WEIGHT_DECAY:
            g = g + wd * p
        else:
            decay = 1 - lr * wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        new = [m, v]
        vd = v
        if flags & Flag.AMSGRAD:
            vd = torch.maximum(states[2], v)
            new.append(vd)
        if flags & Flag.NO_BIAS_CORRECTION:
            c1, c2 = one, one
        else:
            c1, c2 = 1 - b1**t, torch.sqrt(1 - b2**t)
        u = (c2 / c1) * m / (torch.sqrt(vd) + eps * c2)
    elif rule == Rule.MOMENTUM:
        g = g + wd * p
        if states:
            buf = torch.where(t == 1, g, b1 * states[0] + (1 - hp[HP.DAMPENING]) * g)
            new = [buf]
            u = g + b1 * buf if flags & Flag.NESTEROV else buf
        else:
            new, u = [], g
    elif rule == Rule.ADAGRAD:
        g = g + wd * p
        s = states[0] + g * g
        new = [s]
        lr_eff = lr / (1 + (t - 1) * hp[HP.LR_DECAY])
        u = g / (torch.sqrt(s) + eps)
    elif rule == Rule.RMSPROP:
        g = g + wd * p
        s = alpha * states[0] + (1 - alpha) * g * g
        new = [s]
        u = g / (torch.sqrt(s) + eps)
    elif rule == Rule.LION:
        decay = 1 - lr * wd
        u = torch.sign(b1 * states[0] + (1 - b1) * g)
        new = [b2 * states[0] + (1 - b2) * g]
    elif rule == Rule.ADEMAMIX:
        t_alpha, t_beta3 = hp[HP.T_ALPHA], hp[HP.T_BETA3]
        alpha_t = torch.where(t_alpha > 0, torch.minimum(t * alpha / t_alpha, alpha), alpha)
        b3_t = torch.where(t_beta3 > 0, _beta3_schedule(t, b1, b3, t_beta3), b3)
        m1, nu, m2 = states
        m1 = b1 * m1 + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        m2 = b3_t * m2 + (1 - b3_t) * g
        new = [m1, nu, m2]
        decay = 1 - lr * wd
        c1, c2 = 1 - b1**t, torch.sqrt(1 - b2**t)
        u = (m1 / c1 + alpha_t * m2) / (torch.sqrt(nu) / c2 + eps)
    else:
        raise ValueError(f"qop: unknown rule {rule}")
    return new, u, lr_eff, decay


def l2_norm(x: Tensor) -> Tensor:
    """``||x||`` summed in float64 and rounded to float32: float32 squares overflow above ~1.8e19 and vanish
    below ~1e-23, which would make a representable norm inf or 0 (MPS has no float64: float32 there)."""
    acc = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.linalg.vector_norm(x, dtype=acc).float()


def unorm_scale(u: Tensor, p: Tensor, max_unorm: Tensor) -> Tensor:
    """Update-norm clip: ``max_unorm * ||p|| / ||u||`` when ``||u||`` exceeds ``max_unorm * ||p||``."""
    return _clip_scale(l2_norm(u), l2_norm(p), max_unorm)


def unorm_scale_from_sums(sum_u2: Tensor, sum_p2: Tensor, max_unorm: Tensor) -> Tensor:
    """:func:`unorm_scale` from the squared norms (e.g. summed over the shards of a parameter)."""
    return _clip_scale(torch.sqrt(sum_u2.float()), torch.sqrt(sum_p2.float()), max_unorm)


def _clip_scale(unorm: Tensor, pnorm: Tensor, max_unorm: Tensor) -> Tensor:
    limit = max_unorm * pnorm
    clip = (max_unorm > 0) & (unorm > limit)
    return torch.where(clip, limit / torch.where(clip, unorm, torch.ones_like(unorm)), 1.0)


def _apply(
    rule: int,
    flags: int,
    p: Tensor,
    g: Tensor,
    states: list[Tensor],
    step: Tensor,
    hp: Tensor,
    gscale: Tensor | None,
    unorm: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """One parameter's step in float32: returns the new parameter and new states (``unorm``: given squared
    norms of the update and of the parameter, used by the update-norm clip instead of this tensor's)."""
    pf = p.float().reshape(-1)
    gf = g.float().reshape(-1)
    if gscale is not None:
        gf = gf * gscale
    t = step.float() + 1
    new, u, lr_eff, decay = rule_update(rule, flags, pf, gf, states, t, hp.float())
    scale: Tensor | float = 1.0
    if flags & Flag.UNORM_CLIP:
        scale = (
            unorm_scale(u, pf, hp[HP.MAX_UNORM])
            if unorm is None
            else unorm_scale_from_sums(unorm[0], unorm[1], hp[HP.MAX_UNORM])
        )
    return pf * decay - lr_eff * scale * u, new


def step(
    rule: int,
    flags: int,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[Tensor],
    absmax: list[Tensor],
    codes: list[Tensor],
    steps: list[Tensor],
    hp: Tensor,
    gscale: Tensor | None = None,
    found_inf: Tensor | None = None,
    unorm: Tensor | None = None,
) -> None:
    """Reference of ``qop::step``: per tensor, load its states in float32, apply the rule, store them back
    in their format (flat lists: state j of tensor i at ``j * n + i``)."""
    n = len(params)
    k = n_states(rule, flags, len(states) > 0)
    fmt = state_format(states[0].dtype, codes[0].numel() if codes else 256) if k and n else StateFormat.FLOAT32
    for i, (p, g) in enumerate(zip(params, grads)):
        at = [j * n + i for j in range(k)]
        loaded = [_load_state(fmt, states[a], absmax, codes, a, j, p.numel()) for j, a in enumerate(at)]
        new_p, new = _apply(
            rule, flags, p, g, loaded, steps[i], hp, _scale(gscale, i), None if unorm is None else unorm[i]
        )
        keep = _keep(found_inf, p.device)
        if flags & Flag.STOCHASTIC_ROUND:
            rounded = stochastic_round_bf16(new_p, hp[HP.SR_SEED], steps[i].float() + 1)
            p.copy_(torch.where(keep, rounded, p.reshape(-1)).view_as(p))
        else:
            p.copy_(torch.where(keep, new_p, p.float().reshape(-1)).view_as(p))
        for j, (a, s) in enumerate(zip(at, new)):
            _store_state(fmt, s, keep, states[a], absmax, codes, a, j)
        steps[i].add_(keep.float())


def _load_state(
    fmt: StateFormat | None, state: Tensor, absmax: list[Tensor], codes: list[Tensor], at: int, j: int, numel: int
) -> Tensor:
    """State ``at`` (state j of its tensor) in float32 (see :func:`dequantize_state`)."""
    if fmt is None:
        raise ValueError(f"qop: no reference for states of dtype {state.dtype}")
    scales = absmax[at] if absmax else None
    return dequantize_state(fmt, state, scales, codes[j] if codes else None, numel)


def _store_state(
    fmt: StateFormat | None,
    new: Tensor,
    keep: Tensor,
    state: Tensor,
    absmax: list[Tensor],
    codes: list[Tensor],
    at: int,
    j: int,
) -> None:
    """Write a new float32 state back in its format where ``keep`` (found_inf leaves it as it was)."""
    if fmt is None:
        raise ValueError(f"qop: no reference for states of dtype {state.dtype}")
    q, a = quantize_state(fmt, new, codes[j] if codes else None, j)
    bits = state.view(torch.uint8) if fmt == StateFormat.FP8 else state  # torch.where has no fp8 kernel
    bits.copy_(torch.where(keep, q.view(bits.dtype).view(bits.shape), bits))
    if a is not None:
        absmax[at].copy_(torch.where(keep, a, absmax[at]))


# --------------------------------------------------------------------------------- stochastic rounding
_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in [0, 2^32), in halves so that no product leaves int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(x: Tensor) -> Tensor:
    """The "lowbias32" hash on uint32 values held in int64 (the C++ and Triton kernels compute it on uint32)."""
    m1, m2 = MIX32_MULTIPLIERS
    x = x ^ (x >> 16)
    x = _mul32(x, m1)
    x = x ^ (x >> 15)
    x = _mul32(x, m2)
    return x ^ (x >> 16)


def sr_bits(seed: Tensor, t: Tensor, numel: int) -> Tensor:
    """The 16 random bits of each of ``numel`` elements at step ``t`` (int64 in [0, 2^16)): the top half of
    ``mix32(e ^ mix32(seed ^ mix32(t)))`` for element index e (``qop._schema`` states the contract)."""
    key = mix32((seed.to(torch.int64).reshape(()) & _M32) ^ mix32(t.to(torch.int64).reshape(()) & _M32))
    index = torch.arange(numel, dtype=torch.int64, device=seed.device) & _M32
    return mix32(index ^ key) >> 16


def stochastic_round_bf16(x: Tensor, seed: Tensor, t: Tensor) -> Tensor:
    """float32 ``x`` (flat) rounded stochastically to bfloat16: its bits plus :func:`sr_bits`, cut to the top 16,
    i.e. away from zero with probability (x's low 16 bits) / 2^16; a NaN becomes 0x7FC0 (as nearest rounding)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    top = ((bits + sr_bits(seed, t, x.numel())) >> 16) & 0xFFFF
    top = torch.where(torch.isnan(x), 0x7FC0, top)
    return (top - ((top >> 15) << 16)).to(torch.int16).view(torch.bfloat16)


# ------------------------------------------------------------------------------ percentile clipping
def percentile_clip(
    grads: list[Tensor], gnorm_vecs: list[Tensor], steps: list[Tensor], percentile: int, prescale: Tensor
) -> Tensor:
    """Per gradient: ``gnorm = ||g|| * prescale`` goes to slot ``t % 100`` of its history (``t = step + 1``;
    unfilled slots hold +inf); q is entry ``min(floor(filled * percentile / 100), filled - 1)`` of the
    sorted history, ``filled = min(t, 100)``.  Returns ``prescale * min(1, q / gnorm)`` per gradient."""
    pre = prescale.reshape(()).float()
    scales = []
    for g, history, step in zip(grads, gnorm_vecs, steps):
        gnorm = l2_norm(g) * pre
        t = step.reshape(()) + 1
        slot = torch.remainder(t, HISTORY).long().reshape(1)
        history.index_copy_(0, slot, gnorm.reshape(1))
        filled = torch.clamp(t, max=HISTORY)
        idx = torch.clamp(torch.floor(filled * percentile / 100.0), max=filled - 1).long().reshape(1)
        q = torch.sort(history).values.gather(0, idx).reshape(())
        scale = torch.where(gnorm > q, q / torch.where(gnorm > 0, gnorm, torch.ones_like(gnorm)), 1.0)
        scales.append(pre * scale)
    return torch.stack(scales) if scales else torch.empty(0, dtype=torch.float32, device=prescale.device)


def _scale(gscale: Tensor | None, i: int) -> Tensor | None:
    return None if gscale is None else gscale[i].float()


def _keep(found_inf: Tensor | None, device: torch.device) -> Tensor:
    if found_inf is None:
        return torch.ones((), dtype=torch.bool, device=device)
    return found_inf.reshape(()) == 0
