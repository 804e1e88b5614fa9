"""Fixtures shared by the test files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
import torch

# Inductor's on-disk cache does not key its CPU kernels on ATEN_CPU_CAPABILITY: a graph compiled under one
# forced capability, served to a run under another, computes garbage or corrupts the heap.  A run with a
# forced capability therefore gets a cache of its own (seen with torch 2.13).
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_qop_{os.environ['ATEN_CPU_CAPABILITY'].lower()}"
    )


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of small tensors: more threads only add overhead (badly so on a shared
    2-core machine), and one thread makes every result reproducible.  Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
