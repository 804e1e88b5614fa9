"""Optimizer states of DTensor parameters (FSDP2's ``fully_shard``): local shards, global norms, checkpoints.

A parameter sharded by FSDP2 is a DTensor whose local tensor holds a contiguous range of rows of the global
parameter, so a contiguous range ``[start, start + numel)`` of its row-major flattening.  Its optimizer
state lives on each rank for that range only, as plain local tensors:

* float32 states: shaped like the local shard;
* 8-bit states: uint8 codes shaped like the local shard and one float32 absmax per 256-block of the
  *global* flattening that the range touches.  When ``start`` is not a multiple of 256 the first block is
  partial (the *head*, stepped as a separate entry of the same op call) and every other block is a whole
  global block.  The blocks of a shard are thus exactly the global blocks cut at shard boundaries, so the
  only difference from the unsharded state is that a block split between two ranks has an absmax per rank.

Whether a parameter gets 8-bit states depends on its global size (``DTensor.numel()``), so every rank agrees.

Norms that clipping reads are norms of the whole parameter: the squared norms of the local pieces are
summed across the ranks that shard it (a functional ``all_reduce`` on the device, no host sync) and handed to
the ops: ``percentile_clip`` gets each global gradient norm as a one-element tensor (whose norm it is), the
step op gets the squared norms of the update and of the parameter through its ``unorm`` input.

Checkpoints (``state_dict``, and ``torch.distributed.checkpoint`` through ``get_optimizer_state_dict``) hold
the *unsharded* format: codes as DTensors laid out like the parameter, absmax as a DTensor of the global
block count sharded on dim 0, ``step`` and percentile histories as plain tensors (equal on every rank).
Before that, each block split between ranks is made canonical in the live state: the piece whose absmax is
smaller is requantized against the larger one (at most one code step, in at most one block per shard
boundary), so the checkpoint is exact, resuming with any number of ranks (or one process) is exact, and the
run that saved goes on from the very state it saved.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .. import ops, reference
from .._schema import BLOCKSIZE, Flag, StateFormat
from ._state_dict import ABSMAX_KEYS as _ABSMAX_KEYS
from ._state_dict import STATE_KEYS as _STATE_KEYS

if TYPE_CHECKING:
    from ._bucket import Bucket
    from .optimizer import QopOptimizer


def _dtensor_type() -> type | None:
    """``DTensor`` when torch.distributed is built in (it is not on some platforms)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


_DTENSOR = _dtensor_type()


