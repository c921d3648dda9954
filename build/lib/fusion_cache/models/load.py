"""Load a student (pivot) model and its tokenizer from a preset name, a local directory or an HF id.

Never trusts remote code: a model whose architecture needs it is refused by transformers.
"""

from __future__ import annotations


def load_tokenizer(name_or_path: str):
    """The tokenizer of a preset, local directory or HF id."""
    from transformers import AutoTokenizer

    from fusion_cache.models.presets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path).path, trust_remote_code=False)


def load_student(name_or_path: str, dtype: str | None = None):
    """(model, tokenizer, resolved path) for a preset, local directory or HF id (fp32 unless ``dtype`` says)."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from fusion_cache.models.hardware import torch_dtype
    from fusion_cache.models.presets import resolve_model

    resolved = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        resolved.path, dtype=torch_dtype(dtype or "float32"), trust_remote_code=False
    )
    return model, tokenizer, resolved.path
