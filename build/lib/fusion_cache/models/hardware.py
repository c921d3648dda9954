"""Pick the compute dtype from the hardware.

On a CPU without ``avx512_bf16`` bfloat16 is emulated and about 12x slower than fp32 (see the environment notes,
section 7), so the default dtype must come from the machine, never be hard-coded.
"""

from __future__ import annotations

import functools
import os

from fusion_cache.errors import ConfigError

DTYPE_ENV = "FUSION_CACHE_DTYPE"

# Accepted spellings -> canonical name. The canonical names are what engines report in ``TeacherEngine.dtype``.
_CANONICAL = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def canonical_dtype(name: str) -> str:
    """Normalize a dtype spelling ("fp32", "bf16", ...) to "float32", "bfloat16" or "float16".

    Raises:
        ConfigError: the name is not a supported dtype.
    """
    key = name.strip().lower()
    if key not in _CANONICAL:
        raise ConfigError(f"dtype: unsupported value {name!r}; valid values: {', '.join(sorted(_CANONICAL))}")
    return _CANONICAL[key]


@functools.lru_cache(maxsize=1)
def cpu_has_avx512_bf16() -> bool:
    """Whether the CPU has native bfloat16 arithmetic (the ``avx512_bf16`` flag in /proc/cpuinfo).

    Returns False where /proc/cpuinfo is unreadable (non-Linux), which makes fp32 the safe default there.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags") and "avx512_bf16" in line.split():
                    return True
    except OSError:
        return False
    return False


def default_dtype(device: str | None = None) -> str:
    """The dtype to run a teacher in on ``device``.

    Args:
        device: "cpu", "cuda" (or "cuda:N"); None means CUDA if torch sees a GPU, else CPU.

    Returns:
        "bfloat16" on CUDA or on a CPU with avx512_bf16, else "float32". The ``FUSION_CACHE_DTYPE`` environment
        variable overrides the choice (any spelling `torch_dtype` accepts).
    """
    override = os.environ.get(DTYPE_ENV)
    if override:
        return canonical_dtype(override)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_has_avx512_bf16() else "float32"


def torch_dtype(name: str):  # -> torch.dtype; torch is imported lazily so this module stays cheap to import
    """Map a dtype name ("float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16") to the torch dtype.

    Raises:
        ConfigError: the name is not a supported dtype.
    """
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[canonical_dtype(name)]
