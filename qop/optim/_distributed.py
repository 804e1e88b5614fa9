"""Optimizer states of DTensor parameters (FSDP2's ``fully_shard``): local shards, blocks, global norms.

A parameter sharded by FSDP2 is a DTensor whose local tensor holds a contiguous range of rows of the global
parameter, so a contiguous range ``[start, start + numel)`` of its row-major flattening.  Its optimizer
state lives on each rank for that range only, as plain local tensors:

* float32 and bfloat16 states: shaped like the local shard;
* blockwise states (8-bit codes, 4-bit codes, fp8 values): one float32 absmax (fp8: scale) per block of the
  *global* flattening that the range touches (256 elements, 128 for 4-bit).  When ``start`` is not a multiple
  of the block size the first block is partial (the *head*, stepped as a separate entry of the same op call)
  and every other block is a whole global block.  The blocks of a shard are thus exactly the global blocks cut
  at shard boundaries, so the only difference from the unsharded state is that a block split between two ranks
  has an absmax per rank.  8-bit codes and fp8 values are shaped like the local shard; 4-bit codes are packed
  per entry (head, then the rest), two per byte, so a head of odd length costs one byte more than
  ``(numel + 1) // 2``.

Whether a parameter gets blockwise states depends on its global size (``DTensor.numel()``), so every rank agrees.

Norms that clipping reads are norms of the whole parameter: the squared norms of the local pieces are
summed across the ranks that shard it (a functional ``all_reduce`` on the device, no host sync) and handed to
the ops: ``percentile_clip`` gets each global gradient norm as a one-element tensor (whose norm it is), the
step op gets the squared norms of the update and of the parameter through its ``unorm`` input.

Checkpoints of these states are in :mod:`qop.optim._sharded_state`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import ops, reference
from .._schema import BLOCKSIZE, FORMAT_BLOCKSIZE, Flag, StateFormat, state_numel

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


def local(t: DTensorLike) -> Tensor:
    """The local shard of a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Entry:
    """One entry of the step op for a local shard: its elements, state elements (bytes of 4-bit codes) and
    absmax entries, each a ``[lo, hi)`` range of the local tensors; ``head``: the partial first block."""

    lo: int
    hi: int
    s0: int
    s1: int
    a0: int
    a1: int
    head: bool