#: A DTensor where :func:`is_sharded` says so (DTensor's attributes are not on ``Tensor`` for type checkers).
DTensorLike = Any


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a parameter of a model wrapped by ``fully_shard``)."""
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def check_format(p: Tensor, fmt: StateFormat) -> None:
    """Sharded parameters take 8- or 32-bit states (the shard layout of 4-bit and fp8 states is not built)."""
    if is_sharded(p) and fmt not in (StateFormat.FLOAT32, StateFormat.BLOCKWISE8):
        raise NotImplementedError(
            f"qop: {fmt.name.lower()} states of sharded (DTensor) parameters are not supported; "
            "use optim_bits=8 or 32 for them (GlobalOptimManager overrides do it per parameter)"
        )


def local(t: DTensorLike) -> Tensor:
    """The local shard of a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where a parameter's local shard sits in its global row-major flattening, and its 8-bit blocks."""

    start: int  # first global (flat) index of the local shard
    numel: int  # elements of the local shard
    total: int  # elements of the global parameter
    local_shape: tuple[int, ...]

    @property
    def head(self) -> int:
        """Elements before the first 256-aligned global index (0 when the shard starts on a block)."""
        return min(self.numel, -self.start % BLOCKSIZE)

    @property
    def first_block(self) -> int:
        return self.start // BLOCKSIZE

    @property
    def nblocks(self) -> int:
        """Global blocks the shard touches: the length of its absmax."""
        if self.numel == 0:
            return 0
        return -(-(self.start + self.numel) // BLOCKSIZE) - self.first_block


def layout(p: DTensorLike) -> Layout:
    """The layout of ``p``'s local shard (the whole tensor for a plain tensor)."""
    if not is_sharded(p):
        return Layout(0, p.numel(), p.numel(), tuple(p.shape))
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for pl in p.placements:
        if not (type(pl) is Replicate or (type(pl) is Shard and pl.dim == 0)):
            raise NotImplementedError(
                f"qop: DTensor parameters must be sharded on dim 0 (FSDP2's default) or replicated, got {p.placements}"
            )
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = math.prod(p.shape[1:]) if p.dim() > 0 else 1
    start = offset[0] * row if p.dim() > 0 else 0
    return Layout(start, math.prod(local_shape), p.numel(), tuple(local_shape))


def n_blocks(p: Tensor) -> int:
    """Length of the absmax of an 8-bit state of ``p`` (on this rank)."""
    return layout(p).nblocks


def shard_key(p: DTensorLike) -> Hashable | None:
    """Parameters with equal keys share a bucket: same mesh and placements (None for plain tensors)."""
    if not is_sharded(p):
        return None
    return (p.device_mesh, tuple(p.placements))


def _groups(p: DTensorLike) -> list[Any]:
    """The process groups across which ``p`` is sharded (one per sharded mesh dimension)."""
    mesh = p.device_mesh
    return [mesh.get_group(d) for d, pl in enumerate(p.placements) if pl.is_shard()]


def all_reduce_sum(t: Tensor, groups: Sequence[Any]) -> Tensor:
    """Sum ``t`` over ``groups`` on the device (functional collectives: traceable, no host sync)."""
    from torch.distributed import _functional_collectives as funcol

    for g in groups:
        t = funcol.wait_tensor(funcol.all_reduce(t, "sum", g))
    return t


# ------------------------------------------------------------------------------------------------ step
@dataclass
class ShardPlan:
    """What a bucket of DTensor parameters needs at each step (built eagerly with the bucket)."""

    groups: list[Any]
    layouts: list[Layout]
    expand: Tensor | None = None  # entry -> parameter position, when some parameter has a head entry
    heads: list[bool] = field(default_factory=list)

    @staticmethod
    def build(params: Sequence[Tensor], bits: int, device: torch.device) -> ShardPlan:
        layouts = [layout(p) for p in params]
        heads = [bits == 8 and lay.head > 0 for lay in layouts]
        plan = ShardPlan(_groups(params[0]), layouts, heads=heads)
        if any(heads):
            index = [i for i, h in enumerate(heads) for _ in range(1 + h)]
            plan.expand = torch.tensor(index, dtype=torch.long).to(device)
        return plan


def step_bucket(
    opt: QopOptimizer,
    b: Bucket,
    params: list[Tensor],
    grads: list[Tensor],
    hp: Tensor,
    flags: int,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One fused op call over the local shards of a bucket of DTensor parameters, with global norms."""
    plan: ShardPlan = b.shard
    lp = [local(p) for p in params]
    # viewed with their static local shape first: under torch.compile the grads of DTensor params come with
    # symbolic sizes, and flattening those fails in AOTAutograd (torch 2.13)
    lg = [local(g).contiguous().view(lay.local_shape) for g, lay in zip(grads, plan.layouts)]
    if b.clips:  # percentile clipping: the history records global gradient norms
        sq = torch.stack([g.float().square().sum() for g in lg])
        norms = all_reduce_sum(sq, plan.groups).sqrt()
        gscale = opt._gscale(b, [norms[i : i + 1] for i in range(len(lg))], grad_scale)
    else:
        gscale = opt._gscale(b, lg, grad_scale)
    unorm = None
    if flags & Flag.UNORM_CLIP:
        unorm = all_reduce_sum(_update_sums(opt, b, lp, lg, hp, flags, gscale), plan.groups)
    fi = None if found_inf is None else found_inf.to(b.device)
    k = len(b.states)
    if b.bits != 8:
        ops.step(
            int(opt.rule),
            flags,
            [p.view(-1) for p in lp],
            [g.view(-1) for g in lg],
            [s.view(-1) for st in b.states for s in st],
            [],
            [],
            b.steps,
            hp,
            gscale,
            fi,
            unorm,
        )
        return
    P: list[Tensor] = []
    G: list[Tensor] = []
    S: list[list[Tensor]] = [[] for _ in range(k)]
    A: list[list[Tensor]] = [[] for _ in range(k)]
    steps: list[Tensor] = []
    for i, (p, g) in enumerate(zip(lp, lg)):
        pf, gf = p.view(-1), g.view(-1)
        h = plan.layouts[i].head if plan.heads[i] else 0
        # entries (elements, absmax entries, step): the partial first block on its own, then whole blocks; the
        # head steps a copy of the step, since the op increments the step of every entry
        entries: list[tuple[tuple[int, int], tuple[int, int | None], Tensor]] = (
            [((0, h), (0, 1), b.steps[i].clone())] if h else []
        )
        entries.append(((h, pf.numel()), (1 if h else 0, None), b.steps[i]))
        for (lo, hi), (a0, a1), step in entries:
            P.append(pf[lo:hi])
            G.append(gf[lo:hi])
            steps.append(step)
            for j in range(k):
                S[j].append(b.states[j][i].view(-1)[lo:hi])
                A[j].append(b.absmax[j][i][a0:a1])
    if plan.expand is not None:
        gscale = None if gscale is None else gscale.index_select(0, plan.expand)
        unorm = None if unorm is None else unorm.index_select(0, plan.expand)
    ops.step(
        int(opt.rule),
        flags,
        P,
        G,
        [s for st in S for s in st],
        [a for am in A for a in am],
        b.codes,
        steps,
        hp,
        gscale,
        fi,
        unorm,
    )


def _update_sums(
    opt: QopOptimizer,
    b: Bucket,
    lp: list[Tensor],
    lg: list[Tensor],
    hp: Tensor,
    flags: int,
    gscale: Tensor | None,
) -> Tensor:
    """Per local shard, the squared norms of its update and of itself (``[n, 2]``), in the reference's math.

    The update-norm clip needs the norm of the whole update before any shard is written, so the sums are
    computed here, reduced across ranks, and handed to the step op (which then skips its own first pass).
    """
    rows = []
    rflags = flags & ~int(Flag.UNORM_CLIP)
    for i, (p, g) in enumerate(zip(lp, lg)):
        pf = p.float().reshape(-1)
        gf = g.float().reshape(-1)
        if gscale is not None:
            gf = gf * gscale[i]
        if b.bits == 8:
            states = [
                _dequantize_local(b.states[j][i], b.absmax[j][i], b.codes[j], b.shard.layouts[i])
                for j in range(len(b.states))
            ]
        else:
            states = [b.states[j][i].reshape(-1).float() for j in range(len(b.states))]
        t = b.steps[i] + 1
        _, u, _, _ = reference.rule_update(int(opt.rule), rflags, pf, gf, states, t, hp)
        rows.append(torch.stack([u.square().sum(), pf.square().sum()]))
    return torch.stack(rows).float()


def _dequantize_local(q: Tensor, absmax: Tensor, code: Tensor, lay: Layout) -> Tensor:
    """Float32 values of a local 8-bit state (head block and aligned blocks), flattened."""
    q = q.reshape(-1)
    h = lay.head
    if h == 0:
        return ops.dequantize_blockwise(q, absmax, code, BLOCKSIZE, torch.float32)
    head = ops.dequantize_blockwise(q[:h], absmax[:1], code, BLOCKSIZE, torch.float32)
    body = ops.dequantize_blockwise(q[h:], absmax[1:], code, BLOCKSIZE, torch.float32)
    return torch.cat([head, body])


# ------------------------------------------------------------------------------------------ checkpoints
def _params_by_index(opt: QopOptimizer) -> list[Tensor]:
    """Parameters in the order of ``state_dict()``'s integer keys."""
    return [p for g in opt.param_groups for p in g["params"]]


def _block_range(lay: Layout, b: int) -> tuple[int, int]:
    """Local element range of the shard's ``b``-th block."""
    h = lay.head
    if h and b == 0:
        return 0, h
    lo = h + (b - (1 if h else 0)) * BLOCKSIZE
    return lo, min(lay.numel, lo + BLOCKSIZE)


def _requantize(q: Tensor, absmax: Tensor, target: Tensor, code: Tensor) -> Tensor:
    """Codes of the values ``code[q] * absmax`` against the larger block absmax ``target`` (0-d tensors)."""
    values = ops.dequantize_blockwise(q, absmax.reshape(1), code, max(q.numel(), 1), torch.float32)
    # quantize with the block's absmax forced to ``target``: an extra element equal to it sets the absmax
    padded = torch.cat([values, target.reshape(1)])
    codes, _ = ops.quantize_blockwise(padded, code, padded.numel())
    return codes[:-1]


def _canonical_absmax(p: Tensor, lay: Layout, st: dict[str, Any], j: int, code: Tensor) -> Tensor:
    """The full absmax of state ``j`` in global blocks; blocks split between ranks are made canonical in the live
    state first (the piece with the smaller absmax requantized against the larger one, on every rank)."""
    from torch.distributed import _functional_collectives as funcol

    absmax, q = st[_ABSMAX_KEYS[j]], st[_STATE_KEYS[j]].view(-1)
    full = torch.zeros(-(-lay.total // BLOCKSIZE), dtype=torch.float32, device=absmax.device)
    full[lay.first_block : lay.first_block + lay.nblocks] = absmax
    for g in _groups(p):
        full = funcol.wait_tensor(funcol.all_reduce(full, "max", g))
    for b in {0, lay.nblocks - 1} if lay.nblocks else ():
        target = full[lay.first_block + b]
        if bool(absmax[b] < target):  # a piece of a split block whose other piece has the larger absmax
            lo, hi = _block_range(lay, b)
            q[lo:hi] = _requantize(q[lo:hi], absmax[b], target, code)
            absmax[b] = target
    return full


def export_state(opt: QopOptimizer, sd: dict[str, Any]) -> None:
    """Turn the local states of DTensor parameters in ``sd`` (from ``state_dict()``) into the unsharded format.

    Codes and float32 states become DTensors laid out like their parameter; each absmax becomes a DTensor of
    the global block count, sharded on dim 0 where the parameter is.  A collective: every rank calls it.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    params = _params_by_index(opt)
    for i, p in enumerate(params):
        if not is_sharded(p) or i not in sd["state"]:
            continue
        p = cast(Any, p)  # a DTensor
        st = dict(sd["state"][i])  # never the optimizer's own dict
        lay = layout(p)
        mesh, placements = p.device_mesh, p.placements
        for j, name in enumerate(_STATE_KEYS):
            if name not in st:
                continue
            if st[name].dtype == torch.uint8:
                code = opt._codes[(st[name].device, StateFormat.BLOCKWISE8)][j]
                full = _canonical_absmax(p, lay, st, j, code)
                replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
                st[_ABSMAX_KEYS[j]] = replicated.redistribute(
                    mesh, [Shard(0) if pl.is_shard() else Replicate() for pl in placements]
                )
            st[name] = DTensor.from_local(st[name], mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
        sd["state"][i] = st


def _local_part(t: DTensorLike, p: DTensorLike, lay: Layout) -> Tensor:
    """The local shard (of ``p``'s layout) of a state given as a DTensor or as a full tensor."""
    if is_sharded(t):
        if t.device_mesh == p.device_mesh and tuple(t.placements) == tuple(p.placements):
            return t.to_local().reshape(lay.local_shape).contiguous()
        t = t.full_tensor()
    return t.reshape(-1)[lay.start : lay.start + lay.numel].reshape(lay.local_shape).contiguous()


def localize_states(opt: QopOptimizer) -> None:
    """After ``load_state_dict``: put the states of DTensor parameters (DTensors or full tensors, in the
    unsharded format) back in the local layout, keeping this rank's shard and its blocks.

    Loading is exact for any number of ranks: the blocks of a shard are global blocks (a block split between
    ranks takes the global block's absmax on each side, as the canonical form saved it).
    """
    for p in _params_by_index(opt):
        st = opt.state.get(p)
        if not is_sharded(p) or not st:
            continue
        lay = layout(p)
        for j, name in enumerate(_STATE_KEYS):
            if name not in st:
                continue
            if st[name].dtype == torch.uint8:
                am = st[_ABSMAX_KEYS[j]]
                full = am.full_tensor() if is_sharded(am) else am
                st[_ABSMAX_KEYS[j]] = full[lay.first_block : lay.first_block + lay.nblocks].float().clone()
            st[name] = _local_part(st[name], p, lay)
        for key in ("step", "gnorm_vec"):
            if key in st and is_sharded(st[key]):
                st[key] = st[key].full_tensor()
