"""Dtype selection from the hardware, checked against the real /proc/cpuinfo of the machine running the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusion_cache.errors import ConfigError
from fusion_cache.models.hardware import DTYPE_ENV
from fusion_cache.models.hardware import cpu_has_avx512_bf16
from fusion_cache.models.hardware import default_dtype
from fusion_cache.models.hardware import torch_dtype


def _cpuinfo_flags() -> set[str]:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return set()
    return {flag for line in path.read_text().splitlines() if line.startswith("flags") for flag in line.split()}


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DTYPE_ENV, raising=False)


def test_cpu_flag_matches_cpuinfo() -> None:
    assert cpu_has_avx512_bf16() == ("avx512_bf16" in _cpuinfo_flags())


def test_default_dtype_follows_the_hardware() -> None:
    # fp32 on a CPU without native bf16 (emulated bf16 is ~12x slower there), bf16 on CUDA.
    assert default_dtype("cpu") == ("bfloat16" if "avx512_bf16" in _cpuinfo_flags() else "float32")
    assert default_dtype("cuda") == "bfloat16" and default_dtype("cuda:1") == "bfloat16"
    assert default_dtype() == default_dtype("cuda" if torch.cuda.is_available() else "cpu")


def test_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DTYPE_ENV, "bf16")
    assert default_dtype("cpu") == "bfloat16"
    monkeypatch.setenv(DTYPE_ENV, "FP32")
    assert default_dtype("cuda") == "float32"
    monkeypatch.setenv(DTYPE_ENV, "int8")
    with pytest.raises(ConfigError, match="'int8'"):
        default_dtype()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
    ],
)
def test_torch_dtype(name: str, expected: torch.dtype) -> None:
    assert torch_dtype(name) is expected


def test_torch_dtype_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="'float64'"):
        torch_dtype("float64")
