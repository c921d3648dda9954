"""Turn a GGUF checkpoint into a plain safetensors model directory, once per machine.

transformers can read GGUF files (it dequantizes them to fp32 on load) but refuses to ``save_pretrained`` such a
model, and vLLM wants a normal HF directory anyway. The recipe here rebuilds the same architecture from the config
without its ``quantization_config``, copies the dequantized weights in and saves model + tokenizer as safetensors.

Conversions are cached under ``<home>/models/<name>-<gguf hash>`` (``<home>`` is ``$FUSION_CACHE_HOME``, default
``~/.cache/fusion-cache``). A conversion is built in a private temp directory and renamed into place, so readers
never see a half-written model and a killed conversion leaves only a ``.tmp-*`` directory that nobody reads.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fusion_cache.cache.fingerprint import file_sha256
from fusion_cache.errors import FusionCacheError
from fusion_cache.errors import MissingDependencyError

logger = logging.getLogger(__name__)

HOME_ENV = "FUSION_CACHE_HOME"
DEFAULT_HOME = Path("~/.cache/fusion-cache")
# Written last into a converted directory: its presence is the only thing that makes a directory "complete".
COMPLETE_MARKER = ".fusion-cache-complete.json"
SHORT_HASH_LEN = 12
# Temp dirs this old are leftovers of killed conversions (a real one takes seconds to a few minutes).
STALE_TMP_SECONDS = 6 * 3600


class ConversionError(FusionCacheError):
    """A GGUF checkpoint could not be turned into a safetensors model (e.g. its weights do not match the config)."""


def fusion_cache_home() -> Path:
    """The directory fusion-cache keeps machine-local state in (converted models, ...).

    Returns:
        ``$FUSION_CACHE_HOME`` if set, else ``~/.cache/fusion-cache``, with ``~`` expanded; it may not exist yet.
    """
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def cached_file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, memoized per (path, size, mtime) so repeated resolves do not re-read 100 MB."""
    st = os.stat(path)
    return _file_sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime_ns are only part of the cache key: a rewritten file gets hashed again.
    return file_sha256(path)


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
    *,
    chat_template: bool = True,
    progress: bool = True,
) -> Path:
    """Convert a GGUF checkpoint into an HF model directory (config, safetensors weights, tokenizer).

    This is the plain conversion: it writes straight into ``out_dir``. Use `converted_model_dir` for the cached,
    atomic version.

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: Directory to write; created if missing, must not already hold files.
        dtype: dtype of the saved weights. The GGUF weights are dequantized to fp32 first; bf16 halves the size and
            engines can still upcast at load time.
        chat_template: keep the GGUF's chat template, if it has one. False for base models: the saved tokenizer
            then has none, so every stage renders the samples as plain text.
        progress: show a progress bar over the conversion's four steps (it runs once per machine, for up to
            minutes, inside whichever command first needs the model).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        MissingDependencyError: ``gguf`` or ``accelerate`` is not installed.
        ConversionError: ``out_dir`` is not empty, or the dequantized weights do not fit the rebuilt model.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"output directory {out_dir} is not empty")
    _require_gguf_support()
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    bar = tqdm(total=4, desc=f"convert {gguf_path.name}", unit="step", disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    bar.update(1)
    bar.set_postfix_str("dequantizing the weights")
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    bar.update(1)
    bar.set_postfix_str(f"rebuilding in {str(dtype).removeprefix('torch.')}")

    config = copy.deepcopy(quantized.config)
    # Without this the rebuilt model would again claim to be GGUF-quantized and refuse to save.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _copy_weights(quantized, model)
    model.tie_weights()
    if quantized.generation_config is not None:
        model.generation_config = copy.deepcopy(quantized.generation_config)
    del quantized
    bar.update(1)
    bar.set_postfix_str("saving")

    if not chat_template:
        tokenizer.chat_template = None
    _apply_gguf_bos_flag(tokenizer, gguf_path)
    # GGUF tokenizers come back with transformers' "unlimited" sentinel; the context length is the honest limit.
    if tokenizer.model_max_length > 10**9 and getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    bar.update(1)
    bar.close()
    return out_dir


def converted_model_dir(
    gguf_path: str | os.PathLike[str],
    name: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    home: str | os.PathLike[str] | None = None,
    display_name: str | None = None,
    chat_template: bool = True,
) -> Path:
    """The converted model directory for ``gguf_path``, converting it on first use.

    Args:
        gguf_path: The ``.gguf`` file.
        name: Short name for the directory, e.g. a preset name.
        dtype: dtype of the saved weights (see `convert_gguf_to_hf`); non-default dtypes get their own directory.
        home: Overrides `fusion_cache_home`.
        display_name: What the one-line "converting ..." log message calls the model; defaults to ``name``.
        chat_template: keep the GGUF's chat template (see `convert_gguf_to_hf`).

    Returns:
        ``<home>/models/<name>-<first 12 hex of the GGUF's sha256>[-<dtype>]``, complete.
    """
    digest = cached_file_sha256(gguf_path)[:SHORT_HASH_LEN]
    suffix = "" if dtype == torch.bfloat16 else "-" + str(dtype).removeprefix("torch.")
    final_dir = Path(home).expanduser() if home is not None else fusion_cache_home()
    final_dir = final_dir / "models" / f"{name}-{digest}{suffix}"

    def build(tmp_dir: Path) -> dict[str, object]:
        logger.info("converting %s GGUF to safetensors (once, ~30-60 s)", display_name or name)
        start = time.monotonic()
        convert_gguf_to_hf(gguf_path, tmp_dir, dtype=dtype, chat_template=chat_template)
        seconds = time.monotonic() - start
        logger.info("converted %s in %.1f s into %s", display_name or name, seconds, final_dir)
        return {
            "gguf": os.path.basename(gguf_path),
            "gguf_sha256": cached_file_sha256(gguf_path),
            "dtype": str(dtype),
            "chat_template": chat_template,
            "seconds": round(seconds, 1),
        }

    return publish_atomically(final_dir, build)


def is_complete(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir`` is a finished conversion (its completion marker exists)."""
    return (Path(model_dir) / COMPLETE_MARKER).is_file()


