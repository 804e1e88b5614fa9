"""Triton kernels of every ``qop`` op on CUDA, registered on import (``qop._register`` imports this
package only when CUDA is available).

Kernels: ``_quant.py`` (blockwise quantize / dequantize), ``_kernel.py`` (the fused step: every rule, every
state format, the two passes of Flag.UNORM_CLIP), ``_step.py`` (its launchers), ``_rules.py`` (its rule math),
``_lowbit.py`` (its 4-bit and fp8 tiles), ``_clip.py`` (percentile clipping of a list of gradients),
``_multi_tensor.py`` (device metadata of multi-tensor launches), ``_common.py`` (code-book search, exact float
helpers, launch).

Design
======

One schema, two registrations
-----------------------------
The ops are defined once, in ``qop/_schema.py``.  ``torch.library.triton_op`` would define the op a
second time, so we do by hand what it does for an op it owns (torch/_library/triton.py):

* the eager kernel is registered for the ``CUDA`` dispatch key (``Library.impl``); it calls the
  Triton kernels directly, without the ``wrap_triton`` higher-order-op machinery;
* a ``torch_dispatch`` rule for ``FunctionalTensorMode`` is attached to the existing op with
  ``torch.library.register_torch_dispatch``.  AOTAutograd (torch.compile, opcheck's
  ``test_aot_dispatch_*``) runs under that mode, so the rule decomposes the op there into
  ``wrap_triton`` launches, which functionalization turns into ``triton_kernel_wrapper_functional``
  nodes: inductor sees the user-defined kernels themselves, schedules them with the rest of the
  graph, re-inplaces them and autotunes them with its own machinery.  As in ``triton_op``, export
  keeps the op whole (``custom_triton_ops_decomposition_disabled``), tensor subclasses get
  ``NotImplemented``, and non-CUDA tensors are left to the op (the rule is per op, not per device).
  The fake kernels stay in ``meta/``.  Both hooks exist in torch 2.11 and 2.13 (from 2.6 on); where
  they are missing the rule is not registered and the ops stay opaque under torch.compile.

Multi-tensor launches and torch.compile
---------------------------------------
Eager calls update a whole list of tensors (mixed sizes) in ONE launch (two with UNORM_CLIP), apex
``multi_tensor_apply`` style: a device table of addresses and sizes, and a chunk -> (tensor, offset)
map with chunks a multiple of the 256-element block, so no 8-bit block straddles two programs or two
tensors (``_multi_tensor.py``).  Inside a traced body that table cannot be built (fake tensors have
no ``data_ptr()``), and it must not be: a kernel that writes through addresses read from memory
hides its writes from inductor's mutation analysis (``analyze_kernel_access`` in
torch/_higher_order_ops/triton_kernel_wrap.py follows stores back to *arguments* and stops at
loads), so functionalization would see no mutation and drop or reorder the update.  A
separate opaque "metadata op" therefore does not help either.  So the decomposition launches the
same kernel once per tensor (``MULTI=False``) with every tensor it writes passed as an argument;
one kernel source, selected by a constexpr.  Under ``mode="reduce-overhead"`` (CUDA graphs) the
per-tensor launches cost nothing extra.  Set ``QOP_TRITON_DECOMPOSE=0`` (or
``qop.triton.DECOMPOSE = False`` before compiling) to keep the op opaque under torch.compile
instead: inductor then calls the eager kernel (one launch per param group) through
``auto_functionalized``, which it re-inplaces.

CUDA graphs
-----------
Eager launches never synchronise.  Their metadata is cached per (device, chunk, addresses, sizes),
so the steps of a training loop, and a graph captured after a warm-up step, reuse the same device
buffers; per-tensor chunk counters and norm sums live there too and are reset by the kernel itself
(the last program of a tensor, found with an atomic counter, advances ``steps`` and clears them), so
a replay needs no memset.  Hyper-parameters, steps, ``gscale`` and ``found_inf`` are read from device
memory.  A description missed during capture is copied from pinned memory that it keeps alive and is
reserved to that graph.  Autotuning cannot be captured: during capture the config chosen by an
earlier eager call (or the first config) is used.  Gradients that move between steps (set_to_none)
just miss the cache and rebuild a small table; graphs need static gradients anyway.

Autotuning
----------
``triton.autotune`` configs (tile size ``BLOCK``, ``num_warps``) keyed on the problem size class
(bit length of the element count of the launch) and the constexprs.  The per-tensor variant lists
what it writes in ``restore_value`` (inductor's supported subset).  The multi-tensor variant writes
through the table, where ``restore_value`` cannot reach, so its timing runs are *dry runs*: a flag in
device memory, set by the autotuner's pre-hook, makes the kernel store back the values it loaded
(same traffic, nothing changed).  Under ``TRITON_INTERPRET=1`` nothing is timed: the first config is
launched.

Numerics
--------
Float32 math in the reference's order; division and sqrt are IEEE round-to-nearest (``div_rn``,
``sqrt_rn``: Triton's ``/`` and ``sqrt`` are approximate), powers and logs are evaluated in float64
and rounded once, bfloat16 outputs are rounded to nearest-even on the bits.  Nearest code: a
branchless 8-step binary search over the 255 midpoints of the sorted code book, loaded once per
program (``tl.gather``; ``QOP_TRITON_GATHER=0`` uses L1-cached global loads instead), counting the
midpoints strictly below x (ties go to the lower code), exactly as the reference's searchsorted.
"""