@dataclass(frozen=True)
class Layout:
    """Where a parameter's local shard sits in its global row-major flattening, and its blocks of ``block``."""

    start: int  # first global (flat) index of the local shard
    numel: int  # elements of the local shard
    total: int  # elements of the global parameter
    local_shape: tuple[int, ...]
    block: int = BLOCKSIZE

    @property
    def head(self) -> int:
        """Elements before the first block-aligned global index (0 when the shard starts on a block)."""
        return min(self.numel, -self.start % self.block)

    @property
    def first_block(self) -> int:
        return self.start // self.block

    @property
    def nblocks(self) -> int:
        """Global blocks the shard touches: the length of its absmax."""
        if self.numel == 0:
            return 0
        return -(-(self.start + self.numel) // self.block) - self.first_block

    def entries(self, fmt: StateFormat) -> list[Entry]:
        """The op entries of the shard's states in ``fmt``: the head block when partial, then the rest."""
        h = self.head
        out, s, a = [], 0, 0
        for lo, hi in ((0, h), (h, self.numel)) if h else ((0, self.numel),):
            ns, na = state_numel(fmt, hi - lo), -(-(hi - lo) // self.block)
            out.append(Entry(lo, hi, s, s + ns, a, a + na, head=bool(h) and lo == 0))
            s, a = s + ns, a + na
        return out


def block_of(fmt: StateFormat | None) -> int:
    """The block size of a format's absmax (256 for the formats without one: it is never read)."""
    return FORMAT_BLOCKSIZE.get(fmt, BLOCKSIZE) if fmt is not None else BLOCKSIZE


def layout(p: DTensorLike, fmt: StateFormat | None = None) -> Layout:
    """The layout of ``p``'s local shard (the whole tensor for a plain tensor), in the blocks of ``fmt``."""
    block = block_of(fmt)
    if not is_sharded(p):
        return Layout(0, p.numel(), p.numel(), tuple(p.shape), block)
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
    return Layout(start, math.prod(local_shape), p.numel(), tuple(local_shape), block)


def entry_sizes(p: DTensorLike, fmt: StateFormat) -> list[int]:
    """Elements of each op entry of ``p``'s local states in ``fmt`` (one entry for a plain tensor)."""
    return [e.hi - e.lo for e in layout(p, fmt).entries(fmt)]


def pack_local(codes: Tensor, lay: Layout) -> Tensor:
    """4-bit codes of a local shard (one per byte, flat) packed per entry, as the shard's state holds them."""
    return torch.cat([reference.pack4(codes[e.lo : e.hi]) for e in lay.entries(StateFormat.BLOCKWISE4)])


def unpack_local(q: Tensor, lay: Layout) -> Tensor:
    """The codes (one per byte, flat) of a local 4-bit state packed by :func:`pack_local`."""
    q = q.reshape(-1)
    return torch.cat([reference.unpack4(q[e.s0 : e.s1], e.hi - e.lo) for e in lay.entries(StateFormat.BLOCKWISE4)])


def dequantize_local(fmt: StateFormat, q: Tensor, absmax: Tensor, code: Tensor | None, lay: Layout) -> Tensor:
    """Float32 values of a local blockwise state (head block and aligned blocks), flattened."""
    q = q.reshape(-1)
    parts = [
        reference.dequantize_state(fmt, q[e.s0 : e.s1], absmax[e.a0 : e.a1], code, e.hi - e.lo)
        for e in lay.entries(fmt)
    ]
    return torch.cat(parts)


def shard_key(p: DTensorLike) -> Hashable | None:
    """Parameters with equal keys share a bucket: same mesh and placements (None for plain tensors)."""
    if not is_sharded(p):
        return None
    return (p.device_mesh, tuple(p.placements))


def groups_of(p: DTensorLike) -> list[Any]:
    """The process groups across which ``p`` is sharded (one per sharded mesh dimension)."""
    mesh = p.device_mesh
    return [mesh.get_group(d) for d, pl in enumerate(p.placements) if pl.is_shard()]


def all_reduce(t: Tensor, groups: Sequence[Any], op: str = "sum") -> Tensor:
    """Reduce ``t`` over ``groups`` on the device (functional collectives: traceable, no host sync)."""
    from torch.distributed import _functional_collectives as funcol

    for g in groups:
        t = funcol.wait_tensor(funcol.all_reduce(t, op, g))
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
    def build(params: Sequence[Tensor], fmt: StateFormat, device: torch.device) -> ShardPlan:
        layouts = [layout(p, fmt) for p in params]
        heads = [fmt in FORMAT_BLOCKSIZE and lay.head > 0 for lay in layouts]
        plan = ShardPlan(groups_of(params[0]), layouts, heads=heads)
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
        norms = all_reduce(sq, plan.groups).sqrt()
        gscale = opt._gscale(b, [norms[i : i + 1] for i in range(len(lg))], grad_scale)
    else:
        gscale = opt._gscale(b, lg, grad_scale)
    unorm = None
    if flags & Flag.UNORM_CLIP:
        unorm = all_reduce(_update_sums(opt, b, lp, lg, hp, flags, gscale), plan.groups)
    fi = None if found_inf is None else found_inf.to(b.device)
    k = len(b.states)
    P: list[Tensor] = []
    G: list[Tensor] = []
    S: list[list[Tensor]] = [[] for _ in range(k)]
    A: list[list[Tensor]] = [[] for _ in range(k)]
    steps: list[Tensor] = []
    blockwise = b.fmt in FORMAT_BLOCKSIZE
    for i, (p, g) in enumerate(zip(lp, lg)):
        pf, gf = p.view(-1), g.view(-1)
        for e in plan.layouts[i].entries(b.fmt) if blockwise else [Entry(0, pf.numel(), 0, pf.numel(), 0, 0, False)]:
            P.append(pf[e.lo : e.hi])
            G.append(gf[e.lo : e.hi])
            # the head steps a copy of the step, since the op increments the step of every entry
            steps.append(b.steps[i].clone() if e.head else b.steps[i])
            for j in range(k):
                S[j].append(b.states[j][i].view(-1)[e.s0 : e.s1])
                if blockwise:
                    A[j].append(b.absmax[j][i][e.a0 : e.a1])
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
        if b.fmt in FORMAT_BLOCKSIZE:
            states = [
                dequantize_local(
                    b.fmt, b.states[j][i], b.absmax[j][i], b.codes[j] if b.codes else None, b.shard.layouts[i]
                )
                for j in range(len(b.states))
            ]
        else:
            states = [b.states[j][i].reshape(-1).float() for j in range(len(b.states))]
        t = b.steps[i] + 1
        _, u, _, _ = reference.rule_update(int(opt.rule), rflags, pf, gf, states, t, hp)
        rows.append(torch.stack([u.square().sum(), pf.square().sum()]))
    return torch.stack(rows).float()
