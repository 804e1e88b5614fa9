"""Checkpoints of the states of DTensor parameters: the unsharded format out, the local layout back in.

``state_dict`` (and ``torch.distributed.checkpoint`` through ``get_optimizer_state_dict``) holds the
*unsharded* format of every state (see :mod:`qop.optim._distributed` for the local one):

* float32 and bfloat16 states, 8-bit codes and fp8 values: DTensors laid out like the parameter;
* 4-bit codes: the packed bytes of the whole parameter (``(numel + 1) // 2``), as a DTensor sharded on dim 0
  where the parameter is (a rank's bytes are not its parameter rows, so they are assembled across the ranks
  with one ``all_reduce`` of a zero-filled buffer: saving holds that buffer, half a byte per element of the
  parameter, per state and rank, for a moment);
* absmax (fp8: scales): a DTensor of the global block count sharded on dim 0 where the parameter is;
* ``step`` and percentile histories: plain tensors (equal on every rank).

Before that, each block split between ranks is made canonical in the live state: the piece whose absmax is
smaller is requantized against the larger one (at most one code step, in at most one block per shard
boundary), so the checkpoint is exact, resuming with any number of ranks (or one process) is exact, and the
run that saved goes on from the very state it saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .. import reference
from .._schema import FORMAT_BLOCKSIZE, FP8_FIRST_ZERO_FREE_STATE, StateFormat
from . import _formats
from ._distributed import DTensorLike, Layout, all_reduce, groups_of, is_sharded, layout, pack_local, unpack_local
from ._state_dict import ABSMAX_KEYS as _ABSMAX_KEYS
from ._state_dict import STATE_KEYS as _STATE_KEYS

if TYPE_CHECKING:
    from .optimizer import QopOptimizer


def _params(opt: QopOptimizer) -> Iterator[tuple[int, dict[str, Any], Tensor]]:
    """Parameters with their group, in the order of ``state_dict()``'s integer keys."""
    i = 0
    for g in opt.param_groups:
        for p in g["params"]:
            yield i, g, p
            i += 1


def _code(opt: QopOptimizer, device: torch.device, fmt: StateFormat, j: int) -> Tensor | None:
    """The code book of state ``j`` in ``fmt`` (None for fp8, which has none)."""
    books = opt._codes.get((device, fmt))
    return books[j] if books else None


def _block_range(lay: Layout, b: int) -> tuple[int, int]:
    """Local element range of the shard's ``b``-th block."""
    h = lay.head
    if h and b == 0:
        return 0, h
    lo = h + (b - (1 if h else 0)) * lay.block
    return lo, min(lay.numel, lo + lay.block)


def _requantize(fmt: StateFormat, q: Tensor, absmax: Tensor, target: Tensor, code: Tensor | None, j: int) -> Tensor:
    """Codes (one per element) of the values of block piece ``q`` (of state ``j``) against the larger block absmax
    ``target``."""
    if fmt == StateFormat.FP8:  # as quantize_fp8: the value over the scale, to nearest
        values = q.float() * absmax
        codes = (values / target).to(torch.float8_e4m3fn)
        return reference.fp8_zero_free(codes, values) if j >= FP8_FIRST_ZERO_FREE_STATE else codes
    assert code is not None
    values = reference.dequantize_blockwise(q, absmax.reshape(1), code, max(q.numel(), 1), torch.float32)
    # quantize with the block's absmax forced to ``target``: an extra element equal to it sets the absmax
    padded = torch.cat([values, target.reshape(1)])
    codes, _ = reference.quantize_blockwise(padded, code, padded.numel())
    return codes[:-1]