from __future__ import annotations

import functools
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from . import _clip, _quant, _step
from ._multi_tensor import clear_cache

#: Decompose the ops into their Triton kernels under torch.compile (else keep them opaque).
DECOMPOSE = os.environ.get("QOP_TRITON_DECOMPOSE", "1") != "0"

__all__ = ["DECOMPOSE", "clear_cache"]


def _export_keeps_custom_ops() -> bool:
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # pragma: no cover - older torch: export decomposes like compile
        return False
    return custom_triton_ops_decomposition_disabled()


# Each op: its eager kernel (one launch per call where it can), its traced kernel (what the FunctionalTensorMode
# rule runs: one launch per tensor, every written tensor an argument) and the argument whose device decides.
_OPS = {
    "quantize_blockwise": (_quant.quantize_blockwise, functools.partial(_quant.quantize_blockwise, traced=True), "A"),
    "dequantize_blockwise": (
        _quant.dequantize_blockwise,
        functools.partial(_quant.dequantize_blockwise, traced=True),
        "A",
    ),
    "step": (_step.step, functools.partial(_step.step, multi=False), "hp"),
    "percentile_clip": (_clip.percentile_clip, functools.partial(_clip.percentile_clip, multi=False), "prescale"),
}


def _functional_decomposition(op_name: str, traced, device_arg: str):
    """The FunctionalTensorMode rule of one op: what triton_op registers for the ops it defines."""
    schema = getattr(torch.ops.qop, op_name).default._schema
    device_index = [a.name for a in schema.arguments].index(device_arg)

    def rule(mode, op, types, args, kwargs):
        anchor = kwargs[device_arg] if device_arg in kwargs else args[device_index]
        if not DECOMPOSE or anchor.device.type != "cuda" or _export_keeps_custom_ops():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        if any(t not in (torch.Tensor, FunctionalTensor) and not issubclass(t, FakeTensor) for t in types):
            return NotImplemented
        with mode:
            return traced(*args, **kwargs)

    return rule


def _register() -> torch.library.Library:
    lib = torch.library.Library("qop", "IMPL")
    # Both hooks exist in torch >= 2.6; without them the ops simply stay opaque under torch.compile.
    decompose = hasattr(torch.library, "register_torch_dispatch") and hasattr(torch.library, "wrap_triton")
    for name, (eager, traced, device_arg) in _OPS.items():
        lib.impl(name, eager, "CUDA")
        if decompose:
            rule = _functional_decomposition(name, traced, device_arg)
            torch.library.register_torch_dispatch(f"qop::{name}", FunctionalTensorMode, rule, lib=lib)
    return lib


if torch.cuda.is_available():
    _lib = _register()
