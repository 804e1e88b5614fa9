"""Argument checks shared by the fake kernels, the reference and the Triton launchers.

Every failure names the offending argument, so bad input never turns into a silent wrong answer.
The C++ kernels repeat the same contract in ``csrc/cpu/checks.h``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._schema import BLOCKSIZE, HP_SIZE, Flag, Rule

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fail(msg: str) -> None:
    raise ValueError(f"qop: {msg}")


def check(cond: bool, msg: str) -> None:
    """Raise ValueError naming the argument unless ``cond``; uses torch._check under tracing."""
    torch._check(bool(cond), lambda: f"qop: {msg}")


def check_code(code: Tensor, name: str = "code") -> None:
    check(code.dtype == torch.float32, f"{name} must be float32, got {code.dtype}")
    check(code.dim() == 1 and code.numel() == 256, f"{name} must have 256 entries, got {tuple(code.shape)}")


def check_quantize(A: Tensor, code: Tensor, blocksize: int) -> None:
    check(A.dtype in PARAM_DTYPES, f"A must be float32, bfloat16 or float16, got {A.dtype}")
    check(A.layout == torch.strided, "A must be a dense tensor")
    check(A.is_contiguous(), "A must be contiguous")
    check_code(code)
    check(code.device == A.device, f"code is on {code.device} but A is on {A.device}")
    check(blocksize > 0, f"blocksize must be positive, got {blocksize}")


def check_dequantize(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype) -> None:
    check(A.dtype == torch.uint8, f"A must be uint8 codes, got {A.dtype}")
    check(A.is_contiguous(), "A must be contiguous")
    check(blocksize > 0, f"blocksize must be positive, got {blocksize}")
    check(absmax.dtype == torch.float32, f"absmax must be float32, got {absmax.dtype}")
    nblocks = -(-A.numel() // blocksize)
    check(absmax.numel() == nblocks, f"absmax must have {nblocks} entries for {A.numel()} codes, got {absmax.numel()}")
    check_code(code)
    check(dtype in PARAM_DTYPES, f"dtype must be float32, bfloat16 or float16, got {dtype}")
    for name, t in (("absmax", absmax), ("code", code)):
        check(t.device == A.device, f"{name} is on {t.device} but A is on {A.device}")


def n_states(rule: int, flags: int, momentum_state: bool) -> int:
    """How many state tensors each parameter has for this rule."""
    if rule == Rule.ADAM:
        return 3 if flags & Flag.AMSGRAD else 2
    if rule == Rule.ADEMAMIX:
        return 3
    if rule == Rule.MOMENTUM:
        return 1 if momentum_state else 0
    return 1


def check_step(
    rule: int,
    flags: int,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor],
    hp: Tensor,
    gscale: Tensor | None,
    found_inf: Tensor | None,
    state_dtype: torch.dtype,
    absmax: Sequence[Sequence[Tensor]] | None = None,
    codes: Sequence[Tensor] | None = None,
) -> None:
    """Validate a step op's arguments (both 32-bit and 8-bit forms)."""
    check(rule in {int(r) for r in Rule}, f"rule must be one of {[int(r) for r in Rule]}, got {rule}")
    check(0 <= flags < 32, f"flags must be a combination of qop.Flag, got {flags}")
    n = len(params)
    check(len(grads) == n, f"grads has {len(grads)} tensors but params has {n}")
    check(len(steps) == n, f"steps has {len(steps)} tensors but params has {n}")
    k = n_states(rule, flags, len(states[0]) > 0)
    for j, lst in enumerate(states):
        want = n if j < k else 0
        check(len(lst) == want, f"state{j + 1} has {len(lst)} tensors, rule {rule} needs {want}")
    check(hp.dtype == torch.float32 and hp.dim() == 1 and hp.numel() >= HP_SIZE,
          f"hp must be a float32 vector of {HP_SIZE} hyper-parameters, got {hp.dtype} {tuple(hp.shape)}")
    if gscale is not None:
        check(gscale.dtype == torch.float32 and gscale.numel() == n,
              f"gscale must be float32 with one entry per tensor ({n}), got {gscale.dtype} {tuple(gscale.shape)}")
    if found_inf is not None:
        check(found_inf.numel() == 1 and found_inf.is_floating_point(),
              f"found_inf must be a floating-point scalar tensor, got {found_inf.dtype} {tuple(found_inf.shape)}")
    if n == 0:
        return
    device, dtype = params[0].device, params[0].dtype
    for name, t in (("hp", hp), ("gscale", gscale), ("found_inf", found_inf)):
        if t is not None:
            check(t.device == device, f"{name} is on {t.device} but params are on {device}")
    for i in range(n):
        p, g = params[i], grads[i]
        check(p.dtype in PARAM_DTYPES, f"params[{i}] must be float32, bfloat16 or float16, got {p.dtype}")
        check(p.dtype == dtype, f"params[{i}] is {p.dtype} but params[0] is {dtype}: one call takes one dtype")
        check(p.device == device, f"params[{i}] is on {p.device} but params[0] is on {device}")
        check(p.is_contiguous(), f"params[{i}] must be contiguous")
        check(g.layout == torch.strided, f"grads[{i}] is sparse; qop optimizers need dense gradients")
        check(g.device == device, f"grads[{i}] is on {g.device} but params[{i}] is on {device}")
        check(g.dtype == dtype, f"grads[{i}] is {g.dtype} but params[{i}] is {dtype}")
        check(g.shape == p.shape, f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has {tuple(p.shape)}")
        check(g.is_contiguous(), f"grads[{i}] must be contiguous")
        s = steps[i]
        check(s.dtype == torch.float32 and s.numel() == 1 and s.device == device,
              f"steps[{i}] must be a float32 scalar tensor on {device}")
        numel = p.numel()
        for j in range(k):
            st = states[j][i]
            nm = f"state{j + 1}[{i}]"
            check(st.dtype == state_dtype, f"{nm} must be {state_dtype}, got {st.dtype}")
            check(st.numel() == numel, f"{nm} has {st.numel()} elements but params[{i}] has {numel}")
            check(st.device == device, f"{nm} is on {st.device} but params[{i}] is on {device}")
            check(st.is_contiguous(), f"{nm} must be contiguous")
            if absmax is not None:
                am = absmax[j][i]
                nb = -(-numel // BLOCKSIZE)
                check(am.dtype == torch.float32 and am.numel() == nb and am.device == device,
                      f"absmax{j + 1}[{i}] must be float32 with {nb} entries on {device}")
    if codes is not None:
        for j in range(k):
            check_code(codes[j], f"code{j + 1}")
            check(codes[j].device == device, f"code{j + 1} is on {codes[j].device} but params are on {device}")
