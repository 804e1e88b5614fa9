"""The dynamic maps are built in code and must equal the published table exactly."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qop

TABLE = Path(__file__).parent / "data" / "dynamic_maps.tsv"


def _column(name: str) -> torch.Tensor:
    lines = TABLE.read_text().splitlines()
    col = lines[0].split("\t").index(name)
    return torch.tensor([float(line.split("\t")[col]) for line in lines[1:] if line], dtype=torch.float32)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_map_matches_table(signed: bool) -> None:
    built = qop.create_dynamic_map(signed=signed)
    expected = _column("signed" if signed else "unsigned")
    assert built.dtype == torch.float32 and built.shape == (256,)
    assert torch.equal(built, expected)


def test_dynamic_map_shape_of_books() -> None:
    signed, unsigned = qop.create_dynamic_map(True), qop.create_dynamic_map(False)
    assert torch.all(signed[1:] >= signed[:-1]) and torch.all(unsigned[1:] >= unsigned[:-1])
    assert signed[127] == 0 and signed[-1] == 1 and signed[0] < -0.99
    assert unsigned[0] == 0 and unsigned[-1] == 1
    assert torch.equal(qop.dynamic_map(True), signed)  # the cached copy is the same table


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_dynamic_maps_do_not_depend_on_the_cpu_build(capability: str) -> None:
    """The books are built in exact arithmetic, not with torch's CPU kernels (whose baseline build rounds
    ``linspace`` differently from its vectorized ones): every ATen capability gives the stored tables."""
    code = (
        "from qop._maps import create_dynamic_map as make\n"
        "maps = [make(True), make(False), make(True, 3, 4)]\n"
        "print(repr([m.tolist() for m in maps]))\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    signed, unsigned, four = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert signed == _column("signed").tolist() and unsigned == _column("unsigned").tolist()
    assert four == qop._maps.create_dynamic_map(True, 3, 4).tolist()
