"""LoRA students (peft, an optional extra: ``pip install 'fusion-cache[lora]'``): adapters on a pivot too large to
fine-tune whole (the 7-14B pivots TRL, torchtune and DistillKit users train this way).

    peft_model = add_lora(model, LoraSettings(r=16))  # model's linear layers get adapters in place
    merged = peft_model.merge_and_unload()              # W + alpha/r * B @ A, a plain model again

The trainer (`fusion_cache.train.trainer`) trains ``peft_model.get_base_model()``, the student's own class with the
adapters injected in place, so the loss code sees the same modules as for a full fine-tune. Checkpoints hold the
adapter weights only (`adapter_state`); the final model is saved merged (a plain checkpoint that merge, eval and
vLLM read) or as the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``), which
`load_adapter_model` and `merge_adapter_to_dir` turn back into a full model on the base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError

INSTALL_HINT = "LoRA students need peft: pip install 'fusion-cache[lora]' (or pip install peft)"
ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise MissingDependencyError(INSTALL_HINT) from e
    return peft


@dataclass(frozen=True)
class LoraSettings:
    """The adapters to add.

    Attributes:
        r: rank of each adapter (B is [out, r], A is [r, in]).
        alpha: scale numerator: the update is ``alpha / r * B @ A``.
        dropout: dropout on the adapter's input.
        targets: module names that get adapters, or ``["all-linear"]`` (every linear layer but the lm_head).
    """

    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)


def add_lora(model, settings: LoraSettings):
    """Wrap ``model`` in a peft model with LoRA adapters (the base weights frozen, B initialized to zero).

    Raises:
        MissingDependencyError: peft is not installed.
        ConfigError: a target module the model does not have.
    """
    peft = _peft()
    targets = ALL_LINEAR if list(settings.targets) == [ALL_LINEAR] else list(settings.targets)
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"lora_targets: {settings.targets}: {e}") from None


def adapter_state(peft_model) -> dict:
    """The adapter weights alone (what a checkpoint of a LoRA run stores), by peft's names."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model, state: dict) -> None:
    """Put `adapter_state`'s weights back; every adapter weight must be there."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ConfigError(f"checkpoint: adapter weight {missing[0]!r} is missing ({len(missing)} missing)")


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a saved adapter without the full model (``adapter_config.json``, no config.json)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter was trained on, as its ``adapter_config.json`` records it."""
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}/{ADAPTER_CONFIG}: no base_model_name_or_path")
    return base


def load_adapter_model(path: str | Path, base: str | None = None, dtype=None):
    """The full model of a saved adapter: its base (``base``, else the one it records) with the adapter merged in.

    Returns:
        (model, the base's path): the model is the base's class, in ``dtype`` (default fp32).
    """
    peft = _peft()
    import torch
    from transformers import AutoModelForCausalLM

    from fusion_cache.models.presets import resolve_model

    base_path = resolve_model(base or adapter_base(path), role="base").path
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype or torch.float32, trust_remote_code=False)
    return peft.PeftModel.from_pretrained(model, str(path)).merge_and_unload(), base_path


def merge_adapter_to_dir(path: str | Path, out: str | Path, base: str | None = None) -> Path:
    """Write the full model of the adapter in ``path`` (merged onto ``base``) to ``out``, in the base's dtype, with the
    base's tokenizer files: a plain checkpoint for tools that read weights only (`fusion_cache.merge`)."""
    from transformers import AutoConfig
    from transformers import AutoTokenizer

    from fusion_cache.models.hardware import torch_dtype
    from fusion_cache.models.presets import resolve_model

    base_path = resolve_model(base or adapter_base(path), role="base").path
    dtype = getattr(AutoConfig.from_pretrained(base_path), "dtype", None) or "float32"
    model, _ = load_adapter_model(path, base_path, torch_dtype(str(dtype).removeprefix("torch.")))
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    return out