def publish_atomically(final_dir: Path, build: Callable[[Path], dict[str, object] | None]) -> Path:
    """Create ``final_dir`` with ``build`` unless a complete one exists; safe against crashes and races.

    ``build`` fills a fresh private temp directory next to ``final_dir``; the completion marker is written into it
    last and the directory is then renamed to ``final_dir`` in one step. Several processes may build at the same
    time: the first rename wins and the others discard their work and use the winner's.

    Args:
        final_dir: Where the result must end up.
        build: Fills the directory it is given; may return extra metadata for the marker file.

    Returns:
        ``final_dir``, complete.
    """
    if is_complete(final_dir):
        return final_dir
    parent = final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(parent, final_dir.name)
    tmp_dir = parent / f"{final_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp_dir.mkdir()
    try:
        meta = build(tmp_dir) or {}
        marker = {"created_unix": int(time.time()), **meta}
        (tmp_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _rename_into_place(tmp_dir, final_dir)
    finally:
        # On success the temp dir is gone (renamed); on failure or a lost race it is ours to delete.
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


def _rename_into_place(tmp_dir: Path, final_dir: Path) -> None:
    # rename(2) onto an existing non-empty directory fails, so the first process to get here wins.
    try:
        os.rename(tmp_dir, final_dir)
        return
    except OSError:
        if is_complete(final_dir):
            return  # lost the race: the caller's cleanup removes tmp_dir
    # final_dir exists but has no marker (made by hand, or by an older version): move it aside, then retry once.
    aside = final_dir.parent / f"{final_dir.name}.tmp-incomplete-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(final_dir, aside)
    except FileNotFoundError:
        pass  # someone else moved it meanwhile
    try:
        os.rename(tmp_dir, final_dir)
    except OSError as exc:
        if not is_complete(final_dir):
            raise ConversionError(f"cannot move {tmp_dir} to {final_dir}: {exc}") from exc
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_tmp_dirs(parent: Path, name: str) -> None:
    # Only old ones: a young .tmp-* dir may belong to a conversion running right now in another process.
    cutoff = time.time() - STALE_TMP_SECONDS
    for path in parent.glob(f"{name}.tmp-*"):
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


# GGUF metadata value types (gguf spec): fixed-size scalars by struct format, 8 = string, 9 = array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata_value(gguf_path: str | os.PathLike[str], key: str):
    """One scalar or string metadata value of a GGUF file (None if absent), without loading its tensors.

    `gguf.GGUFReader` parses every field, the 262k-entry vocabulary included (~30 s for Gemma 3); this scans the
    key/value section and skips arrays by their sizes.
    """
    import struct

    def read(fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, fh.read(size))[0]

    def read_str() -> bytes:
        return fh.read(read("Q"))

    def skip(vtype: int) -> None:
        if vtype in _GGUF_SCALARS:
            fh.seek(struct.calcsize("<" + _GGUF_SCALARS[vtype]), 1)
        elif vtype == 8:
            fh.seek(read("Q"), 1)
        elif vtype == 9:
            etype, count = read("I"), read("Q")
            if etype in _GGUF_SCALARS:
                fh.seek(count * struct.calcsize("<" + _GGUF_SCALARS[etype]), 1)
            else:
                for _ in range(count):
                    skip(etype)
        else:
            raise ConversionError(f"{gguf_path}: unknown GGUF metadata type {vtype}")

    with open(gguf_path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ConversionError(f"{gguf_path}: not a GGUF file")
        version = read("I")
        if version < 2:
            raise ConversionError(f"{gguf_path}: GGUF version {version} is not supported")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            name = read_str().decode("utf-8", "replace")
            vtype = read("I")
            if name != key:
                skip(vtype)
            elif vtype in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[vtype])
            elif vtype == 8:
                return read_str().decode("utf-8", "replace")
            else:
                raise ConversionError(f"{gguf_path}: metadata {key!r} is an array, not a single value")
    return None


def _apply_gguf_bos_flag(tokenizer, gguf_path: Path) -> None:
    """Make the tokenizer add BOS when the GGUF says so (``tokenizer.ggml.add_bos_token``).

    transformers' GGUF tokenizer loader drops this flag for some models: Gemma 3's tokenizer came back without BOS,
    and a Gemma model fed no ``<bos>`` produces garbage. SmolLM2's GGUF says False and is left as it is.
    """
    if not gguf_metadata_value(gguf_path, "tokenizer.ggml.add_bos_token") or tokenizer.bos_token_id is None:
        return
    if tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        tokenizer.add_bos_token = True  # rebuilds the post-processor: "<bos> $A"
    if tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        raise ConversionError(f"{gguf_path.name}: the GGUF asks for a BOS token but the tokenizer does not add it")


def _copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    try:
        missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even with strict=False
        raise ConversionError(f"GGUF weights do not fit the rebuilt model: {exc}") from exc
    if missing or unexpected:
        raise ConversionError(
            f"GGUF weights do not match the rebuilt model: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )


def _require_gguf_support() -> None:
    import importlib.util

    absent = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if absent:
        raise MissingDependencyError(
            f"reading GGUF checkpoints needs {' and '.join(absent)}: pip install gguf accelerate"
        )
