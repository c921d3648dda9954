"""Offline tiny random teacher models for tests, demos and benchmarks.

`make_tiny_model` trains a byte-level BPE tokenizer on the local Python stdlib sources (no download) and saves a
randomly initialized causal LM next to it. Both transformers and vLLM load the result. The weights are random, so
the model is only good for checking plumbing and numerics, never for quality.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fusion_cache.errors import ConfigError

# Written last, after every other file: its presence means the directory is complete (see `make_tiny_model`).
_MARKER = "fusion-cache-tiny-model.json"
_ARCHS = ("qwen2", "llama")
_N_CORPUS_FILES = 300

# Qwen2 follows ChatML; the llama variant uses different special tokens and a different template on purpose, so
# a test can pair two teachers whose tokenizers disagree on both merges and specials.
_SPECIALS = {
    "qwen2": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>", "pad": "<|endoftext|>"},
    "llama": {"specials": ["<unk>", "<s>", "</s>"], "eos": "</s>", "pad": "<unk>", "bos": "<s>"},
}
_CHAT_TEMPLATES = {
    "qwen2": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


def _corpus() -> Iterator[str]:
    """Yield the text of the first stdlib modules (sorted, so the tokenizer is the same on every machine)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:_N_CORPUS_FILES]
    for path in files:
        with open(path, encoding="utf-8", errors="ignore") as fh:
            yield fh.read()


def _train_tokenizer(arch: str, vocab_size: int):
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries (specials included) and its chat template."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    spec = _SPECIALS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=spec["eos"], pad_token=spec["pad"], bos_token=spec.get("bos")
    )
    hf_tok.chat_template = _CHAT_TEMPLATES[arch]
    return hf_tok


def _build_model(arch: str, tokenizer, hidden_size: int, num_layers: int, seed: int):
    """A randomly initialized fp32 causal LM sized for ``tokenizer``; head_dim is 32 (vLLM's CPU attention has it)."""
    import torch
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM
    from transformers import Qwen2Config
    from transformers import Qwen2ForCausalLM

    heads = max(1, hidden_size // 32)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    # Llama unties the lm_head so the engines' separate lm_head path gets exercised too.
    if arch == "qwen2":
        config, cls = Qwen2Config(tie_word_embeddings=True, **common), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(tie_word_embeddings=False, **common), LlamaForCausalLM
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(torch.float32)


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = 4096,
    hidden_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    arch: str = "qwen2",
) -> Path:
    """Build (or reuse) a tiny random causal LM with a BPE tokenizer and a chat template in ``out_dir``.

    Takes about 5-10 s on 2 cores, most of it tokenizer training. A directory that already holds a complete model
    built with the same settings is returned as is. The files are written into a temporary sibling directory that
    is renamed into place, so a crash never leaves a half-written model behind.

    Args:
        out_dir: where the model goes; must be absent, empty, or a previous result of this function.
        vocab_size: BPE vocabulary size, special tokens included. Use a different size (e.g. 2048 with
            ``arch="llama"``) to get a second tokenizer of a different granularity.
        hidden_size: model width; a multiple of 32 (attention heads have head_dim 32).
        num_layers: number of decoder layers.
        seed: torch seed of the random weights.
        arch: "qwen2" (tied embeddings, ChatML specials) or "llama" (untied lm_head, ``<s>``/``</s>`` specials).

    Returns:
        The model directory.

    Raises:
        ConfigError: unknown ``arch``, bad sizes, or ``out_dir`` holds something else.
    """
    if arch not in _ARCHS:
        raise ConfigError(f"arch: unknown value {arch!r}; valid values: {', '.join(_ARCHS)}")
    if hidden_size < 32 or hidden_size % 32:
        raise ConfigError(f"hidden_size: must be a positive multiple of 32, got {hidden_size}")
    if vocab_size < 300:  # 256 byte symbols + specials + a few merges
        raise ConfigError(f"vocab_size: must be >= 300, got {vocab_size}")
    settings = {
        "arch": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "seed": seed,
    }
    out = Path(out_dir)
    if _is_complete(out, settings):
        return out
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out_dir: {out} is not empty and does not hold a tiny model built with {settings}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700; the model dir should be as readable as any other
    try:
        tokenizer = _train_tokenizer(arch, vocab_size)
        tokenizer.save_pretrained(tmp)
        model = _build_model(arch, tokenizer, hidden_size, num_layers, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / _MARKER).write_text(json.dumps(settings, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, out)  # atomic; succeeds over an empty directory as well
        except OSError:
            # Another process won the race and its model is in place: use it.
            if not _is_complete(out, settings):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_complete(out: Path, settings: dict) -> bool:
    """Whether ``out`` holds a finished model built with ``settings``."""
    try:
        return json.loads((out / _MARKER).read_text(encoding="utf-8")) == settings
    except (OSError, ValueError):
        return False


def capture_with(engine, flag: str, value: bool, requests: list, k: int) -> list:
    """``engine.capture(requests, k)`` with the engine's switch ``flag`` (e.g. ``fast_logprobs``,
    ``answer_only_logits``) set to ``value`` for that call only: tests compare a fast path with vLLM's own."""
    old = getattr(engine, flag)
    setattr(engine, flag, value)
    try:
        return engine.capture(requests, k)
    finally:
        setattr(engine, flag, old)
