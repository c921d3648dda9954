"""Offline tiny random teacher models for tests, demos and benchmarks.

`make_tiny_model` trains a byte-level BPE tokenizer on the local Python stdlib sources (no download) and saves a
randomly initialized causal LM next to it. Both transformers and vLLM load the result. The weights are random, so
the model is only good for checking plumbing and numerics, never for quality.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.fingerprint import chain_fingerprint
from fusion_cache.cache.fingerprint import config_fingerprint
from fusion_cache.cache.manifest import json_settings
from fusion_cache.cache.schema import METADATA_KEY
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


# ------------------------------------------------------------------------------------------------ a hostile editor
# Caches are shared, so a cache is input from someone else, and the manifest's checksums and fingerprints are public
# formulas: anyone can change a shard and reseal the manifest. These helpers do what such an editor would, for the
# hostile-cache tests of every reader and every command (tests/fusion_cache/cache/test_validate.py,
# tests/cli/test_hostile.py).


def _config_fp(m: dict) -> str:
    return config_fingerprint(json_settings(m))


def _batches(path: Path) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """The shard's schema and record batches, read into memory (not mapped: the file is rewritten next)."""
    reader = pa.ipc.open_stream(pa.BufferReader(path.read_bytes()))
    return reader.schema, list(reader)


def rewrite(cache: Path, *, batch=None, manifest=None, counts: bool = True) -> dict:
    """Rewrite a cache as an attacker would: ``manifest(m)`` edits its JSON, ``batch(b, shard, i)`` returns each
    record batch changed (or None to drop it), then every shard is written again with the manifest's config
    fingerprint in its metadata, and sizes, checksums, per-shard counts and stats (``counts``; rows the shards lost
    become skipped ones, rows they gained more rows read) and both fingerprints are recomputed. Returns the JSON."""
    path = cache / "manifest.json"
    m = json.loads(path.read_text())
    if manifest is not None:
        manifest(m)
    codec = parse_codec(m["codec"], "test", m["schema_version"])
    shards = []
    rows = tokens = answer = 0
    for s, info in enumerate(m["shards"]):
        f = cache / info["path"]
        if not f.is_file() or f.is_symlink():
            continue
        schema, batches = _batches(f)
        out = [x for x in (batch(b, s, i) if batch is not None else b for i, b in enumerate(batches)) if x is not None]
        n_rows = sum(b.num_rows for b in out)
        n_tok = sum(len(b.column("input_ids").values) for b in out)
        n_ans = n_tok - sum(int(np.sum(b.column("answer_start").to_numpy())) for b in out)
        if counts:
            info.update(rows=n_rows, answer_tokens=n_ans)
        rows, tokens, answer = rows + n_rows, tokens + n_tok, answer + n_ans
        shards.append((f, schema, out))
    if counts:
        lost = m["stats"]["rows"] - rows
        if lost > 0:
            key = next(iter(m["stats"]["skipped"]), "empty_response")
            m["stats"]["skipped"][key] = m["stats"]["skipped"].get(key, 0) + lost
        else:
            m["dataset"]["rows_read"] -= lost
        m["stats"].update(rows=rows, tokens=tokens, answer_tokens=answer)
    m["config_fingerprint"] = _config_fp(m)
    for f, schema, out in shards:
        prov = json.loads(schema.metadata[METADATA_KEY])
        prov["config_fingerprint"] = m["config_fingerprint"]
        schema = schema.with_metadata({**schema.metadata, METADATA_KEY: json.dumps(prov).encode()})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema, options=codec.ipc_options()) as w:
            for b in out:
                w.write_batch(pa.RecordBatch.from_arrays(b.columns, schema=schema))
        f.write_bytes(sink.getvalue().to_pybytes())
    for info in m["shards"]:
        f = cache / info["path"]
        if f.is_file():
            info.update(bytes=f.stat().st_size, sha256=hashlib.sha256(f.read_bytes()).hexdigest())
    m["stats"]["payload_bytes"] = sum(i["bytes"] for i in m["shards"])
    m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])
    path.write_text(json.dumps(m, indent=2, sort_keys=True))
    return m


