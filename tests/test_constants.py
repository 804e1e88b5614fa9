"""Every constant has one source, ``qop/_schema.py``: the C++ kernels' hand-kept mirror and what every backend
accepts are checked against it, so a drift fails here.

* the enums and sizes of ``csrc/cpu/checks.h`` are parsed and compared with ``Rule``, ``Flag``, ``HP``,
  ``StateFormat``, ``BLOCKSIZE``, ``HISTORY``, ``ALL_FLAGS`` and ``MIX32_MULTIPLIERS``;
* the state count of every rule and flag combination is what each kernel (C++, the reference) accepts, and one
  state more or fewer is refused;
* flags beyond ``ALL_FLAGS`` are refused by every kernel.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import qop
from qop import _schema
from qop._schema import (
    ALL_FLAGS,
    BLOCKSIZE,
    CODE_SIZE,
    FORMAT_BLOCKSIZE,
    FORMAT_RULES,
    FP8_FIRST_ZERO_FREE_STATE,
    FP8_MAX,
    FP8_MIN_ABSMAX,
    HISTORY,
    HP,
    MAX_STATES,
    MIX32_MULTIPLIERS,
    STATE_COUNTS,
    Flag,
    Rule,
    StateFormat,
    n_states,
)

CHECKS_H = Path(__file__).resolve().parents[1] / "csrc" / "cpu" / "checks.h"


def _enum(text: str, name: str) -> dict[str, int]:
    """The members of ``enum name : int { ... }`` in C++ source."""
    body = re.search(rf"enum {name} : int \{{(.*?)\}};", text, re.S)
    assert body, f"enum {name} not found in {CHECKS_H}"
    return {m[0]: int(m[1]) for m in re.findall(r"(\w+)\s*=\s*(\d+)", body.group(1))}


def _constant(text: str, name: str) -> int:
    m = re.search(rf"constexpr int64_t {name} = (\d+);", text)
    assert m, f"{name} not found in {CHECKS_H}"
    return int(m.group(1))


@pytest.mark.skipif(not CHECKS_H.exists(), reason="the C++ sources ship with the source tree only")
def test_the_cpp_mirror_matches_the_schema() -> None:
    text = CHECKS_H.read_text()
    assert _enum(text, "Rule") == {r.name: int(r) for r in Rule}
    assert _enum(text, "Flag") == {**{f.name: int(f) for f in Flag if f}, "ALL_FLAGS": ALL_FLAGS}
    assert _enum(text, "HP") == {**{h.name: int(h) for h in HP}, "HP_SIZE": len(HP)}
    assert _constant(text, "kBlocksize") == BLOCKSIZE
    assert _constant(text, "kHistory") == HISTORY
    mix = [int(m, 16) for m in re.findall(r"constexpr uint32_t kMix32[AB] = (0x[0-9A-Fa-f]+);", text)]
    assert tuple(mix) == MIX32_MULTIPLIERS
    n_formats = max(StateFormat) + 1  # one more than the largest (values may be reserved)
    assert _enum(text, "StateFormat") == {**{f.name: int(f) for f in StateFormat}, "N_FORMATS": n_formats}
    assert _constant(text, "kBlocksize4") == FORMAT_BLOCKSIZE[StateFormat.BLOCKWISE4]
    assert _constant(text, "kFp8Blocksize") == FORMAT_BLOCKSIZE[StateFormat.FP8]
    assert _constant(text, "kCodeSize4") == CODE_SIZE[StateFormat.BLOCKWISE4]
    assert _constant(text, "kCodeSize") == CODE_SIZE[StateFormat.BLOCKWISE8]
    floats = dict(re.findall(r"constexpr float (\w+) = ([0-9.e+-]+)f;", text))
    assert float(floats["kFp8Max"]) == FP8_MAX and float(floats["kFp8MinAbsmax"]) == FP8_MIN_ABSMAX
    assert _constant(text, "kFp8FirstZeroFreeState") == FP8_FIRST_ZERO_FREE_STATE
    # the rules each format serves: the C++ format_serves mirrors FORMAT_RULES
    serves = re.search(r"constexpr bool format_serves\(int format, int rule\) \{ return (.*?); \}", text)
    assert serves and serves.group(1) == "format != FP8 || rule == ADAM"
    assert FORMAT_RULES[StateFormat.FP8] == {Rule.ADAM} and FORMAT_RULES[StateFormat.BLOCKWISE4] == set(Rule)


def test_the_state_counts_cover_every_rule() -> None:
    assert set(STATE_COUNTS) == set(Rule)
    assert max(n_states(r, ALL_FLAGS, True) for r in Rule) == MAX_STATES
    assert ALL_FLAGS == sum(int(f) for f in Flag)


def _step_args(rule: Rule, flags: int, k: int, bits: int) -> tuple:
    """Arguments of a one-tensor step with ``k`` states (a momentum rule with k == 0 has no state)."""
    n = 300
    p, g = torch.randn(n), torch.randn(n)
    hp = torch.zeros(len(HP))
    hp[HP.LR], hp[HP.EPS], hp[HP.BETA1], hp[HP.BETA2], hp[HP.BETA3] = 1e-3, 1e-8, 0.9, 0.99, 0.999
    steps = [torch.zeros(())]
    if bits in (32, 16):
        dtype = torch.bfloat16 if bits == 16 else torch.float32
        return (
            int(rule),
            flags,
            [p],
            [g],
            [torch.zeros(n, dtype=dtype) for _ in range(k)],
            [],
            [],
            steps,
            hp,
            None,
            None,
        )
    states = [torch.zeros(n, dtype=torch.uint8) for _ in range(k)]
    absmax = [torch.zeros(2) for _ in range(k)]
    codes = [qop.dynamic_map(True)] * k
    return (int(rule), flags, [p], [g], states, absmax, codes, steps, hp, None, None)


def _checked_reference():  # type: ignore[no-untyped-def]
    """The reference with the shared argument checks, as registered for devices without a native kernel."""
    from qop._register import _checked_reference as table

    return table()["step"]


def _kernel(kind: str):  # type: ignore[no-untyped-def]
    if kind == "cpp":
        if not qop.HAS_CPU_KERNELS:
            pytest.skip("qop C++ CPU kernels not built")
        return torch.ops.qop.step
    return _checked_reference()


CASES = [(rule, flags) for rule in Rule for flags in ((0, int(Flag.AMSGRAD)) if rule == Rule.ADAM else (0,))]


@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("kind", ["cpp", "reference"])
@pytest.mark.parametrize(("rule", "flags"), CASES, ids=[f"{r.name}-{f}" for r, f in CASES])
def test_every_kernel_takes_the_schema_state_count(rule: Rule, flags: int, kind: str, bits: int) -> None:
    op = _kernel(kind)
    k = n_states(rule, flags, True)
    op(*_step_args(rule, flags, k, bits))  # accepted
    for wrong in (k - 1, k + 1):
        if wrong < 0 or wrong > MAX_STATES or (rule == Rule.MOMENTUM and wrong == 0):
            continue  # a momentum rule without its state is plain SGD
        with pytest.raises((ValueError, RuntimeError), match="state"):
            op(*_step_args(rule, flags, wrong, bits))


@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("kind", ["cpp", "reference"])
def test_unknown_flags_are_refused(kind: str, bits: int) -> None:
    op = _kernel(kind)
    op(*_step_args(Rule.LION, 0, 1, bits))
    with pytest.raises((ValueError, RuntimeError), match="flags"):
        op(*_step_args(Rule.LION, ALL_FLAGS + 1, 1, bits))


def _dispatch_table(op: str) -> dict[str, str]:
    """The dispatcher's computed kernel per key for ``qop::op``."""
    table = torch._C._dispatch_dump_table(f"qop::{op}")
    return dict(line.split(": ", 1) for line in table.splitlines() if ": " in line)


