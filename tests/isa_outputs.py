"""Every output of the CPU kernels on a fixed battery of inputs, for comparing the builds of the kernels.

``tests/test_cpu_isa.py`` saves the inputs (``build_inputs``) once, then runs
``python tests/isa_outputs.py ISA INPUTS OUT`` once per build: it checks that ``qop.CPU_KERNEL_ISA`` is
``ISA`` (``ATEN_CPU_CAPABILITY`` chooses it) and saves ``{name: tensor}`` to ``OUT``; the test asserts
that the files agree bit for bit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import LOWBIT_FORMATS, SR_CASES, lowbit_cases
from test_formats import Inputs, grads_for
from test_ops import (
    DTYPES,
    QUANTIZER_INPUTS,
    SHAPES,
    STEP_CASES,
    make_clip_inputs,
    make_grads,
    make_inputs,
    step_op,
)

import qop

# odd sizes, tails and partial blocks, plus tensors long enough to be split among threads
STEP_SHAPES = [*SHAPES, (3 * 4096 + 77,), (70001,)]
STEPS = 3


def build_inputs() -> dict[str, list[Any]]:
    """The battery, built once in the parent process: torch's own kernels (randn, linspace) also
    follow ``ATEN_CPU_CAPABILITY`` and need not give identical inputs under every capability."""
    quantize = [
        (f"{name}/{dtype}/{blocksize}", x.to(dtype), code, blocksize)
        for name, x, code in QUANTIZER_INPUTS
        for dtype in DTYPES
        for blocksize in (256, 64, 100, 4096)
    ]
    steps = []
    runs = [(case, dtype) for case in STEP_CASES for dtype in DTYPES]
    runs += [(case, torch.bfloat16) for case in SR_CASES]  # stochastic rounding: bfloat16 params only
    for case, dtype in runs:
        for bits in (32, 16, 8):
            inp = make_inputs(case, dtype, bits, shapes=STEP_SHAPES, gscale=True)
            grads = [make_grads(inp.params, step) for step in range(STEPS)]
            steps.append((f"{case}/{dtype}/{bits}", bits, inp, grads))
    for name, fmt in LOWBIT_FORMATS.items():  # 4-bit and fp8 states
        for case in lowbit_cases(fmt):
            for dtype in DTYPES:
                low = Inputs(case, fmt, dtype, shapes=STEP_SHAPES)
                steps.append((f"{case}/{dtype}/{name}", 8, low, [grads_for(low.params, step) for step in range(STEPS)]))
    clip = [(f"{dtype}", make_clip_inputs(dtype, seed=5)) for dtype in DTYPES]
    return {"quantize": quantize, "steps": steps, "clip": clip}


def run(inputs: dict[str, list[Any]]) -> Iterator[tuple[str, Tensor]]:
    """Every op on the battery; yields each output (every tensor a step writes) by name."""
    for name, x, code, blocksize in inputs["quantize"]:
        q, absmax = torch.ops.qop.quantize_blockwise(x, code, blocksize)
        yield f"quantize/{name}/codes", q
        yield f"quantize/{name}/absmax", absmax
        for out in DTYPES:
            yield f"dequantize/{name}/{out}", torch.ops.qop.dequantize_blockwise(q, absmax, code, blocksize, out)
    for name, bits, inp, grads in inputs["steps"]:
        for g in grads:
            step_op(bits)(*inp.args(g))
        for i, t in enumerate(inp.tensors()):
            yield f"step/{name}/{i}", t
    for name, c in inputs["clip"]:
        yield f"clip/{name}/factors", torch.ops.qop.percentile_clip(c.grads, c.histories, c.steps, 50, c.prescale)
        for i, h in enumerate(c.histories):
            yield f"clip/{name}/history{i}", h


def outputs(inputs: dict[str, list[Any]]) -> dict[str, Tensor]:
    """All outputs, by name."""
    found: dict[str, Tensor] = {}
    for name, t in run(inputs):
        assert name not in found, name
        found[name] = t.detach().clone()
    return found


def main(argv: list[str]) -> int:
    """``ISA INPUTS OUT``: check the build in use, run the battery saved in INPUTS, save to OUT."""
    isa, inputs, out = argv
    if qop.CPU_KERNEL_ISA != isa:
        print(f"asked for the {isa} build, got {qop.CPU_KERNEL_ISA}", file=sys.stderr)
        return 3
    torch.save(outputs(torch.load(inputs, weights_only=False)), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
