"""Loading optimizer state dicts: validate everything first, then build the new state in the optimizer's format.

A state dict is refused, with one error naming the parameter and the key, before the optimizer changes at all.
What it may hold per parameter (by position in ``param_groups``):

* nothing (an empty entry: the parameter has not stepped yet, or user code read ``opt.state[p]``);
* ``step`` (a whole number >= 0, a Python number or a one-element tensor) and exactly the states the group's
  rule keeps (``state1`` .. ``stateK``), each either float32 (32-bit), bfloat16 (16-bit) or uint8 codes with a
  float32 ``absmaxJ`` of one entry per 256-block (8-bit), packed 4-bit codes (``(numel + 1) // 2`` bytes) with one
  per 128-block, or float8_e4m3fn values with one scale per 256-block; optionally ``gnorm_vec`` (percentile
  clipping's history) and bitsandbytes' code books (``_qmapJ``, from ``qmapJ``); ``gnorm_vec`` is required
  where the parameter is clipped at a percentile.

States load in the format the optimizer would create for the parameter (``optim_bits``, ``min_8bit_size``,
``GlobalOptimManager`` overrides): a 32-bit state loaded by an 8-bit optimizer is quantized, an 8-bit one
loaded by a 32-bit optimizer is dequantized, 8-bit codes of another code book are requantized, float32 and
bfloat16 states are cast (to nearest-even) to the optimizer's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import ops, reference
from .._maps import dynamic_map
from .._schema import BLOCKSIZE, FORMAT_BLOCKSIZE, HISTORY, StateFormat, state_numel
from ._formats import books

if TYPE_CHECKING:
    from .optimizer import QopOptimizer

STATE_KEYS = ("state1", "state2", "state3")
ABSMAX_KEYS = ("absmax1", "absmax2", "absmax3")
QMAP_KEYS = ("_qmap1", "_qmap2", "_qmap3")
#: Every key a loaded parameter state may hold (after bitsandbytes' nesting is flattened).
KNOWN_KEYS = frozenset({"step", "gnorm_vec", *STATE_KEYS, *ABSMAX_KEYS, *QMAP_KEYS})
#: Group keys that say how states are stored: a load keeps the optimizer's own and converts the loaded states to
#: that format (a 32-bit state dict loads into an 8-bit optimizer, and back).
FORMAT_KEYS = ("optim_bits", "min_8bit_size", "block_wise", "is_paged")
#: bitsandbytes keeps its quantized tensors under this key of each parameter's state.
BNB_QUANT_KEY = "__bnb_optimizer_quant_state__"
#: bitsandbytes' per-tensor (not block-wise) 8-bit states; qop's are always block-wise.
_BNB_NON_BLOCKWISE = frozenset({"max1", "max2", "new_max1", "new_max2"})


class StateDictError(ValueError):
    """A state dict that cannot be loaded; the message names the parameter and the key."""


def from_bnb(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Flatten bitsandbytes' per-parameter ``__bnb_optimizer_quant_state__`` into our state layout."""
    state = {}
    for key, st in state_dict["state"].items():
        if not isinstance(st, dict):
            state[key] = st
            continue
        st = dict(st)
        nested = st.pop(BNB_QUANT_KEY, None)
        if isinstance(nested, dict):
            st.update(nested)
            if isinstance(st.get("gnorm_vec"), Tensor):
                # bitsandbytes (releases that had percentile clipping) records squared norms, 0 where a slot is
                # unfilled; ours holds norms and +inf there
                sq = st["gnorm_vec"].float()
                st["gnorm_vec"] = torch.where(sq > 0, sq.sqrt(), math.inf)
            st.pop("unorm_vec", None)
        for j in (1, 2, 3):
            if f"qmap{j}" in st:
                st[f"_qmap{j}"] = st.pop(f"qmap{j}")
        state[key] = st
    return {**state_dict, "state": state}