@pytest.mark.parametrize("op", list(_schema.SCHEMAS))
def test_every_backend_has_a_kernel_whatever_the_import_order(op: str) -> None:
    """Native kernels own their backend's key; every other backend, a new one included, gets the checked reference
    through one CompositeExplicitAutograd registration."""
    table = _dispatch_table(op)
    if qop.HAS_CPU_KERNELS:
        assert ".cpp" in table["CPU"] and "[kernel]" in table["CPU"]
    for key in ("XPU", "MPS", "PrivateUse1", *(() if torch.cuda.is_available() else ("CUDA",))):
        assert "_register.py" in table[key] and "default backend kernel" in table[key], (key, table[key])
    assert "[kernel]" in table["Meta"]


def test_one_version() -> None:
    """The installed distribution's version is read from ``qop.__version__`` (pyproject declares it dynamic)."""
    import importlib.metadata

    assert importlib.metadata.version("qop") == qop.__version__


def test_fp8_zero_free_states_are_the_unsigned_ones() -> None:
    """The fp8 states kept zero-free (FP8_FIRST_ZERO_FREE_STATE on) are exactly the unsigned states (the second
    moments) of every optimizer whose rule fp8 serves."""
    for cls in qop.optim.CLASSES:
        if cls.rule in FORMAT_RULES[StateFormat.FP8]:
            signed = cls.state_signed[: n_states(cls.rule, Flag.AMSGRAD, True)]
            assert signed == tuple(j < FP8_FIRST_ZERO_FREE_STATE for j in range(len(signed))), cls.__name__
