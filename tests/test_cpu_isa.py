"""The builds of the C++ CPU kernels (``default``, ``avx2``, ``avx512``), each forced in a subprocess.

``qop.CPU_KERNEL_ISA`` is chosen once at import from ``torch.backends.cpu.get_cpu_capability()``, which
``ATEN_CPU_CAPABILITY`` lowers. For every build this machine can run:

* forcing it selects it, and a capability the machine lacks is never selected;
* ``tests/test_ops.py`` (the kernels against ``qop.reference``) passes under it;
* its outputs on a battery of inputs (``tests/isa_outputs.py``: every op, rule, flag set, dtype, odd
  sizes and partial blocks) are bit-identical to every other build's.

Builds the machine cannot run are skipped with the reason.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import isa_outputs
import pytest
import torch

import qop

pytestmark = pytest.mark.skipif(not qop.HAS_CPU_KERNELS, reason="qop C++ CPU kernels not built")

ROOT = Path(__file__).resolve().parents[1]
ISAS = ("default", "avx2", "avx512")
TIMEOUT_S = 1800


def run_python(args: list[str], capability: str | None) -> subprocess.CompletedProcess[str]:
    """Run ``python args`` from the repository root with ``ATEN_CPU_CAPABILITY`` set (or unset)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # tests/conftest.py gives each capability its own cache
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def selected(capability: str | None) -> str:
    """``qop.CPU_KERNEL_ISA`` of a fresh interpreter."""
    proc = run_python(["-c", "import qop; print(qop.CPU_KERNEL_ISA)"], capability)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@functools.cache
def best_isa() -> str:
    """The build chosen with no capability forced: the best this machine runs."""
    return selected(None)


def require(isa: str) -> None:
    """Skip unless this machine can run ``isa``."""
    best = best_isa()
    if ISAS.index(isa) > ISAS.index(best):
        pytest.skip(
            f"this CPU runs builds up to {best} (torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}); {isa} needs more"
        )


def test_best_isa_follows_torch_capability():
    capability = selected(None)
    torch_best = run_python(["-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"], None)
    best = torch_best.stdout.strip().lower()
    # qop's avx512 build also needs VBMI, so an AVX512 capability may give avx2, never more
    allowed = {"default": {"default"}, "avx2": {"avx2"}, "avx512": {"avx2", "avx512"}}.get(best, {"default"})
    assert capability in allowed


@pytest.mark.parametrize("isa", ISAS)
def test_forced_capability_selects_that_build(isa):
    require(isa)
    assert selected(isa) == isa


def test_capability_above_the_machine_is_not_selected():
    """Asking for more than the CPU has gives at most what it has (ATen ignores such requests)."""
    assert ISAS.index(selected("avx512")) <= ISAS.index(best_isa())


@pytest.mark.parametrize("isa", ISAS)
def test_op_tests_pass_under_build(isa):
    require(isa)
    code = (
        "import sys, pytest, qop\n"
        f"assert qop.CPU_KERNEL_ISA == {isa!r}, qop.CPU_KERNEL_ISA\n"
        "sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', 'tests/test_ops.py', 'tests/test_formats.py']))\n"
    )
    proc = run_python(["-c", code], isa)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (so NaNs and signed zeros compare exactly)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


@functools.cache
def outputs_of(isa: str, folder: str) -> dict[str, torch.Tensor]:
    """The battery's outputs under build ``isa`` (inputs built once, in this process)."""
    inputs = Path(folder) / "inputs.pt"
    if not inputs.exists():
        torch.save(isa_outputs.build_inputs(), inputs)
    path = Path(folder) / f"{isa}.pt"
    proc = run_python(["tests/isa_outputs.py", isa, str(inputs), str(path)], isa)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return torch.load(path)


@pytest.mark.parametrize("isa", ISAS[1:])
def test_builds_are_bit_identical(isa, tmp_path_factory):
    require(isa)
    folder = str(tmp_path_factory.getbasetemp())
    base, other = outputs_of("default", folder), outputs_of(isa, folder)
    assert base.keys() == other.keys()
    assert len(base) > 1000
    differ = [name for name in base if not torch.equal(bits_of(base[name]), bits_of(other[name]))]
    assert not differ, f"{len(differ)} outputs differ from the default build, e.g. {differ[:5]}"
