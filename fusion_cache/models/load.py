"""Load a student (pivot) model and its tokenizer from a preset name, a local directory or an HF id.

Never trusts remote code: a model whose architecture needs it is refused by transformers. A saved LoRA adapter
(``adapter_config.json`` without config.json, `fusion_cache.models.lora`) loads as its base with the adapter merged.
Errors name the model's role (student, teacher, base): a hub id that does not resolve is a ConfigError, not a
traceback from the hub client.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

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


def tokenizer_store(tokenizer_hash: str) -> Path:
    """Where this machine keeps the tokenizer of ``tokenizer_hash`` (`capture.render.tokenizer_hash`):
    ``$FUSION_CACHE_HOME/tokenizers/<hash>/``. A manifest names no local path, so training finds a local
    teacher's tokenizer here by the hash the manifest records (train/vocab.py `teacher_tokenizer`)."""
    home = Path(os.environ.get("FUSION_CACHE_HOME", "~/.cache/fusion-cache")).expanduser()
    return home / "tokenizers" / tokenizer_hash


def store_tokenizer(tokenizer, tokenizer_hash: str) -> Path:
    """Save ``tokenizer`` to `tokenizer_store` once (a temp directory renamed into place: never half written)."""
    final = tokenizer_store(tokenizer_hash)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, final)
    except OSError:  # another build stored it first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_stored_tokenizer(tokenizer_hash: str):
    """The tokenizer `store_tokenizer` kept for ``tokenizer_hash``, or None when this machine has none."""
    from transformers import AutoTokenizer

    path = tokenizer_store(tokenizer_hash)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False) if path.is_dir() else None


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
