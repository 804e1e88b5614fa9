"""Every op of the ``qop`` namespace, declared once.

Backends only register kernels for these names (CPU in ``csrc/cpu``, CUDA in ``qop/triton``, fakes in
``meta/``, the pure-PyTorch reference in ``qop/reference.py``).  Mutation is declared with ``(a!)``
annotations so functionalization and inductor's re-inplacing see exactly what a step writes; ops that
only mutate return nothing.

The step op, ``step``, takes a whole list of tensors (one param group, one device, one dtype) and reads
every schedulable hyper-parameter from tensors, so no value is baked into a traced graph:

* ``states`` -- ONE flat list of k states x n tensors, state j of tensor i at ``j * n + i`` (k from
  :func:`n_states`; a momentum rule passes no state at all for plain SGD, so ``len(states) == 0`` says
  so).  Their dtype says the format (:class:`StateFormat`, told by :func:`state_format`): float32 and
  bfloat16 states are the values themselves (the rule computes in float32, bfloat16 ones are stored rounded
  to nearest-even); uint8 states are blockwise 8-bit codes with ``absmax`` (flat like
  ``states``, one float32 per 256-block) and ``codes`` (one 256-entry code book per state), or packed
  4-bit codes (1-d, ``(numel + 1) // 2`` bytes, element 2i in the low nibble) with one absmax per 128-block
  and 16-entry code books (the size of ``codes[0]`` tells 8 from 4 bits); float8_e4m3fn states take one
  float32 scale per 256-block in ``absmax`` and no code book.  Formats without scales take empty
  ``absmax`` and ``codes``;
* ``hp`` -- float32 vector laid out by :class:`HP` (lr, betas, eps, weight decay, ...);
* ``steps`` -- one float32 0-d tensor per parameter, incremented by the op itself (unless
  ``found_inf`` is set), the rule using ``t = steps[i] + 1``;
* ``gscale`` -- optional float32 vector, one gradient multiplier per tensor (percentile clipping,
  inverse AMP scale);
* ``found_inf`` -- optional float32 0-d tensor; when non-zero the whole call is a no-op;
* ``unorm`` -- optional float32 ``[n, 2]``: per tensor, the squared norms of its update and of itself, summed
  over the whole parameter when the tensor is one shard of it.  With ``Flag.UNORM_CLIP`` the op then clips
  with these instead of the norms of the tensors it is given (and skips its first pass); ignored otherwise.

With ``Flag.STOCHASTIC_ROUND`` (bfloat16 params only) the new float32 value x of a parameter is rounded to one of
its two bfloat16 neighbours: to the one farther from zero with probability (the low 16 bits of x) / 2^16, else
toward zero, so its expectation is x.  The 16 random bits of element e (its index in the tensor, mod 2^32) at step t
(``steps[i] + 1``) are the top half of ``mix32(e ^ mix32(seed ^ mix32(t)))`` with ``seed = hp[SR_SEED]``
(:data:`MIX32_MULTIPLIERS`); x's bits plus them, cut to the top 16, are the rounded value (a NaN becomes 0x7FC0, as
in nearest rounding).  Counter-based: every backend computes the same bits, with no generator state.

``percentile_clip`` computes the ``gscale`` of percentile clipping for a whole list of gradients at
once: it records each gradient's norm in that parameter's 100-entry history and returns the clip
factors, all on the device.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

NAMESPACE = "qop"
#: Block size of the 8-bit optimizer states (elements per absmax), as in bitsandbytes.
BLOCKSIZE = 256

_lib = torch.library.Library(NAMESPACE, "DEF")  # the namespace is ours


class Rule(enum.IntEnum):
    """Per-element update rules understood by the step op (compile-time switch in every kernel)."""

    ADAM = 1  # Adam, AdamW, LAMB: state1 m, state2 v, state3 vmax (amsgrad)
    MOMENTUM = 2  # SGD, LARS: state1 momentum buffer (absent when momentum == 0)
    ADAGRAD = 3  # state1 sum of squares
    RMSPROP = 4  # state1 running mean of squares
    LION = 5  # state1 m
    ADEMAMIX = 6  # state1 fast EMA m1, state2 nu, state3 slow EMA m2


class Flag(enum.IntFlag):
    """Structural options of a rule; static, so a change means a different graph."""

    NONE = 0
    NESTEROV = 1  # MOMENTUM: step along g + momentum * buf
    AMSGRAD = 2  # ADAM: keep vmax = max(vmax, v) in state3 and use it in the denominator
    NO_BIAS_CORRECTION = 4  # ADAM: c1 = c2 = 1 (LAMB bias_correction=False)
    L2_WEIGHT_DECAY = 8  # ADAM: g += wd * p instead of decoupled decay (LAMB adam_w_mode=False)
    UNORM_CLIP = 16  # two passes: clip the update norm to hp[MAX_UNORM] * ||p|| (LAMB, LARS)
    STOCHASTIC_ROUND = 32  # bfloat16 params only: round the new value stochastically, seeded by hp[SR_SEED]


class HP(enum.IntEnum):
    """Slots of the float32 hyper-parameter vector ``hp`` read by the step op."""

    LR = 0
    BETA1 = 1  # Adam/Lion/AdEMAMix beta1; SGD/LARS momentum
    BETA2 = 2
    BETA3 = 3  # AdEMAMix slow EMA
    EPS = 4
    WEIGHT_DECAY = 5
    ALPHA = 6  # RMSprop smoothing constant; AdEMAMix mixing coefficient
    DAMPENING = 7  # SGD/LARS
    LR_DECAY = 8  # Adagrad
    MAX_UNORM = 9  # LAMB/LARS update-norm clip (read when Flag.UNORM_CLIP is set)
    T_ALPHA = 10  # AdEMAMix alpha warm-up steps (0: off)
    T_BETA3 = 11  # AdEMAMix beta3 warm-up steps (0: off)
    SR_SEED = 12  # seed of stochastic rounding (Flag.STOCHASTIC_ROUND): an integer in [0, 2^24), exact in float32


HP_SIZE = len(HP)
#: Every flag the step op accepts; any other bit is refused.
ALL_FLAGS = int(sum(Flag))
#: State tensors per parameter of each rule (without the states its flags add, see :func:`n_states`).
STATE_COUNTS: dict[Rule, int] = {
    Rule.ADAM: 2,  # m, v (+ vmax with Flag.AMSGRAD)
    Rule.MOMENTUM: 1,  # the momentum buffer, absent when the optimizer has no momentum
    Rule.ADAGRAD: 1,
    Rule.RMSPROP: 1,
    Rule.LION: 1,
    Rule.ADEMAMIX: 3,  # m1, nu, m2
}
MAX_STATES = 3


def n_states(rule: int, flags: int, momentum_state: bool) -> int:
    """How many state tensors each parameter has for this rule and flags (the one source of the state count)."""
    if rule == Rule.MOMENTUM and not momentum_state:
        return 0
    return STATE_COUNTS[Rule(rule)] + (1 if rule == Rule.ADAM and flags & Flag.AMSGRAD else 0)


class StateFormat(enum.IntEnum):
    """How the step op's states are stored: the one list of formats (C++ mirror in ``csrc/cpu/checks.h``).

    A new format (4-bit packed, fp8 with per-block scales, bfloat16) is a new member, a new branch of
    :func:`state_format` and a new kernel branch per backend, never a new op.
    """

    FLOAT32 = 0  # float32 values, no absmax, no code book
    BLOCKWISE8 = 1  # uint8 indices into a 256-entry code book, one float32 absmax per BLOCKSIZE elements
    BFLOAT16 = 2  # bfloat16 values (rounded to nearest-even when stored), no absmax, no code book
    BLOCKWISE4 = 3  # two 4-bit indices into a 16-entry code book per uint8 (element 2i in the low nibble)
    FP8 = 4  # float8_e4m3fn values, one float32 scale per FP8_BLOCKSIZE elements (in ``absmax``), no code book


#: Block size of the 4-bit states (elements per absmax), as in torchao.
BLOCKSIZE4 = 128
#: Block size of the fp8 states (elements per scale), as in torchao.
FP8_BLOCKSIZE = 256
#: Largest finite float8_e4m3fn value: a block's scale is ``max(absmax, FP8_MIN_ABSMAX) / FP8_MAX``.
FP8_MAX = 448.0
#: Floor of the absmax of an fp8 block (a block of zeros keeps a positive scale).
FP8_MIN_ABSMAX = 1e-12
#: fp8 states from this index on (the Adam rule's second moments, ``v`` and AMSGrad's maximum) are zero-free: a
#: positive value whose code rounds to 0 (below 2^-10 of the scale) is stored as the smallest subnormal, 2^-9.
#: e4m3fn reaches only ~4e-6 of a block's absmax; a second moment flushed to 0 beside a first moment that is not
#: makes the update m / eps, which explodes (as the 4-bit books exclude zero for second moments).
FP8_FIRST_ZERO_FREE_STATE = 1
#: Elements per absmax (fp8: scale) entry of each blockwise format.
FORMAT_BLOCKSIZE: dict[StateFormat, int] = {
    StateFormat.BLOCKWISE8: BLOCKSIZE,
    StateFormat.BLOCKWISE4: BLOCKSIZE4,
    StateFormat.FP8: FP8_BLOCKSIZE,
}
#: Entries of the code book of each format that has one: how uint8 states tell 8-bit (256) from 4-bit (16).
CODE_SIZE: dict[StateFormat, int] = {StateFormat.BLOCKWISE8: 256, StateFormat.BLOCKWISE4: 16}


def state_format(dtype: torch.dtype, code_size: int = 256) -> StateFormat | None:
    """The format of states of this dtype (None: not a state format).  uint8 states are 8-bit or packed 4-bit
    codes: the size of their code book (``CODE_SIZE``) tells which; other dtypes ignore ``code_size``."""
    if dtype == torch.float32:
        return StateFormat.FLOAT32
    if dtype == torch.uint8:
        for fmt, size in CODE_SIZE.items():
            if code_size == size:  # a comparison, not a look-up: traced sizes are symbolic
                return fmt
        return None
    if dtype == torch.bfloat16:
        return StateFormat.BFLOAT16
    if dtype == torch.float8_e4m3fn:
        return StateFormat.FP8
    return None


#: Seeds of stochastic rounding lie in [0, SR_SEED_LIMIT): integers that float32 (the ``hp`` vector) holds exactly.
SR_SEED_LIMIT = 1 << 24
#: The multipliers of :func:`mix32` (the "lowbias32" integer hash, two multiply/xor-shift rounds on uint32).
MIX32_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


#: Rules each low-bit format serves (every kernel instantiates only these; the checks refuse the others).
FORMAT_RULES: dict[StateFormat, frozenset[Rule]] = {
    StateFormat.BLOCKWISE4: frozenset(Rule),  # optim_bits=4 for every optimizer
    StateFormat.FP8: frozenset({Rule.ADAM}),  # AdamFp8, AdamWFp8
}


def state_numel(fmt: StateFormat, numel: int) -> int:
    """Elements of the state tensor that holds ``numel`` values in format ``fmt`` (4-bit: two per byte)."""
    return (numel + 1) // 2 if fmt == StateFormat.BLOCKWISE4 else numel


def split_states(flat: Sequence[Tensor], n: int) -> list[list[Tensor]]:
    """The flat ``states``/``absmax`` list of the step op as one list of n tensors per state."""
    return [list(flat[j * n : (j + 1) * n]) for j in range(len(flat) // n)] if n else []


#: Gradient norms remembered per parameter by percentile clipping (bitsandbytes' gnorm_vec).
HISTORY = 100

SCHEMAS: dict[str, str] = {
    "quantize_blockwise": "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_blockwise": ("(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor"),
    "step": (
        "(int rule, int flags, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] states, Tensor(c!)[] absmax, "
        "Tensor[] codes, Tensor(d!)[] steps, Tensor hp, Tensor? gscale=None, Tensor? found_inf=None, "
        "Tensor? unorm=None) -> ()"
    ),
    "percentile_clip": (
        "(Tensor[] grads, Tensor(a!)[] gnorm_vecs, Tensor[] steps, int percentile, Tensor prescale) -> Tensor"
    ),
}

for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)

#: Python annotations of the schema types (as the parser spells them; a ScalarType parses as int).
_PY_TYPES: dict[str, Any] = {
    "int": int,
    "Tensor": Tensor,
    "Optional[Tensor]": Tensor | None,
    "List[Tensor]": Sequence[Tensor],
}


def signature(name: str) -> inspect.Signature:
    """The Python signature of op ``name``, read from its parsed schema (names, types, defaults)."""
    parsed = torch._C.parse_schema(f"{NAMESPACE}::{name}{SCHEMAS[name]}")
    params = []
    for arg in parsed.arguments:
        default = arg.default_value if arg.has_default_value() else inspect.Parameter.empty
        params.append(
            inspect.Parameter(
                arg.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=default,
                annotation=_PY_TYPES.get(str(arg.type), Any),
            )
        )
    returns = [r.type for r in parsed.returns]
    return inspect.Signature(params, return_annotation=None if not returns else Any)


def forwarder(name: str, target: Callable[..., Any], doc: str, module: str = __name__) -> Callable[..., Any]:
    """A plain function with op ``name``'s signature that passes its arguments on to ``target`` in schema order:
    how shims around an op are made without writing its argument list again.  Generated as source, so that
    dynamo traces it like hand-written code (no ``Signature.bind`` at call time)."""
    sig = signature(name)
    names = list(sig.parameters)
    defaults = {f"_default_{p.name}": p.default for p in sig.parameters.values() if p.default is not p.empty}
    params = ", ".join(f"{n}=_default_{n}" if f"_default_{n}" in defaults else n for n in names)
    # made by a factory so that the target and the defaults are closure cells, not globals of a module
    outer = ", ".join(["_target", *defaults])
    source = (
        f"def _make({outer}):\n    def {name}({params}):\n        return _target({', '.join(names)})\n"
        f"    return {name}\n"
    )
    scope: dict[str, Any] = {}
    exec(source, scope)
    forward = scope["_make"](target, *defaults.values())
    forward.__module__ = module
    forward.__qualname__ = name
    forward.__doc__ = doc
    forward.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    forward.__annotations__["return"] = sig.return_annotation
    return forward