def column(b: pa.RecordBatch, name: str, new: pa.Array) -> pa.RecordBatch:
    cols = [new if n == name else b.column(n) for n in b.schema.names]
    return pa.RecordBatch.from_arrays(cols, schema=b.schema)


def set_value(b: pa.RecordBatch, name: str, index: int, value) -> pa.RecordBatch:
    """The list column ``name`` with its flat value ``index`` (of the batch) set to ``value``."""
    col = b.column(name)
    flat = np.asarray(col.values.to_numpy(zero_copy_only=False)).copy()
    flat[index] = value
    return column(b, name, pa.ListArray.from_arrays(col.offsets, pa.array(flat, col.type.value_type)))


def reseal_files(cache: Path) -> None:
    """Recompute every shard's size and sha256, the payload bytes and the fingerprint: a hostile byte edit sealed."""
    m = json.loads((cache / "manifest.json").read_text())
    for info in m["shards"]:
        f = cache / info["path"]
        info.update(bytes=f.stat().st_size, sha256=hashlib.sha256(f.read_bytes()).hexdigest())
    m["stats"]["payload_bytes"] = sum(i["bytes"] for i in m["shards"])
    m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])
    (cache / "manifest.json").write_text(json.dumps(m))


_EXTREMES = [0, -1, 1, 2**31 - 1, -(2**31), 2**15, 255, 10**6]
_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, 1.0, -1e30, 1e30, 65504.0]


def mutate_column(b: pa.RecordBatch, rng) -> pa.RecordBatch:
    """One random value of one random column replaced by an extreme (list lengths kept, so Arrow accepts it)."""
    name = b.schema.names[rng.integers(0, len(b.schema.names))]
    col = b.column(name)
    typ = col.type
    if pa.types.is_list(typ):
        values = col.values.to_numpy(zero_copy_only=False).copy()
        if not len(values):
            return b
        i = rng.integers(0, len(values))
        if pa.types.is_floating(typ.value_type):
            values[i] = rng.choice(_FLOATS)
        else:
            info = np.iinfo(values.dtype)
            values[i] = np.clip(rng.choice(_EXTREMES), info.min, info.max)
        return column(b, name, pa.ListArray.from_arrays(col.offsets, pa.array(values, typ.value_type)))
    if pa.types.is_string(typ):
        vals = col.to_pylist()
        i = rng.integers(0, len(vals))
        vals[i] = rng.choice(["", "x" * 40, vals[i][::-1], "\u00e9" * 16])
        return column(b, name, pa.array(vals, pa.string()))
    values = col.to_numpy(zero_copy_only=False).copy()
    info = np.iinfo(values.dtype)
    values[rng.integers(0, len(values))] = np.clip(rng.choice(_EXTREMES), info.min, info.max)
    return column(b, name, pa.array(values, typ))


def mutate_manifest(m: dict, rng) -> None:
    """One manifest field set to an implausible value (stats, counts, K, lengths, the teacher, the shard list)."""
    choice = rng.integers(0, 9)
    big = int(rng.choice([0, 1, 10**15, 2**31]))
    if choice == 0:
        m["stats"]["rows"] = big
    elif choice == 1:
        m["stats"]["tokens"] = big
    elif choice == 2:
        m["shards"][0]["rows"] = big
    elif choice == 3:
        m["k"] = int(rng.integers(1, 12))
    elif choice == 4:
        m["max_length"] = int(rng.integers(2, 9))
    elif choice == 5:
        m["teacher"]["vocab_size"] = int(rng.integers(1, 400))
    elif choice == 6:
        m["shards"].append(dict(m["shards"][-1]))
    elif choice == 7:
        m["dataset"]["rows_read"] = int(rng.integers(0, 10))
    else:
        m["stats"]["skipped"] = {"empty_response": -1}
