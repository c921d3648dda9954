"""Teacher engines: vLLM (fast) and transformers (reference). See `fusion_cache.capture.engines.base` for the contract.

Nothing heavy is imported here: vLLM takes seconds to import and is optional, so `make_engine` imports the chosen
engine's module only when it is asked for.
"""

from __future__ import annotations

from typing import Any

from fusion_cache.capture.engines.base import SequenceRequest
from fusion_cache.capture.engines.base import TeacherEngine
from fusion_cache.capture.engines.base import TopKCapture
from fusion_cache.errors import ConfigError

ENGINE_NAMES = ("vllm", "hf")

__all__ = ["ENGINE_NAMES", "SequenceRequest", "TeacherEngine", "TopKCapture", "make_engine"]


def make_engine(name: str, model_path: str, **kwargs: Any) -> TeacherEngine:
    """Create the teacher engine ``name`` on ``model_path``.

    Args:
        name: "vllm" (`fusion_cache.capture.engines.vllm.VLLMEngine`) or "hf"
            (`fusion_cache.capture.engines.hf.HFEngine`).
        model_path: the teacher model (a local directory, or a hub id when online).
        **kwargs: keyword arguments of the engine's constructor (dtype, max_model_len, ...).

    Raises:
        ConfigError: unknown engine name.
        MissingDependencyError: "vllm" without vLLM installed.
    """
    if name == "vllm":
        from fusion_cache.capture.engines.vllm import VLLMEngine

        return VLLMEngine(model_path, **kwargs)
    if name == "hf":
        from fusion_cache.capture.engines.hf import HFEngine

        return HFEngine(model_path, **kwargs)
    raise ConfigError(f"engine: unknown value {name!r}; valid values: {', '.join(ENGINE_NAMES)}")