def from_torch_names(state_dict: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Rename states saved under torch.optim's / torchao's keys (``exp_avg``, ...) to ours (``state1``, ...).

    torchao's low-bit optimizers keep tensor subclasses there (their ``dequantize()`` gives float32; its CPU state
    dicts hold plain float32 tensors): such states load as float32 values, quantized again in our format.
    """
    state = state_dict.get("state")
    if not isinstance(state, dict):
        return state_dict
    out = {}
    for key, st in state.items():
        if isinstance(st, dict) and names[0] in st and STATE_KEYS[0] not in st:
            st = dict(st)
            for ours, theirs in zip(STATE_KEYS, names):
                if theirs in st:
                    t = st.pop(theirs)
                    dequantize = getattr(t, "dequantize", None)
                    if isinstance(t, Tensor) and type(t) is not Tensor and callable(dequantize):
                        t = dequantize()
                    st[ours] = t.float() if isinstance(t, Tensor) and t.is_floating_point() else t
        out[key] = st
    return {**state_dict, "state": out}


def check_step_value(where: str, step: Any) -> None:
    """``step`` must be a whole number >= 0 (a Python number or a one-element real tensor)."""
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise StateDictError(
                f"qop: {where}['step'] must be a number, got a {step.dtype} tensor of shape {tuple(step.shape)}"
            )
        _check_data(where, "step", step)
        value = float(step.detach().reshape(()).to("cpu", torch.float64))
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        value = float(step)
    else:
        raise StateDictError(f"qop: {where}['step'] must be a number, got {type(step).__name__}")
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise StateDictError(f"qop: {where}['step'] must be a whole number >= 0, got {value}")


def saved_format(t: Tensor, numel: int, expected: StateFormat) -> StateFormat | None:
    """The format of a saved state tensor of a parameter of ``numel`` elements (None: none fits); uint8 states
    are 8-bit codes when they hold ``numel`` bytes, 4-bit ones when they hold half (``expected``, the format
    the optimizer keeps, decides for a parameter of at most one element)."""
    if t.dtype == torch.float32:
        return StateFormat.FLOAT32
    if t.dtype == torch.bfloat16:
        return StateFormat.BFLOAT16
    if t.dtype == torch.float8_e4m3fn:
        return StateFormat.FP8 if t.numel() == numel else None
    if t.dtype != torch.uint8:
        return None
    four = state_numel(StateFormat.BLOCKWISE4, numel)
    if t.numel() == four and (t.numel() != numel or expected == StateFormat.BLOCKWISE4):
        return StateFormat.BLOCKWISE4
    return StateFormat.BLOCKWISE8 if t.numel() == numel else None


def check_param_state(
    where: str, st: Any, p: Tensor, n_states: int, clipped: bool, expected: StateFormat = StateFormat.FLOAT32
) -> None:
    """Validate one parameter's loaded state against its parameter, the rule's state count and whether it is
    clipped at a percentile (then its history of gradient norms is part of the state)."""
    if not isinstance(st, dict):
        raise StateDictError(f"qop: {where} must be a dict, got {type(st).__name__}")
    if not st:
        return
    if "step" not in st:
        raise StateDictError(f"qop: {where} has states but no 'step'")
    check_step_value(where, st["step"])
    blockwise = _BNB_NON_BLOCKWISE.intersection(st)
    if blockwise:
        raise StateDictError(
            f"qop: {where} holds per-tensor 8-bit states ({sorted(blockwise)}); qop's 8-bit "
            "states are block-wise: save them from a bitsandbytes optimizer with block_wise=True"
        )
    unknown = set(st) - KNOWN_KEYS
    if unknown:
        raise StateDictError(f"qop: {where} has unknown key(s) {sorted(map(str, unknown))}")
    numel = p.numel()
    for j in range(3):
        name, am_name, qmap_name = STATE_KEYS[j], ABSMAX_KEYS[j], QMAP_KEYS[j]
        if j >= n_states:
            extra = [k for k in (name, am_name, qmap_name) if k in st]
            if extra:
                raise StateDictError(
                    f"qop: {where} has {extra[0]!r}, but this optimizer's rule keeps {n_states} "
                    "state(s) per parameter (a state dict of another optimizer?)"
                )
            continue
        if name not in st:
            raise StateDictError(f"qop: {where} lacks {name!r}: this optimizer's rule keeps {n_states} state(s)")
        t = _tensor(where, name, st[name])
        fmt = saved_format(t, numel, expected)
        if fmt is None and t.dtype in (torch.uint8, torch.float8_e4m3fn):
            raise StateDictError(
                f"qop: {where}[{name!r}] has {t.numel()} {t.dtype} elements, its parameter {numel} (8-bit and fp8 "
                f"states hold {numel}, 4-bit ones {state_numel(StateFormat.BLOCKWISE4, numel)})"
            )
        value = fmt in (StateFormat.FLOAT32, StateFormat.BFLOAT16)
        if value and t.numel() != numel:
            raise StateDictError(f"qop: {where}[{name!r}] has {t.numel()} elements, its parameter has {numel}")
        if fmt is not None and not value:
            bs = FORMAT_BLOCKSIZE[fmt]
            nb = -(-numel // bs)
            am = _tensor(where, am_name, st.get(am_name), missing=f"{fmt.name.lower()} {name} needs it")
            if am.dtype != torch.float32 or am.numel() != nb:
                raise StateDictError(
                    f"qop: {where}[{am_name!r}] must be float32 with {nb} entries (one per "
                    f"{bs}-block), got {am.dtype} with {am.numel()}"
                )
            whole = _whole(am)
            if not bool(torch.isfinite(whole).all()) or bool((whole < 0).any()):
                raise StateDictError(f"qop: {where}[{am_name!r}] must be finite and >= 0")
            if qmap_name in st:
                q = _tensor(where, qmap_name, st[qmap_name])
                if fmt != StateFormat.BLOCKWISE8 or not q.is_floating_point() or q.numel() != 256:
                    raise StateDictError(
                        f"qop: {where}[{qmap_name!r}] must be a code book of 256 floats of 8-bit codes"
                    )
        else:
            if t.dtype not in (torch.float32, torch.bfloat16):
                raise StateDictError(
                    f"qop: {where}[{name!r}] must be float32 (32-bit), bfloat16 (16-bit), uint8 codes (8-bit, 4-bit) "
                    f"or float8_e4m3fn (fp8), got {t.dtype}"
                )
            for k in (am_name, qmap_name):
                if k in st:
                    raise StateDictError(f"qop: {where} has {k!r} but {name!r} is {t.dtype}, not codes")
    formats = {saved_format(st[k], numel, expected) for k in STATE_KEYS[:n_states]}
    if len(formats) > 1:
        raise StateDictError(
            f"qop: {where} mixes state formats ({', '.join(STATE_KEYS[:n_states])}): "
            "a parameter's states share one format"
        )
    if "gnorm_vec" in st:
        h = _tensor(where, "gnorm_vec", st["gnorm_vec"])
        if h.dtype != torch.float32 or h.numel() != HISTORY:
            raise StateDictError(
                f"qop: {where}['gnorm_vec'] must be float32 with {HISTORY} entries, got {h.dtype} with {h.numel()}"
            )
    elif clipped:
        raise StateDictError(
            f"qop: {where} lacks 'gnorm_vec': the parameter is clipped at a percentile, and its "
            "history of gradient norms is part of its state"
        )


def _tensor(where: str, key: str, value: Any, missing: str = "") -> Tensor:
    if value is None and missing:
        raise StateDictError(f"qop: {where} lacks {key!r}: {missing}")
    if not isinstance(value, Tensor):
        raise StateDictError(f"qop: {where}[{key!r}] must be a tensor, got {type(value).__name__}")
    _check_data(where, key, value)
    return value


def _check_data(where: str, key: str, t: Tensor) -> None:
    if t.device.type == "meta" or t.layout != torch.strided:
        raise StateDictError(f"qop: {where}[{key!r}] holds no data ({t.device.type} device, {t.layout})")


def _whole(t: Tensor) -> Tensor:
    """A DTensor's whole value (a collective; only where a state changes format), any other tensor itself."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _shaped(t: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """``t`` in ``shape``; left alone when it has it (a sharded DTensor saved like its parameter cannot be
    flattened without redistribution)."""
    return t if tuple(t.shape) == tuple(shape) or (shape == (-1,) and t.dim() == 1) else t.reshape(shape)


def convert(st: dict[str, Any], p: Tensor, n_states: int, fmt: StateFormat, signed: tuple[bool, ...]) -> dict[str, Any]:
    """A validated loaded state as a new dict in the optimizer's layout: on ``p``'s device, float32 step, states
    in format ``fmt`` (quantized, dequantized or requantized to our code books where they differ)."""
    out: dict[str, Any] = {}
    if not st:
        return out
    bits = 8 if fmt == StateFormat.BLOCKWISE8 else 16 if fmt == StateFormat.BFLOAT16 else 32
    out["step"] = torch.as_tensor(st["step"]).detach().to(p.device, torch.float32).reshape(()).clone()
    numel = p.numel()
    for j in range(n_states):
        name, am_name = STATE_KEYS[j], ABSMAX_KEYS[j]
        t = st[name].detach().to(p.device)
        ours = dynamic_map(signed[j], p.device)
        saved = saved_format(t, numel, fmt)
        if saved in (StateFormat.BLOCKWISE4, StateFormat.FP8):  # qop's own code books
            absmax = st[am_name].detach().to(p.device).reshape(-1).contiguous()
            if saved == fmt:
                out[name], out[am_name] = t.contiguous().clone(), absmax.clone()
                continue
            book = books(saved, signed[j : j + 1], p.device)
            t = reference.dequantize_state(saved, _whole(t), _whole(absmax), book[0] if book else None, numel)
        if fmt in (StateFormat.BLOCKWISE4, StateFormat.FP8):
            book = books(fmt, signed[j : j + 1], p.device)
            x = t.float() if t.dtype in (torch.float32, torch.bfloat16) else None
            if x is None:  # 8-bit codes: to float32 first
                absmax = st[am_name].detach().to(p.device).reshape(-1).contiguous()
                theirs = st.get(QMAP_KEYS[j])
                code = ours if theirs is None else theirs.detach().to(p.device, torch.float32).reshape(-1)
                x = reference.dequantize_blockwise(
                    _whole(t).reshape(-1), _whole(absmax), code, BLOCKSIZE, torch.float32
                )
            q, a = reference.quantize_state(fmt, _whole(x).reshape(-1), book[0] if book else None, j)
            out[name] = q.view(p.shape) if fmt == StateFormat.FP8 else q
            out[am_name] = a
            continue
        if t.dtype == torch.uint8:
            absmax = _shaped(st[am_name].detach().to(p.device), (-1,))
            theirs = st.get(QMAP_KEYS[j])
            code = ours if theirs is None else theirs.detach().to(p.device, torch.float32).reshape(-1)
            if bits == 8 and torch.equal(code, ours):  # kept as saved (a DTensor keeps its layout)
                out[name], out[am_name] = _shaped(t, p.shape).contiguous().clone(), absmax.contiguous().clone()
                continue
            t = ops.dequantize_blockwise(
                _whole(t).reshape(-1).contiguous(), _whole(absmax).contiguous(), code, BLOCKSIZE, torch.float32
            )
        if bits == 8:
            codes, absmax = ops.quantize_blockwise(_whole(t).reshape(-1).contiguous(), ours, BLOCKSIZE)
            out[name], out[am_name] = codes.reshape(p.shape), absmax
        else:
            out[name] = _shaped(t, p.shape).to(torch.bfloat16 if bits == 16 else torch.float32).contiguous().clone()
    if "gnorm_vec" in st:
        out["gnorm_vec"] = st["gnorm_vec"].detach().to(p.device, torch.float32).reshape(-1).clone()
    return out


def prepare(opt: QopOptimizer, state_dict: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[Tensor, dict[str, Any]]]:
    """Validate ``state_dict`` for ``opt`` and build what loading it makes: each group's new keys (its own format
    keys kept) and each parameter's new state, converted to the format ``opt`` keeps for it.  Raises before
    ``opt`` changes; changes nothing itself."""
    if not isinstance(state_dict.get("state"), dict) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError("qop: state_dict must have a dict 'state' and a list 'param_groups'")
    state_dict = from_bnb(state_dict)
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"qop: state_dict has {len(groups)} param groups, the optimizer has {len(opt.param_groups)}")
    merged: list[dict[str, Any]] = []
    id_map: dict[Any, tuple[int, Tensor]] = {}
    for index, (ours, theirs) in enumerate(zip(opt.param_groups, groups)):
        where = f"state_dict['param_groups'][{index}]"
        if not isinstance(theirs, dict) or not isinstance(theirs.get("params"), list):
            raise ValueError(f"qop: {where} must be a dict with a list 'params'")
        if len(ours["params"]) != len(theirs["params"]):
            raise ValueError(
                f"qop: {where} has {len(theirs['params'])} params, the optimizer's group "
                f"{index} has {len(ours['params'])}"
            )
        group = {**ours, **{k: v for k, v in theirs.items() if k not in ("params", "hp", *FORMAT_KEYS)}}
        try:
            opt.check_group({k: v for k, v in group.items() if k not in ("params", "hp")})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"qop: {where}: {str(exc).removeprefix('qop: ')}") from exc
        merged.append(group)
        for pid, p in zip(theirs["params"], ours["params"]):
            if not isinstance(pid, (int, str)) or isinstance(pid, bool) or pid in id_map:
                raise ValueError(f"qop: {where}['params'] has a repeated or invalid parameter id {pid!r}")
            id_map[pid] = (index, p)
    entries = []
    for key, st in state_dict["state"].items():
        if key not in id_map:
            raise ValueError(f"qop: state_dict['state'] has an unknown parameter id {key!r}")
        index, p = id_map[key]
        n = opt.n_states(merged[index])
        clipped = opt._percentile(merged[index], p) < 100
        check_param_state(f"state_dict['state'][{key!r}]", st, p, n, clipped, opt._format(merged[index], p))
        entries.append((p, st, merged[index], n))
    new_state = {p: convert(st, p, n, opt._format(group, p), opt.state_signed) for p, st, group, n in entries if st}
    return merged, new_state
