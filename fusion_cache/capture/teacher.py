"""The teacher as a build runs it: resolved weights, tokenizer, engine, dtype, and the limits these set.

`resolve_teacher` gathers, before any input row is read, what `capture/build.py` needs to render rows for the
teacher and to cut them at the longest sequence its engine can score; `start_engine` starts the engine when the
build was not handed one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.engines.base import TeacherEngine
from fusion_cache.capture.render import has_chat_template
from fusion_cache.models.presets import ResolvedModel
from fusion_cache.models.presets import resolve_model


@dataclass(frozen=True)
class TeacherSetup:
    """The teacher as this build runs it.

    Attributes:
        model: the resolved weights (``path`` for the engine, ``revision`` identifying them).
        tokenizer: the teacher's ``transformers`` tokenizer.
        chat_template: rows are rendered with the tokenizer's chat template (else as plain text).
        engine: the engine's name: the given engine's, else ``--engine``.
        dtype: the engine's dtype: the given engine's, else ``--dtype`` or the hardware's default.
        length_limit: the longest sequence the engine can score (None: no known limit).
    """

    model: ResolvedModel
    tokenizer: Any
    chat_template: bool
    engine: str
    dtype: str
    length_limit: int | None


def resolve_teacher(cfg: BuildConfig, engine: TeacherEngine | None) -> TeacherSetup:
    """Resolve ``--teacher`` and load its tokenizer; the engine's name and dtype are the given engine's, if any."""
    from fusion_cache.models.hardware import default_dtype
    from fusion_cache.models.load import named_load_errors

    model = resolve_model(cfg.teacher)
    with named_load_errors("teacher", cfg.teacher):
        tokenizer = _tokenizer(model.path, model.load_revision)
    engine_name = engine.name if engine is not None else cfg.engine
    limit = engine_length_limit(model.path, engine_name, engine, model.load_revision)
    if cfg.max_model_len is not None and engine is None and engine_name == "vllm":
        # vLLM keeps one position for the token it generates after the prompt
        limit = cfg.max_model_len - 1 if limit is None else min(limit, cfg.max_model_len - 1)
    return TeacherSetup(
        model=model,
        tokenizer=tokenizer,
        chat_template=has_chat_template(tokenizer),
        engine=engine_name,
        dtype=engine.dtype if engine is not None else (cfg.dtype or default_dtype()),
        length_limit=limit,
    )


def start_engine(cfg: BuildConfig, teacher: TeacherSetup, max_len: int) -> TeacherEngine:
    """Start the ``--engine`` for the teacher; vLLM sized for rows of up to ``max_len`` tokens (or ``--max-model-len``)
    and top-K, with the build's vLLM options."""
    from fusion_cache.capture.engines import make_engine

    return make_engine(
        cfg.engine,
        teacher.model.path,
        dtype=teacher.dtype,
        revision=teacher.model.load_revision,  # the revision the tokenizer was loaded at and the manifest records
        **engine_options(cfg, max_len),
    )


def engine_options(cfg: BuildConfig, max_len: int) -> dict[str, Any]:
    """The engine's constructor arguments besides the model and dtype: for vLLM its context (``--max-model-len``,
    else ``max_len + 1``), the largest K, and the build's vLLM options; nothing for the others."""
    from fusion_cache.capture.engines import VLLM

    if cfg.engine != VLLM:
        return {}
    return {
        "max_model_len": cfg.max_model_len or max_len + 1,
        "max_k": cfg.top_k,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "engine_args": dict(cfg.engine_args),
    }


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, revision: str | None):
    """The teacher's tokenizer at ``revision`` (a hub commit; None for a local directory), loaded once per process
    and revision.

    Loading takes ~0.9 s for SmolLM2 (most of a small build's fixed cost), paid again by every `run_build` in one
    process (the demo, the tests, a benchmark) without this. Builds only read it (render, hash).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False, revision=revision)


def engine_length_limit(
    model_path: str, engine_name: str, engine: TeacherEngine | None, revision: str | None = None
) -> int | None:
    """Longest sequence the engine can score for this teacher (None: no known limit).

    The teacher's ``max_position_embeddings`` (its text config's, for multimodal configs); vLLM needs one position
    more than the prompt (it must generate a token after it, and refuses ``max_model_len`` above the model's
    positions), so a vLLM row holds at most ``max_position_embeddings - 1`` tokens. An already started engine
    adds its own ``max_model_len`` the same way.
    """
    limit = None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=False, revision=revision)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        positions = getattr(text, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 1:
            limit = positions - 1 if engine_name == "vllm" else positions
    except (OSError, ValueError):
        pass  # a GGUF-only dir or an unusual config: the engine reports an over-long row itself
    engine_len = getattr(engine, "max_model_len", None)
    if isinstance(engine_len, int) and engine_name == "vllm":
        limit = engine_len - 1 if limit is None else min(limit, engine_len - 1)
    return limit


def vocab_size(model_path: str, tokenizer, revision: str | None = None) -> int:
    """Largest id the teacher can emit + 1: the model's output size (often padded past the tokenizer's)."""
    n = len(tokenizer)
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=False, revision=revision)
        n = max(n, int(getattr(cfg, "vocab_size", 0) or 0))
    except (OSError, ValueError):
        pass  # a GGUF-only dir or an unusual config: the tokenizer's size is the bound
    return n
