"""How a param group is cut into buckets, one ``qop::step`` call each (see :class:`Bucket`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .._schema import FORMAT_BLOCKSIZE, HISTORY
from . import _distributed, _formats
from ._bucket import Bucket, Clip
from ._state_dict import ABSMAX_KEYS, STATE_KEYS
from .manager import GlobalOptimManager

if TYPE_CHECKING:
    from .optimizer import QopOptimizer


def build(opt: QopOptimizer, group: dict[str, Any], have: tuple[bool, ...]) -> list[Bucket]:
    """The buckets of one param group for the parameters flagged in ``have`` (one op call each: same device, dtype,
    state format, per-parameter overrides and mesh), creating the states that are missing."""
    manager = GlobalOptimManager.get_instance()
    k = opt.n_states(group)
    buckets: dict[tuple[Any, ...], Bucket] = {}
    for index, (p, has_grad) in enumerate(zip(group["params"], have)):
        if not has_grad:
            continue
        if not opt.state[p]:
            opt._init_state(group, p)
        st = opt.state[p]
        fmt = _formats.format_of(st, _distributed.local(p).numel(), opt._format(group, p))
        blockwise = fmt in FORMAT_BLOCKSIZE
        override = manager.hp_override(p, opt.hp_keys)
        # overridden hyper-parameters get a bucket of their own
        shard = _distributed.shard_key(p)  # DTensor params: a bucket per mesh and placements
        bkey = (p.device, p.dtype, fmt, id(p) if override else None, shard)
        b = buckets.get(bkey)
        if b is None:
            codes = opt._codes.get((p.device, fmt), [])[:k]  # one code book per state, where the format has them
            b = buckets[bkey] = Bucket(
                fmt,
                p.device,
                codes=codes,
                states=[[] for _ in range(k)],
                absmax=[[] for _ in range(k)] if blockwise else [],
                shard=shard,
            )
            if override:
                b.hp_slots = torch.tensor(list(override), dtype=torch.long).to(p.device)
                b.hp_values = torch.tensor(list(override.values()), dtype=torch.float32).to(p.device)
        b.params.append(p)
        b.index.append(index)
        b.steps.append(st["step"])
        for j in range(k):
            b.states[j].append(st[STATE_KEYS[j]])
            if blockwise:
                b.absmax[j].append(st[ABSMAX_KEYS[j]])
        percentile = opt._percentile(group, p)
        if percentile < 100 and "gnorm_vec" not in st:  # a fresh state, or clipping turned on since
            st["gnorm_vec"] = torch.full((HISTORY,), math.inf, dtype=torch.float32, device=p.device)
        b.histories.append(st.get("gnorm_vec"))
        b.percentiles.append(percentile)
        if opt._paged(group, p):
            b.paged.extend(t for t in st.values() if isinstance(t, Tensor) and t.dim() > 0)
    for b in buckets.values():
        if b.shard is not None:
            b.shard = _distributed.ShardPlan.build(b.params, b.fmt, b.device)
        by_percentile: dict[int, list[int]] = {}
        for i, k in enumerate(b.percentiles):
            if k < 100:
                by_percentile.setdefault(k, []).append(i)
        b.clips = [
            Clip(
                k,
                pos,
                torch.tensor(pos, dtype=torch.long).to(b.device),
                [cast(Tensor, b.histories[i]) for i in pos],  # clipped: each has its history
                [b.steps[i] for i in pos],
            )
            for k, pos in by_percentile.items()
        ]
    return list(buckets.values())