def _canonical_absmax(
    p: DTensorLike, lay: Layout, fmt: StateFormat, codes: Tensor, absmax: Tensor, code: Tensor | None, j: int
) -> Tensor:
    """The full absmax in global blocks; blocks split between ranks are made canonical in ``codes`` (one per
    element, flat) and ``absmax`` first: the piece with the smaller absmax requantized against the larger one."""
    full = torch.zeros(-(-lay.total // lay.block), dtype=torch.float32, device=absmax.device)
    full[lay.first_block : lay.first_block + lay.nblocks] = absmax
    full = all_reduce(full, groups_of(p), "max")
    for b in {0, lay.nblocks - 1} if lay.nblocks else ():
        target = full[lay.first_block + b]
        if bool(absmax[b] < target):  # a piece of a split block whose other piece has the larger absmax
            lo, hi = _block_range(lay, b)
            codes[lo:hi] = _requantize(fmt, codes[lo:hi], absmax[b], target, code, j)
            absmax[b] = target
    return full


def _global_packed(p: DTensorLike, lay: Layout, codes: Tensor) -> Tensor:
    """The packed 4-bit codes of the whole parameter, from every rank's codes (one per element) of its shard."""
    full = torch.zeros((lay.total + 1) // 2, dtype=torch.uint8, device=codes.device)
    odd = lay.start % 2  # the shard's first element is a high nibble: a zero low one before it
    packed = reference.pack4(torch.cat([codes.new_zeros(odd), codes]))
    full[lay.start // 2 : lay.start // 2 + packed.numel()] = packed
    return all_reduce(full, groups_of(p))  # the ranks' nibbles are disjoint: their sum is the whole


def _sharded_like_blocks(t: Tensor, p: DTensorLike) -> Any:
    """A tensor every rank holds whole, as a DTensor sharded on dim 0 where ``p`` is sharded."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = p.device_mesh
    replicated = DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, [Shard(0) if pl.is_shard() else Replicate() for pl in p.placements])


def export_state(opt: QopOptimizer, sd: dict[str, Any]) -> None:
    """Turn the local states of DTensor parameters in ``sd`` (from ``state_dict()``) into the unsharded format.

    A collective: every rank calls it.
    """
    from torch.distributed.tensor import DTensor

    for i, group, p in _params(opt):
        if not is_sharded(p) or i not in sd["state"]:
            continue
        p = cast(Any, p)  # a DTensor
        st = dict(sd["state"][i])  # never the optimizer's own dict
        fmt = _formats.format_of(st, layout(p).numel, opt._format(group, p))
        lay = layout(p, fmt)
        for j, name in enumerate(_STATE_KEYS):
            if name not in st:
                continue
            q = st[name]
            if fmt in FORMAT_BLOCKSIZE:
                code = _code(opt, q.device, fmt, j)
                codes = unpack_local(q, lay) if fmt == StateFormat.BLOCKWISE4 else q.view(-1)
                full = _canonical_absmax(p, lay, fmt, codes, st[_ABSMAX_KEYS[j]], code, j)
                st[_ABSMAX_KEYS[j]] = _sharded_like_blocks(full, p)
                if fmt == StateFormat.BLOCKWISE4:
                    q.copy_(pack_local(codes, lay))  # the canonical form, in the live state too
                    st[name] = _sharded_like_blocks(_global_packed(p, lay, codes), p)
                    continue
            mesh, placements = p.device_mesh, p.placements
            st[name] = DTensor.from_local(q, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
        sd["state"][i] = st


def _whole(t: DTensorLike) -> Tensor:
    return t.full_tensor() if is_sharded(t) else t


def _local_part(t: DTensorLike, p: DTensorLike, lay: Layout) -> Tensor:
    """The local shard (of ``p``'s layout) of a state given as a DTensor or as a full tensor."""
    if is_sharded(t):
        if t.device_mesh == p.device_mesh and tuple(t.placements) == tuple(p.placements):
            return t.to_local().reshape(lay.local_shape).contiguous()
        t = t.full_tensor()
    return t.reshape(-1)[lay.start : lay.start + lay.numel].reshape(lay.local_shape).contiguous()


def _local_packed(t: DTensorLike, lay: Layout) -> Tensor:
    """The local 4-bit state (packed per entry) of the packed codes of the whole parameter."""
    full = _whole(t).reshape(-1)
    lo, hi = lay.start // 2, (lay.start + lay.numel + 1) // 2
    codes = reference.unpack4(full[lo:hi], 2 * (hi - lo))[lay.start % 2 :][: lay.numel]
    return pack_local(codes, lay)


def localize_states(opt: QopOptimizer) -> None:
    """After ``load_state_dict``: put the states of DTensor parameters (DTensors or full tensors, in the
    unsharded format) back in the local layout, keeping this rank's shard and its blocks.

    Loading is exact for any number of ranks: the blocks of a shard are global blocks (a block split between
    ranks takes the global block's absmax on each side, as the canonical form saved it).
    """
    for _, group, p in _params(opt):
        st = opt.state.get(p)
        if not is_sharded(p) or not st:
            continue
        fmt = opt._format(group, p)  # loading converted the states to it
        lay = layout(p, fmt)
        for j, name in enumerate(_STATE_KEYS):
            if name not in st:
                continue
            if fmt in FORMAT_BLOCKSIZE:
                full = _whole(st[_ABSMAX_KEYS[j]])
                st[_ABSMAX_KEYS[j]] = full[lay.first_block : lay.first_block + lay.nblocks].float().clone()
            if fmt == StateFormat.BLOCKWISE4:
                st[name] = _local_packed(st[name], lay)
            else:
                st[name] = _local_part(st[name], p, lay)
        for key in ("step", "gnorm_vec"):
            if key in st and is_sharded(st[key]):
                st[key] = st[key].full_tensor()
