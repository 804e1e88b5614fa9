"""The step op's cases, shared by the CPU/reference tests (test_ops.py) and the Triton tests (test_triton.py).

Each case states what the op must compute: its rule, flags, hyper-parameters and state count, and which code
book each state uses in 8 bits.  ``op_args`` lays a call out in the op's argument order (flat state lists).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from qop import HP, Flag, Rule, reference
from qop._maps import code_book
from qop._schema import FORMAT_BLOCKSIZE, FORMAT_RULES, StateFormat, n_states

# Which code book each state uses: signed for first moments and momentum, unsigned for second moments.
SIGNED = {
    Rule.ADAM: (True, False, False),
    Rule.MOMENTUM: (True,),
    Rule.ADAGRAD: (False,),
    Rule.RMSPROP: (False,),
    Rule.LION: (True,),
    Rule.ADEMAMIX: (True, False, True),
}

BASE_HP = {
    "LR": 1e-2,
    "BETA1": 0.9,
    "BETA2": 0.999,
    "BETA3": 0.9999,
    "EPS": 1e-8,
    "WEIGHT_DECAY": 1e-2,
    "ALPHA": 0.99,
    "DAMPENING": 0.0,
    "LR_DECAY": 0.0,
    "MAX_UNORM": 0.0,
    "T_ALPHA": 0.0,
    "T_BETA3": 0.0,
}


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One rule with its flags and hyper-parameters (on top of ``BASE_HP``)."""

    name: str
    rule: Rule
    flags: int = 0
    momentum_state: bool = True  # MOMENTUM only: False is plain SGD (no state)
    hp: tuple[tuple[str, float], ...] = ()

    @property
    def n_states(self) -> int:
        return n_states(self.rule, self.flags, self.momentum_state)

    def hp_tensor(self) -> Tensor:
        values = dict(BASE_HP, **dict(self.hp))
        h = torch.zeros(len(HP))
        for key, value in values.items():
            h[HP[key]] = value
        return h

    def __str__(self) -> str:
        return self.name


STEP_CASES = [
    StepCase("adam", Rule.ADAM),
    StepCase("adam_amsgrad", Rule.ADAM, Flag.AMSGRAD),
    StepCase("adam_no_bias_correction", Rule.ADAM, Flag.NO_BIAS_CORRECTION),
    StepCase("adam_l2", Rule.ADAM, Flag.L2_WEIGHT_DECAY),
    StepCase("lamb", Rule.ADAM, Flag.UNORM_CLIP, hp=(("MAX_UNORM", 0.02),)),
    StepCase(
        "lamb_l2_nobc_amsgrad",
        Rule.ADAM,
        Flag.UNORM_CLIP | Flag.L2_WEIGHT_DECAY | Flag.NO_BIAS_CORRECTION | Flag.AMSGRAD,
        hp=(("MAX_UNORM", 1.0),),
    ),
    StepCase("sgd", Rule.MOMENTUM),
    StepCase("sgd_nesterov", Rule.MOMENTUM, Flag.NESTEROV),
    StepCase("sgd_dampening", Rule.MOMENTUM, hp=(("DAMPENING", 0.3),)),
    StepCase("sgd_no_momentum", Rule.MOMENTUM, momentum_state=False, hp=(("BETA1", 0.0),)),
    StepCase("lars", Rule.MOMENTUM, Flag.UNORM_CLIP, hp=(("MAX_UNORM", 0.02),)),
    StepCase("adagrad", Rule.ADAGRAD, hp=(("LR_DECAY", 0.01),)),
    StepCase("rmsprop", Rule.RMSPROP),
    StepCase("lion", Rule.LION, hp=(("LR", 1e-3),)),
    StepCase("ademamix", Rule.ADEMAMIX, hp=(("ALPHA", 5.0),)),
    StepCase("ademamix_schedules", Rule.ADEMAMIX, hp=(("ALPHA", 5.0), ("T_ALPHA", 3.0), ("T_BETA3", 3.0))),
]
CASES = {c.name: c for c in STEP_CASES}
#: Every case with stochastic rounding of its (bfloat16) params, seeded.
SR_CASES = [
    dataclasses.replace(c, name=f"{c.name}_sr", flags=c.flags | Flag.STOCHASTIC_ROUND, hp=(*c.hp, ("SR_SEED", 4321.0)))
    for c in STEP_CASES
]


def flat(nested: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Per-state lists of tensors as the op's one flat list (state j of tensor i at ``j * n + i``)."""
    return [t for per_state in nested for t in per_state]


def op_args(
    rule: int,
    flags: int,
    params: list[Tensor],
    grads: list[Tensor],
    states: Sequence[Sequence[Tensor]],
    absmax: Sequence[Sequence[Tensor]],
    codes: Sequence[Tensor],
    steps: list[Tensor],
    hp: Tensor,
    gscale: Tensor | None = None,
    found_inf: Tensor | None = None,
    unorm: Tensor | None = None,
) -> tuple:
    """The arguments of ``qop::step`` from per-state lists; ``codes``: one per 8-bit state (none for float32)."""
    return (
        int(rule),
        int(flags),
        params,
        grads,
        flat(states),
        flat(absmax),
        list(codes),
        steps,
        hp,
        gscale,
        found_inf,
        unorm,
    )


# ----------------------------------------------------------------------------- low-bit state formats
#: The low-bit formats beyond 8 bits, with the rules each serves (``FORMAT_RULES``), as test ids.
LOWBIT_FORMATS = {"4bit": StateFormat.BLOCKWISE4, "fp8": StateFormat.FP8}
#: Shapes with tails of every block size (128-blocks, 256-blocks), odd counts (a half-filled last byte) and empties.
LOWBIT_SHAPES = [(0,), (1,), (3,), (127,), (128,), (129,), (255,), (257,), (1000,), (4097,), (33, 65)]


def lowbit_cases(fmt: StateFormat) -> list[StepCase]:
    """The step cases whose rule format ``fmt`` serves."""
    return [c for c in STEP_CASES if c.rule in FORMAT_RULES[fmt]]


def lowbit_states(
    case: StepCase, fmt: StateFormat, shapes: Sequence[tuple[int, ...]], gen: torch.Generator, device: str = "cpu"
) -> tuple[list[list[Tensor]], list[list[Tensor]], list[Tensor]]:
    """Random states of ``case`` in format ``fmt`` (per-state lists of states and absmax, the code books), each
    tensor of at least two blocks with one all-zero block (absmax 0)."""
    bs = FORMAT_BLOCKSIZE[fmt]
    signed = SIGNED[case.rule][: case.n_states]
    book_bits = 4 if fmt == StateFormat.BLOCKWISE4 else None
    codes = [code_book(sg, book_bits, device) for sg in signed] if book_bits else []
    states: list[list[Tensor]] = [[] for _ in signed]
    absmax: list[list[Tensor]] = [[] for _ in signed]
    for j, sg in enumerate(signed):
        for s in shapes:
            x = torch.randn(s, generator=gen) * 0.1 if sg else torch.rand(s, generator=gen) * 1e-2
            if not sg:  # second moments far below their block's absmax: fp8 keeps them positive (zero-free)
                x.view(-1)[::7] *= 1e-7
            if x.numel() >= 2 * bs:
                x.view(-1)[bs : 2 * bs] = 0
            q, a = reference.quantize_state(fmt, x.reshape(-1), codes[j] if codes else None, j)
            states[j].append((q.view(s) if fmt == StateFormat.FP8 else q).to(device))
            absmax[j].append(a.to(device) if a is not None else a)
    return states, absmax, codes
