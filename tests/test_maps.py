"""The dynamic maps are built in code and must equal the published table exactly."""

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
