"""Teacher engines: vLLM (fast) and transformers (reference). See `fusion_cache.capture.engines.base` for the contract.

Nothing heavy is imported here: vLLM takes seconds to import and is optional, so `make_engine` imports the chosen
engine's module only when it is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from fusion_cache.capture.engines.base import SequenceRequest
from fusion_cache.capture.engines.base import TeacherEngine
from fusion_cache.capture.engines.base import TopKCapture
from fusion_cache.config import lookup

# name -> "module:class" of the engine; the module is imported only when that engine is made.
ENGINES: dict[str, str] = {
    "vllm": "fusion_cache.capture.engines.vllm:VLLMEngine",
    "hf": "fusion_cache.capture.engines.hf:HFEngine",
}
ENGINE_NAMES: tuple[str, ...] = tuple(ENGINES)

__all__ = ["ENGINES", "ENGINE_NAMES", "SequenceRequest", "TeacherEngine", "TopKCapture", "make_engine"]


def make_engine(name: str, model_path: str, **kwargs: Any) -> TeacherEngine:
    """Create the teacher engine ``name`` on ``model_path``.

    Args:
        name: a key of ``ENGINES``: "vllm" (`fusion_cache.capture.engines.vllm.VLLMEngine`) or "hf"
            (`fusion_cache.capture.engines.hf.HFEngine`).
        model_path: the teacher model (a local directory, or a hub id when online).
        **kwargs: keyword arguments of the engine's constructor (dtype, max_model_len, ...).

    Raises:
        ConfigError: unknown engine name.
        MissingDependencyError: "vllm" without vLLM installed.
    """
    module, cls = lookup(ENGINES, name, "engine").split(":")
    return getattr(importlib.import_module(module), cls)(model_path, **kwargs)
