"""Fixtures for the Triton kernel tests: the kernels module, under Triton's CPU interpreter where there is no GPU.

Triton decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET=1 has to be in the
environment when kernels/uld.py is imported. The fixture sets it only while the kernel tests run (and reloads the
module if something imported it before without the interpreter); the rest of the suite never sees it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_uld(device):
    """The `kernels.uld` module, runnable on ``device`` (interpreted on CPU)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: pip install 'fusion-cache[kernels]'")
    mp = pytest.MonkeyPatch()
    if device == "cpu":
        mp.setenv("TRITON_INTERPRET", "1")
    module = sys.modules.get("kernels.uld")
    if module is None:
        module = importlib.import_module("kernels.uld")
    elif module.INTERPRETED != (device == "cpu"):
        module = importlib.reload(module)
    assert module.INTERPRETED == (device == "cpu"), os.environ.get("TRITON_INTERPRET")
    yield module
    mp.undo()
