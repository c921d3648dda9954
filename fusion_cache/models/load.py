"""Load a student (pivot) model and its tokenizer from a preset name, a local directory or an HF id.

Never trusts remote code: a model whose architecture needs it is refused by transformers. A saved LoRA adapter
(``adapter_config.json`` without config.json, `fusion_cache.models.lora`) loads as its base with the adapter merged.
Errors name the model's role (student, teacher, base): a hub id that does not resolve is a ConfigError, not a
traceback from the hub client.
"""

from __future__ import annotations

from contextlib import contextmanager

from fusion_cache.errors import ConfigError


@contextmanager
def named_load_errors(role: str, name: str):
    """Turn transformers' and the hub's "cannot load this" errors into one ConfigError naming ``role`` and ``name``."""
    try:
        yield
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(
            f"{role} {name!r}: cannot load it ({first}); pass a preset (`fusion-cache teachers`), a local model "
            "directory or an HF id (org/name; private or gated ones need `hf auth login`)"
        ) from e


def load_tokenizer(name_or_path: str, *, role: str = "student"):
    """The tokenizer of a preset, local directory or HF id (a saved adapter: its base's)."""
    from transformers import AutoTokenizer

    from fusion_cache.models.lora import adapter_base
    from fusion_cache.models.lora import is_adapter_dir
    from fusion_cache.models.presets import resolve_model

    if is_adapter_dir(name_or_path):
        name_or_path = adapter_base(name_or_path)
    path = resolve_model(name_or_path, role=role).path
    with named_load_errors(role, name_or_path):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_student(name_or_path: str, dtype: str | None = None, *, role: str = "student"):
    """(model, tokenizer, resolved path) for a preset, local directory, HF id or saved adapter (fp32 unless
    ``dtype`` says)."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from fusion_cache.models.hardware import torch_dtype
    from fusion_cache.models.lora import is_adapter_dir
    from fusion_cache.models.lora import load_adapter_model
    from fusion_cache.models.presets import resolve_model

    if is_adapter_dir(name_or_path):
        model, base = load_adapter_model(name_or_path, dtype=torch_dtype(dtype or "float32"))
        return model, load_tokenizer(base, role="base"), str(name_or_path)
    resolved = resolve_model(name_or_path, role=role)
    with named_load_errors(role, name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path, dtype=torch_dtype(dtype or "float32"), trust_remote_code=False
        )
    return model, tokenizer, resolved.path
