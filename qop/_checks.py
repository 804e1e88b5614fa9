"""Argument checks shared by the fake kernels, the reference and the Triton launchers.

Every failure names the offending argument, so bad input never turns into a silent wrong answer.
The C++ kernels repeat the same contract in ``csrc/cpu/checks.h``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._schema import (
    ALL_FLAGS,
    CODE_SIZE,
    FORMAT_BLOCKSIZE,
    FORMAT_RULES,
    HISTORY,
    HP_SIZE,
    Flag,
    Rule,
    StateFormat,
    n_states,
    state_format,
    state_numel,
)

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(cond: bool, msg: str, *args: object) -> None:
    """Raise naming the argument unless ``cond``; the message is only formatted on failure (checks are hot)."""
    torch._check(bool(cond), lambda: "qop: " + msg.format(*args))


def check_code(code: Tensor, name: str = "code", size: int = 256) -> None:
    check(code.dtype == torch.float32, "{} must be float32, got {}", name, code.dtype)
    check(code.dim() == 1 and code.numel() == size, "{} must have {} entries, got {}", name, size, tuple(code.shape))


def check_quantize(A: Tensor, code: Tensor, blocksize: int) -> None:
    check(A.dtype in PARAM_DTYPES, "A must be float32, bfloat16 or float16, got {}", A.dtype)
    check(A.layout == torch.strided, "A must be a dense tensor")
    check(A.is_contiguous(), "A must be contiguous")
    check_code(code)
    check(code.device == A.device, "code is on {} but A is on {}", code.device, A.device)
    check(blocksize > 0, "blocksize must be positive, got {}", blocksize)


def check_dequantize(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> None:
    check(A.dtype == torch.uint8, "A must be uint8 codes, got {}", A.dtype)
    check(A.is_contiguous(), "A must be contiguous")
    check(blocksize > 0, "blocksize must be positive, got {}", blocksize)
    check(absmax.dtype == torch.float32, "absmax must be float32, got {}", absmax.dtype)
    nblocks = -(-A.numel() // blocksize)
    check(
        absmax.numel() == nblocks,
        "absmax must have {} entries for {} codes, got {}",
        nblocks,
        A.numel(),
        absmax.numel(),
    )
    check_code(code)
    check(dtype in PARAM_DTYPES, "dtype must be float32, bfloat16 or float16, got {}", dtype)
    for name, t in (("absmax", absmax), ("code", code)):
        check(t.device == A.device, "{} is on {} but A is on {}", name, t.device, A.device)


def check_step(
    rule: int,
    flags: int,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Tensor],
    absmax: Sequence[Tensor],
    codes: Sequence[Tensor],
    steps: Sequence[Tensor],
    hp: Tensor,
    gscale: Tensor | None = None,
    found_inf: Tensor | None = None,
    unorm: Tensor | None = None,
) -> tuple[int, StateFormat]:
    """Validate the step op's arguments; returns the states per tensor and their format (float32 when none)."""
    check(rule in {int(r) for r in Rule}, "rule must be one of {}, got {}", [int(r) for r in Rule], rule)
    check(flags >= 0 and flags & ~ALL_FLAGS == 0, "flags must be a combination of qop.Flag, got {}", flags)
    n = len(params)
    check(len(grads) == n, "grads has {} tensors but params has {}", len(grads), n)
    check(len(steps) == n, "steps has {} tensors but params has {}", len(steps), n)
    k = n_states(rule, flags, len(states) > 0)
    check(
        len(states) == k * n,
        "states has {} tensors, rule {} needs {} ({} states x {} tensors)",
        len(states),
        rule,
        k * n,
        k,
        n,
    )
    fmt = StateFormat.FLOAT32  # what a call without state tensors runs: nothing to load or store
    if k and n:
        books = codes[0].numel() if codes else 256
        found = state_format(states[0].dtype, books)
        check(
            states[0].dtype in (torch.float32, torch.bfloat16, torch.uint8, torch.float8_e4m3fn),
            "states[0] must be float32, bfloat16, uint8 or float8_e4m3fn (a state format), got {}",
            states[0].dtype,
        )
        check(
            found is not None,
            "codes[0] has {} entries: uint8 states take 256-entry (8-bit) or 16-entry (4-bit) code books",
            books,
        )
        assert found is not None
        fmt = found
        rules = FORMAT_RULES.get(fmt)
        check(
            rules is None or rule in rules,
            "{} states serve rules {}, not rule {}",
            fmt.name.lower(),
            sorted(int(r) for r in rules or ()),
            rule,
        )
        for at, st in enumerate(states):
            check(
                st.dtype == states[0].dtype,
                "states[{}] is {} but states[0] is {}: one call takes one state format",
                at,
                st.dtype,
                states[0].dtype,
            )
    blocksize = FORMAT_BLOCKSIZE.get(fmt)
    if not (k and n):  # no state tensors: no format to tell, code books optional
        check(len(absmax) == 0, "absmax has {} tensors but states has none", len(absmax))
        check(len(codes) in (0, k), "codes has {} code books, one per state needs {}", len(codes), k)
    elif blocksize is None:  # formats without scales or code books
        check(len(absmax) == 0, "absmax has {} tensors but {} states take none", len(absmax), fmt.name.lower())
        check(len(codes) == 0, "codes has {} tensors but {} states take none", len(codes), fmt.name.lower())
    else:
        check(len(absmax) == k * n, "absmax has {} tensors but states has {}", len(absmax), k * n)
        if fmt in CODE_SIZE:
            check(len(codes) == k, "codes has {} code books, one per state needs {}", len(codes), k)
        else:
            check(len(codes) == 0, "codes has {} tensors but {} states take none", len(codes), fmt.name.lower())
    check(
        hp.dtype == torch.float32 and hp.dim() == 1 and hp.numel() >= HP_SIZE,
        "hp must be a float32 vector of {} hyper-parameters, got {} {}",
        HP_SIZE,
        hp.dtype,
        tuple(hp.shape),
    )
    if gscale is not None:
        check(
            gscale.dtype == torch.float32 and gscale.numel() == n,
            "gscale must be float32 with one entry per tensor ({}), got {} {}",
            n,
            gscale.dtype,
            tuple(gscale.shape),
        )
    if found_inf is not None:
        check(
            found_inf.numel() == 1 and found_inf.is_floating_point(),
            "found_inf must be a floating-point scalar tensor, got {} {}",
            found_inf.dtype,
            tuple(found_inf.shape),
        )
    if unorm is not None:
        check(
            unorm.dtype == torch.float32 and tuple(unorm.shape) == (n, 2),
            "unorm must be float32 of shape ({}, 2), got {} {}",
            n,
            unorm.dtype,
            tuple(unorm.shape),
        )
    if n == 0:
        return k, fmt
    device, dtype = params[0].device, params[0].dtype
    for name, t in (("hp", hp), ("gscale", gscale), ("found_inf", found_inf), ("unorm", unorm)):
        if t is not None:
            check(t.device == device, "{} is on {} but params are on {}", name, t.device, device)
    for i in range(n):
        p, g = params[i], grads[i]
        check(p.dtype in PARAM_DTYPES, "params[{}] must be float32, bfloat16 or float16, got {}", i, p.dtype)
        check(p.dtype == dtype, "params[{}] is {} but params[0] is {}: one call takes one dtype", i, p.dtype, dtype)
        check(
            not flags & Flag.STOCHASTIC_ROUND or dtype == torch.bfloat16,
            "flags has STOCHASTIC_ROUND, which needs bfloat16 params, but params[{}] is {}",
            i,
            dtype,
        )
        check(p.device == device, "params[{}] is on {} but params[0] is on {}", i, p.device, device)
        check(p.layout == torch.strided, "params[{}] must be a dense tensor", i)
        check(p.is_contiguous(), "params[{}] must be contiguous", i)
        check(g.layout == torch.strided, "grads[{}] is sparse; qop optimizers need dense gradients", i)
        check(g.device == device, "grads[{}] is on {} but params[{}] is on {}", i, g.device, i, device)
        check(g.dtype == dtype, "grads[{}] is {} but params[{}] is {}", i, g.dtype, i, dtype)
        check(g.shape == p.shape, "grads[{}] has shape {} but params[{}] has {}", i, tuple(g.shape), i, tuple(p.shape))
        check(g.is_contiguous(), "grads[{}] must be contiguous", i)
        s = steps[i]
        check(
            s.dtype == torch.float32 and s.numel() == 1 and s.device == device,
            "steps[{}] must be a float32 scalar tensor on {}",
            i,
            device,
        )
        numel = p.numel()
        want = state_numel(fmt, numel)
        for j in range(k):
            at = j * n + i
            st = states[at]
            check(
                st.numel() == want,
                "states[{}] (state{} of params[{}]) has {} elements but params[{}] has {} ({} in {} states)",
                at,
                j + 1,
                i,
                st.numel(),
                i,
                numel,
                want,
                fmt.name.lower(),
            )
            check(st.device == device, "states[{}] is on {} but params[{}] is on {}", at, st.device, i, device)
            check(st.is_contiguous(), "states[{}] (state{} of params[{}]) must be contiguous", at, j + 1, i)
            if blocksize is not None:
                am = absmax[at]
                nb = -(-numel // blocksize)
                check(am.is_contiguous(), "absmax[{}] (state{} of params[{}]) must be contiguous", at, j + 1, i)
                check(
                    am.dtype == torch.float32 and am.numel() == nb and am.device == device,
                    "absmax[{}] (state{} of params[{}]) must be float32 with {} entries on {}",
                    at,
                    j + 1,
                    i,
                    nb,
                    device,
                )
    if fmt in CODE_SIZE:
        for j in range(k):
            check_code(codes[j], f"codes[{j}]", CODE_SIZE[fmt])
            check(codes[j].device == device, "codes[{}] is on {} but params are on {}", j, codes[j].device, device)
    return k, fmt


def check_percentile_clip(
    grads: Sequence[Tensor], gnorm_vecs: Sequence[Tensor], steps: Sequence[Tensor], percentile: int, prescale: Tensor
) -> None:
    """Validate ``percentile_clip``'s arguments."""
    n = len(grads)
    check(len(gnorm_vecs) == n, "gnorm_vecs has {} tensors but grads has {}", len(gnorm_vecs), n)
    check(len(steps) == n, "steps has {} tensors but grads has {}", len(steps), n)
    check(1 <= percentile <= 99, "percentile must be in 1..99 (100 disables clipping), got {}", percentile)
    check(
        prescale.dtype == torch.float32 and prescale.numel() == 1,
        "prescale must be a float32 scalar tensor, got {} {}",
        prescale.dtype,
        tuple(prescale.shape),
    )
    device = prescale.device
    for i in range(n):
        g, h, s = grads[i], gnorm_vecs[i], steps[i]
        check(g.dtype in PARAM_DTYPES, "grads[{}] must be float32, bfloat16 or float16, got {}", i, g.dtype)
        check(g.layout == torch.strided, "grads[{}] is sparse; qop optimizers need dense gradients", i)
        check(g.is_contiguous(), "grads[{}] must be contiguous", i)
        check(g.device == device, "grads[{}] is on {} but prescale is on {}", i, g.device, device)
        check(
            h.dtype == torch.float32
            and h.dim() == 1
            and h.numel() == HISTORY
            and h.is_contiguous()
            and h.device == device,
            "gnorm_vecs[{}] must be a contiguous float32 vector of {} on {}, got {} {} on {}",
            i,
            HISTORY,
            device,
            h.dtype,
            tuple(h.shape),
            h.device,
        )
        check(
            s.dtype == torch.float32 and s.numel() == 1 and s.device == device,
            "steps[{}] must be a float32 scalar tensor on {}",
            i,
            device,
        )
