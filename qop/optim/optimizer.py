"""The one optimizer engine behind every qop optimizer.

A concrete optimizer is a small subclass that names its rule (``qop.Rule``), the group keys that are
hyper-parameters read by the kernels (``hp_keys``), its flags and its argument checks.  Everything else
lives here, once:

* hyper-parameters: each group owns a float32 device vector ``hp`` (layout ``qop.HP``) and the group's
  ``lr``, ``betas``, ``eps``... are 0-d *views* into it.  Schedulers write them in place (``fill_``), so a
  compiled step reads them as tensors and never recompiles when they change;
* state: created lazily at the first step in the format ``optim_bits`` names (:mod:`qop.optim._formats`: 8-bit,
  4-bit or fp8 blockwise when ``p.numel() >= min_8bit_size``, float32 below; bfloat16 for every tensor);
  ``GlobalOptimManager`` overrides apply per parameter; ``step`` is a float32 tensor on the device;
* one fused op call per (device, dtype, state format) bucket of a param group;
* ``bf16_stochastic_round``: bfloat16 params are written with stochastic rounding, seeded per group
  (:mod:`qop.optim._rounding`);
* percentile clipping and AMP (``GradScaler`` hands ``grad_scale``/``found_inf``) stay on the device;
* ``state_dict``/``load_state_dict`` round-trip exactly and accept bitsandbytes state dicts;
* ``torch.compile``: a step traces as one graph with no graph break.  States and buckets are made by
  :func:`_prepare`, which dynamo runs eagerly while tracing (``assume_constant_result``), so even the first
  compiled step reads them as (static-address) inputs instead of creating them in the graph; nothing in a
  step mutates an attribute of the optimizer (dynamo drops or refuses such writes), and hyper-parameters
  that were *assigned* to a group rather than filled in place are copied into ``hp`` at the next step.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import ops, paged
from .._schema import BLOCKSIZE, FORMAT_BLOCKSIZE, HP, Flag, Rule, StateFormat, n_states
from . import _distributed, _formats, _hparams, _plan, _rounding, _sharded_state, _state_dict, _torch_internals
from ._bucket import Bucket, check_grad
from ._hparams import HPSlot
from ._state_dict import ABSMAX_KEYS as _ABSMAX_KEYS
from ._state_dict import STATE_KEYS as _STATE_KEYS
from .manager import GlobalOptimManager

#: Constructor arguments that every optimizer hands to the engine as they are.
ENGINE_ARGS = (
    "optim_bits",
    "min_8bit_size",
    "percentile_clipping",
    "block_wise",
    "is_paged",
    "args",
    "bf16_stochastic_round",
)


def engine_args(arguments: dict[str, Any]) -> dict[str, Any]:
    """The engine's arguments among a constructor's ``locals()``: what each optimizer passes on to
    :class:`QopOptimizer` without writing the list out again (an optimizer without ``is_paged`` or
    ``block_wise`` in its signature gets the engine's default)."""
    return {key: arguments[key] for key in ENGINE_ARGS if key in arguments}


#: Group key set by SGD/LARS: whether the group keeps a momentum buffer (False when built with momentum 0).
MOMENTUM_BUFFER = "has_momentum_buffer"
SR_SEED_KEY = _rounding.SR_SEED_KEY


#: Live optimizers by token: :func:`_prepare` takes the token, a constant that dynamo can pass to it.
_LIVE: weakref.WeakValueDictionary[int, QopOptimizer] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


class QopOptimizer(torch.optim.Optimizer):
    """Base class: lazy states, device-side hyper-parameters and step, one fused op per bucket.

    Subclasses set ``rule``, ``hp_keys`` (group key -> HP slot, a tuple of slots for ``betas``) and
    ``state_signed`` (which code book each 8-bit state uses), and may override :meth:`flags`,
    :meth:`n_states`, :meth:`initial_state` and :meth:`check_group`.
    """

    rule: ClassVar[Rule]
    hp_keys: ClassVar[dict[str, HPSlot]] = {}
    state_signed: ClassVar[tuple[bool, ...]] = (True, False, False)
    #: qop's 8-bit states are always block-wise; ``block_wise=False`` is refused except where it is the class's
    #: (bitsandbytes') default, which qop documents as block-wise anyway (LAMB).
    block_wise_default: ClassVar[bool] = True
    # GradScaler hands grad_scale/found_inf to step() instead of unscaling with a host sync.
    _step_supports_amp_scaling = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every optimizer keeps the seed of stochastic rounding among its hyper-parameters (in ``hp``, so that it
        is a device value and round-trips through state dicts like the others)."""
        super().__init_subclass__(**kwargs)
        if SR_SEED_KEY not in cls.hp_keys:
            cls.hp_keys = {**cls.hp_keys, SR_SEED_KEY: HP.SR_SEED}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        bf16_stochastic_round: bool = False,
        args: Any = None,
    ) -> None:
        if args is not None:  # bitsandbytes' legacy namespace of overrides
            args = vars(args) if not isinstance(args, dict) else args
            optim_bits = args.get("optim_bits", optim_bits)
            min_8bit_size = args.get("min_8bit_size", min_8bit_size)
            percentile_clipping = args.get("percentile_clipping", percentile_clipping)
            is_paged = args.get("is_paged", is_paged)
            block_wise = args.get("block_wise", block_wise)
        if not block_wise and self.block_wise_default:
            raise ValueError(
                "qop: block_wise=False is not supported: qop's 8-bit states are always block-wise "
                f"({BLOCKSIZE} elements per absmax)"
            )
        defaults = dict(
            defaults,
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            is_paged=is_paged,
            bf16_stochastic_round=bf16_stochastic_round,
        )
        self.check_group(defaults)
        self._init_runtime()
        super().__init__(params, defaults)
        GlobalOptimManager.get_instance()._attach(self)

    def _init_runtime(self) -> None:
        """Caches that are not part of the optimizer's state (rebuilt after unpickling)."""
        self._plans: dict[tuple[int, tuple[bool, ...]], list[Bucket]] = {}
        self._static: set[tuple[int, tuple[bool, ...]]] = set()  # plans whose tensors are marked static
        self._codes: dict[tuple[torch.device, StateFormat], list[Tensor]] = {}
        self._hp_views: list[dict[str, Any]] = []  # per group: the views of ``hp`` that its keys hold
        self._called = [False]  # a list, not an attribute, so that a compiled step can set it
        self._token = next(_TOKENS)
        _LIVE[self._token] = self

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_runtime()
        for group in self.param_groups:
            self._hp_views.append(
                _hparams.bind_views(self.hp_keys, group, {k: group[k] for k in self.hp_keys if k in group})
            )
            self._add_codes(group["params"])

    @property
    def _opt_called(self) -> bool:
        """Read by lr schedulers to check that ``step()`` ran before ``scheduler.step()``."""
        return self._called[0]

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._called[0] = bool(value)

    # ------------------------------------------------------------------ per-optimizer customisation
    def flags(self, group: dict[str, Any]) -> Flag:
        """Structural options of this group's rule (static: part of the compiled graph)."""
        return Flag.NONE

    def n_states(self, group: dict[str, Any]) -> int:
        """Number of state tensors per parameter: the rule's, with this group's flags (one source of truth
        shared with the kernels' checks); SGD/LARS keep no buffer when built with ``momentum == 0``."""
        return n_states(self.rule, int(self.flags(group)), bool(group.get(MOMENTUM_BUFFER, True)))

    def initial_state(self, group: dict[str, Any], index: int) -> float:
        """Value a fresh state tensor starts at (Adagrad's ``initial_accumulator_value``)."""
        return 0.0

    def check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's arguments; every error names the argument."""
        _hparams.check_values(self.hp_keys, group)
        _formats.check_optim_bits(group.get("optim_bits", 32), self.rule)
        _rounding.check_group(group)
        size = group.get("min_8bit_size", 4096)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"qop: min_8bit_size must be an int >= 0, got {size!r}")
        pc = group.get("percentile_clipping", 100)
        if not isinstance(pc, int) or isinstance(pc, bool) or not 1 <= pc <= 100:
            raise ValueError(f"qop: percentile_clipping must be an int in 1..100, got {pc!r}")

    # ------------------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyper-parameters become 0-d views of the group's device vector ``hp``.  A group that
        rounds stochastically and has no ``bf16_sr_seed`` draws one from torch's default generator."""
        if isinstance(param_group, dict):
            param_group = _rounding.with_seed(param_group, self.defaults)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if not isinstance(p, Tensor):
                raise TypeError(f"qop: params must be tensors, got {type(p).__name__}")
            if p.is_complex() or not p.is_floating_point():
                raise TypeError(f"qop: params must be floating point (float32, bfloat16 or float16), got {p.dtype}")
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"qop: params must be float32, bfloat16 or float16, got {p.dtype}")
        self.check_group(group)
        self._bind_hp(group)

    def _bind_hp(self, group: dict[str, Any]) -> None:
        params = group["params"]
        group["hp"] = _hparams.new_vector(self.hp_keys, group, params[0].device if params else torch.device("cpu"))
        self._hp_views.append(_hparams.bind_views(self.hp_keys, group))
        self._add_codes(params)

    def _add_codes(self, params: Iterable[Tensor]) -> None:
        # code books per device and format, made here (eagerly) so that a traced first step only looks them up
        for p in params:
            for fmt in _formats.BOOK_BITS:
                if (p.device, fmt) not in self._codes:
                    self._codes[(p.device, fmt)] = _formats.books(fmt, self.state_signed, p.device)

    # ------------------------------------------------------------------------------------ state
    def _format(self, group: dict[str, Any], p: Tensor) -> StateFormat:
        """The format of ``p``'s states: ``optim_bits`` (group or override), float32 below ``min_8bit_size``."""
        cfg = GlobalOptimManager.get_instance().config_for(p)
        bits = cfg.get("optim_bits", group["optim_bits"])
        _formats.check_optim_bits(bits, self.rule)
        return _formats.low_bit(bits, p.numel(), cfg.get("min_8bit_size", group["min_8bit_size"]))

    def _paged(self, group: dict[str, Any], p: Tensor) -> bool:
        cfg = GlobalOptimManager.get_instance().config_for(p)
        return bool(cfg.get("is_paged", group["is_paged"])) and p.device.type == "cuda"

    def _zeros(self, group: dict[str, Any], p: Tensor, dtype: torch.dtype, numel: Any = None) -> Tensor:
        """Zeros like ``p`` (or of ``numel`` elements, or of that shape when a tuple), paged where asked."""
        shape = p.shape if numel is None else (tuple(numel) if isinstance(numel, (tuple, torch.Size)) else (numel,))
        if self._paged(group, p):
            return paged.paged_zeros(shape, dtype=dtype, device=p.device)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        state = self.state[p]
        fmt = self._format(group, p)  # on the global size, for a DTensor
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        like = _distributed.local(p)  # a DTensor's states are of its local shard (see _distributed)
        for j in range(self.n_states(group)):
            init = self.initial_state(group, j)
            if fmt in FORMAT_BLOCKSIZE:
                book = self._codes[(p.device, fmt)][j] if fmt in _formats.BOOK_BITS else None
                zeros = lambda shape, dtype: self._zeros(group, like, dtype, shape)
                sizes = _distributed.entry_sizes(p, fmt)
                made = _formats.new_state(fmt, like, init, book, zeros, j, sizes)
                state[_STATE_KEYS[j]], state[_ABSMAX_KEYS[j]] = made
            else:
                state[_STATE_KEYS[j]] = self._zeros(group, like, _formats.VALUE_DTYPES[fmt]).fill_(init)

    def _percentile(self, group: dict[str, Any], p: Tensor) -> int:
        return GlobalOptimManager.get_instance().config_for(p).get("percentile_clipping", group["percentile_clipping"])

    # ------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient, one fused op call per bucket of a group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        haves = tuple(tuple(p.grad is not None for p in group["params"]) for group in self.param_groups)
        self._check_step(haves, grad_scale, found_inf)
        _prepare(self._token, haves)
        for index, (group, have) in enumerate(zip(self.param_groups, haves)):
            self._sync_hp(index, group)
            self._step_group(group, self._plans[(index, have)], grad_scale, found_inf)
        self._called[0] = True  # ``_opt_called``, read by lr schedulers
        return loss

    # schedulers leave our step alone (it records ``_opt_called`` itself): a compiled step has no graph break
    step = _torch_internals.leave_to_lr_schedulers(step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``, which dynamo refuses to trace; this one ends a compiled
        train step without a graph break."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                    continue
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def _check_step(
        self, haves: tuple[tuple[bool, ...], ...], grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        """Everything a step could refuse, in every group, checked before anything changes: a step that raises
        leaves params, states, steps and hyper-parameters as they were.  Attribute checks only (no host sync);
        assigned hyper-parameter values are checked in eager mode."""
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if t is not None and (not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point()):
                raise ValueError(f"qop: {name} must be a one-element floating-point tensor, got {t!r}")
        for index, (group, have) in enumerate(zip(self.param_groups, haves)):
            for i, (p, has_grad) in enumerate(zip(group["params"], have)):
                if has_grad:
                    check_grad(f"param_groups[{index}]['params'][{i}]", p, p.grad)
            if not torch.compiler.is_compiling():
                _hparams.check_assigned_in(self.hp_keys, self._hp_views[index], group)

    def _sync_hp(self, index: int, group: dict[str, Any]) -> None:
        """Copy hyper-parameters that were *assigned* to the group into ``hp``; put the views back (see
        :mod:`qop.optim._hparams`: OneCycleLR/CyclicLR assign ``betas``, users ``group["lr"] = 1e-4``, DCP's
        state-dict helpers set ``lr`` aside and put it back)."""
        _hparams.sync(self.hp_keys, self._hp_views[index], group)

    def _step_group(
        self, group: dict[str, Any], plan: list[Bucket], grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        flags = int(self.flags(group))
        for b in plan:
            # the group's own params (not the bucket's references): in a compiled train step these are the
            # tensors whose .grad the traced backward has just produced
            params = [group["params"][i] for i in b.index]
            grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
            if b.paged:
                paged.prefetch(b.paged)
            bflags = _rounding.flags(group, flags, params[0].dtype)
            hp = group["hp"]
            if hp.device != b.device:
                hp = hp.to(b.device)
            if b.hp_slots is not None:  # per-parameter overrides (GlobalOptimManager)
                hp = hp.index_put((b.hp_slots,), b.hp_values)
            if b.shard is not None:  # DTensor params (FSDP2): the op runs on local shards, norms are global
                _distributed.step_bucket(self, b, params, grads, hp, bflags, grad_scale, found_inf)
                continue
            gscale = self._gscale(b, grads, grad_scale)
            fi = None if found_inf is None else found_inf.to(b.device)
            ops.step(
                int(self.rule),
                bflags,
                params,
                grads,
                [s for st in b.states for s in st],
                [a for am in b.absmax for a in am],
                b.codes,
                b.steps,
                hp,
                gscale,
                fi,
            )

    def _plan(self, index: int, have: tuple[bool, ...]) -> list[Bucket]:
        """Group ``index``'s buckets for the parameters flagged in ``have`` (cached; creates missing states)."""
        key = (index, have)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build_plan(self.param_groups[index], have)
        return plan

    def _check_plan(self, index: int, have: tuple[bool, ...]) -> None:
        """Parse the per-parameter overrides a new plan will read (an override that cannot be read raises here,
        before any state is created)."""
        manager = GlobalOptimManager.get_instance()
        group = self.param_groups[index]
        for i, (p, has_grad) in enumerate(zip(group["params"], have)):
            if has_grad and not self.state.get(p):
                self._format(group, p)  # an optim_bits override that names no format raises here
                _distributed.layout(p)  # so does a DTensor sharded other than on dim 0
            if has_grad:
                try:
                    manager.hp_override(p, self.hp_keys)
                except (TypeError, ValueError) as exc:
                    raise ValueError(
                        f"qop: GlobalOptimManager override of param_groups[{index}]['params'][{i}]: {exc}"
                    ) from exc

    def _build_plan(self, group: dict[str, Any], have: tuple[bool, ...]) -> list[Bucket]:
        return _plan.build(self, group, have)

    def _gscale(self, b: Bucket, grads: list[Tensor], grad_scale: Tensor | None) -> Tensor | None:
        """Per-tensor gradient multipliers: percentile clipping and the inverse AMP scale, on the device
        (one ``qop.percentile_clip`` call per distinct percentile of the bucket, usually one)."""
        if grad_scale is None and not b.clips:
            return None
        inv = torch.ones((), dtype=torch.float32, device=b.device)
        if grad_scale is not None:
            inv = inv / grad_scale.to(b.device)
        if len(b.clips) == 1 and len(b.clips[0].positions) == len(grads):
            c = b.clips[0]
            return ops.percentile_clip(grads, c.histories, c.steps, c.percentile, inv)
        gscale = inv.expand(len(grads)).clone()
        for c in b.clips:
            scales = ops.percentile_clip([grads[i] for i in c.positions], c.histories, c.steps, c.percentile, inv)
            gscale = gscale.index_copy(0, c.index, scales)
        return gscale

    # ------------------------------------------------------------------------------ state dicts
    # torch.optim runs its state-dict hooks inside ``state_dict``/``load_state_dict``; ours run them around our
    # own work so that post-hooks see what ``state_dict()`` returns and load hooks run at all.
    @_torch_internals.disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """Like torch.optim's, with hyper-parameters as plain numbers and the ``hp`` vector left out."""
        for pre_hook in _torch_internals.state_dict_hooks(self, "pre"):
            pre_hook(self)
        with _torch_internals.without_state_dict_hooks(self):
            sd = super().state_dict()
        for g in sd["param_groups"]:
            _hparams.export(self.hp_keys, g)
        _sharded_state.export_state(self, sd)  # DTensor params: the unsharded format (a collective)
        for post_hook in _torch_internals.state_dict_hooks(self, "post"):
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @_torch_internals.disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load our own state dict, a bitsandbytes one (quantized tensors under ``BNB_QUANT_KEY``) or one of
        another qop format (see :mod:`qop.optim._state_dict`).

        The whole state dict is validated before anything changes; a refused one raises ``ValueError`` naming the
        parameter and the key and leaves the optimizer as it was.  Group keys that say how states are stored
        (``_state_dict.FORMAT_KEYS``) stay the optimizer's own, the loaded states being converted to its format;
        group keys missing from the state dict keep their current values.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"qop: state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for pre_hook in _torch_internals.load_state_dict_hooks(self, "pre"):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load(self._preprocess_state_dict(state_dict))
        for post_hook in _torch_internals.load_state_dict_hooks(self, "post"):
            post_hook(self)

    def _preprocess_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Turn another library's layout into ours before validation (AdEMAMix: bitsandbytes' stacked states)."""
        return state_dict

    def _load(self, state_dict: dict[str, Any]) -> None:
        merged, new_state = _state_dict.prepare(self, state_dict)
        # everything is valid: from here on nothing raises
        for ours, group, views in zip(self.param_groups, merged, self._hp_views):
            _hparams.load(self.hp_keys, views, ours, group)
        self.state.clear()
        self.state.update(new_state)
        self._plans.clear()
        self._static.clear()
        _sharded_state.localize_states(self)  # DTensor params: back to their local shards


@_torch_internals.mark_constant_result
def _prepare(token: int, haves: tuple[tuple[bool, ...], ...]) -> int:
    """Create the missing states and buckets of the optimizer ``token`` for the parameters flagged in ``haves``.

    Under ``torch.compile`` dynamo runs this eagerly while tracing and records only its (constant) result, as
    it does for ``torch.optim``'s ``_init_group``: even the first compiled step then reads its states as
    inputs (so there is no recompile after it), and a compiled train step may pass ``haves`` computed from
    gradients that its traced backward is about to produce.
    """
    opt = _LIVE[token]
    dynamo_loaded = _torch_internals.dynamo_loaded()
    for index, have in enumerate(haves):  # what building a plan could refuse, before any state is made
        if (index, have) not in opt._plans:
            opt._check_plan(index, have)
    for index, have in enumerate(haves):
        plan = opt._plan(index, have)
        if dynamo_loaded and (index, have) not in opt._static:
            _torch_internals.mark_static(itertools.chain([opt.param_groups[index]["hp"]], *(b.tensors() for b in plan)))
            opt._static.add((index, have))
    return 0
