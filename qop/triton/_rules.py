"""The rule math of the fused step kernel: per-tensor schedules, the per-element rules, the update-norm clip.

The float32 operations of ``qop/reference.py``'s ``rule_update`` in the same order, on Triton tiles; ``RULE``
and ``FLAGS`` are constexpr, so each launch compiles only its own rule.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._schema import Flag, Rule
from ._common import _div, _exp, _log, _nan_max, _pow

_ADAM = tl.constexpr(int(Rule.ADAM))
_MOMENTUM = tl.constexpr(int(Rule.MOMENTUM))
_ADAGRAD = tl.constexpr(int(Rule.ADAGRAD))
_RMSPROP = tl.constexpr(int(Rule.RMSPROP))
_LION = tl.constexpr(int(Rule.LION))
_ADEMAMIX = tl.constexpr(int(Rule.ADEMAMIX))

_NESTEROV = tl.constexpr(int(Flag.NESTEROV))
_AMSGRAD = tl.constexpr(int(Flag.AMSGRAD))
_NO_BIAS_CORRECTION = tl.constexpr(int(Flag.NO_BIAS_CORRECTION))
_L2_WEIGHT_DECAY = tl.constexpr(int(Flag.L2_WEIGHT_DECAY))


# ------------------------------------------------------------------------------------- rule math
@triton.jit
def _schedule(t, lr, b1, b2, b3, wd, alpha, lr_decay, t_alpha, t_beta3, RULE: tl.constexpr, FLAGS: tl.constexpr):
    """Per-tensor scalars of a step: bias corrections, effective lr, decay, AdEMAMix warm-ups."""
    one = tl.full((), 1.0, tl.float32)
    c1 = one
    c2 = one
    lr_eff = lr
    decay = one
    alpha_t = alpha
    b3_t = b3
    if (RULE == _ADAM and not (_NO_BIAS_CORRECTION & FLAGS)) or RULE == _ADEMAMIX:
        c1 = 1.0 - _pow(b1, t)
        c2 = tl.sqrt_rn(1.0 - _pow(b2, t))
    if (RULE == _ADAM and not (_L2_WEIGHT_DECAY & FLAGS)) or RULE == _LION or RULE == _ADEMAMIX:
        decay = 1.0 - lr * wd
    if RULE == _ADAGRAD:
        lr_eff = _div(lr, 1.0 + (t - 1.0) * lr_decay)
    if RULE == _ADEMAMIX:
        alpha_t = tl.where(t_alpha > 0, tl.minimum(_div(t * alpha, t_alpha), alpha), alpha)
        # beta3 warm-up of the AdEMAMix paper, capped at beta3
        frac = _div(t, t_beta3)
        lb1 = _log(b1)
        lb3 = _log(b3)
        warm = tl.minimum(_exp(_div(lb1 * lb3, (1.0 - frac) * lb3 + frac * lb1)), b3)
        b3_t = tl.where(t_beta3 > 0, warm, b3)
    return c1, c2, lr_eff, decay, alpha_t, b3_t


@triton.jit
def _rule(
    p,
    g,
    m1,
    m2,
    m3,
    t,
    b1,
    b2,
    eps,
    wd,
    alpha,
    damp,
    c1,
    c2,
    alpha_t,
    b3_t,
    RULE: tl.constexpr,
    FLAGS: tl.constexpr,
    N_STATES: tl.constexpr,
):
    """One rule on float32 tiles: returns the new states and the update direction u."""
    if RULE == _ADAM:
        if _L2_WEIGHT_DECAY & FLAGS:
            g = g + wd * p
        m1 = b1 * m1 + (1.0 - b1) * g
        m2 = b2 * m2 + (1.0 - b2) * g * g
        vd = m2
        if _AMSGRAD & FLAGS:
            m3 = _nan_max(m3, m2)  # torch.maximum: NaN stays NaN
            vd = m3
        u = _div(_div(c2, c1) * m1, tl.sqrt_rn(vd) + eps * c2)
    elif RULE == _MOMENTUM:
        g = g + wd * p
        if N_STATES > 0:
            m1 = tl.where(t == 1.0, g, b1 * m1 + (1.0 - damp) * g)
            if _NESTEROV & FLAGS:
                u = g + b1 * m1
            else:
                u = m1
        else:
            u = g
    elif RULE == _ADAGRAD:
        g = g + wd * p
        m1 = m1 + g * g
        u = _div(g, tl.sqrt_rn(m1) + eps)
    elif RULE == _RMSPROP:
        g = g + wd * p
        m1 = alpha * m1 + (1.0 - alpha) * g * g
        u = _div(g, tl.sqrt_rn(m1) + eps)
    elif RULE == _LION:
        x = b1 * m1 + (1.0 - b1) * g
        u = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
        m1 = b2 * m1 + (1.0 - b2) * g
    else:  # _ADEMAMIX: m1 fast EMA, m2 second moment, m3 slow EMA
        m1 = b1 * m1 + (1.0 - b1) * g
        m2 = b2 * m2 + (1.0 - b2) * g * g
        m3 = b3_t * m3 + (1.0 - b3_t) * g
        u = _div(_div(m1, c1) + alpha_t * m3, _div(tl.sqrt_rn(m2), c2) + eps)
    return m1, m2, m3, u


@triton.jit
def _unorm_clip(sum_u2, sum_p2, max_unorm):
    """``max_unorm * ||p|| / ||u||`` when ``||u||`` exceeds ``max_unorm * ||p||`` (and max_unorm > 0), else 1."""
    unorm = tl.sqrt(sum_u2).to(tl.float32)  # float64 sums, a correctly rounded float64 sqrt
    limit = max_unorm * tl.sqrt(sum_p2).to(tl.float32)
    clip = tl.where(unorm > limit, _div(limit, unorm), 1.0)
    return tl.where(max_unorm > 0, clip, 1.0)
