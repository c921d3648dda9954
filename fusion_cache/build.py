"""Stage one: run a teacher once over a dataset and write its top-K log-probs to a cache.

    fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2

Order of work: resolve the teacher, validate every input row (fail before any model runs), render each row with
the teacher's own template, refuse an output directory that holds another cache, then capture in token-budget
batches and write shards into ``<out>.incomplete/``, renamed to ``<out>`` when everything is written.
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fusion_cache import __version__
from fusion_cache.cache.codecs import make_codec
from fusion_cache.cache.fingerprint import chain_fingerprint
from fusion_cache.cache.fingerprint import config_fingerprint
from fusion_cache.cache.manifest import MANIFEST_NAME
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.schema import SCHEMA_VERSION
from fusion_cache.cache.storage import CacheLocation
from fusion_cache.cache.storage import upload_directory
from fusion_cache.cache.writer import CacheRow
from fusion_cache.cache.writer import ShardWriter
from fusion_cache.cache.writer import publish_directory
from fusion_cache.config import BuildConfig
from fusion_cache.engines.base import SequenceRequest
from fusion_cache.engines.base import TeacherEngine
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError
from fusion_cache.inputs import Conversation
from fusion_cache.inputs import dataset_hash
from fusion_cache.inputs import read_conversations
from fusion_cache.render import Rendered
from fusion_cache.render import has_chat_template
from fusion_cache.render import render
from fusion_cache.render import tokenizer_hash

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    conv: Conversation
    rendered: Rendered


def _prepare(cfg: BuildConfig, tokenizer, chat_template: bool) -> tuple[list[_Prepared], dict, int, int]:
    """Read, validate and render every row. Returns (kept rows, skip counts, truncated count, rows read)."""
    skipped = {"empty_response": 0, "overlong": 0, "no_answer_after_truncation": 0}
    truncated = 0
    kept: list[_Prepared] = []
    rows_read = 0
    for conv in read_conversations(cfg.data):
        rows_read += 1
        if cfg.limit is not None and rows_read > cfg.limit:
            rows_read -= 1
            break
        if not conv.response.strip():
            skipped["empty_response"] += 1
            continue
        r = render(tokenizer, conv.messages, chat_template=chat_template)
        if len(r.input_ids) > cfg.max_length:
            if cfg.overlong == "skip":
                skipped["overlong"] += 1
                continue
            if r.answer_start >= cfg.max_length:  # nothing of the answer would survive
                skipped["no_answer_after_truncation"] += 1
                continue
            n = cfg.max_length
            r = Rendered(r.input_ids[:n], r.answer_start, r.byte_start[:n], r.byte_end[:n], r.text)
            truncated += 1
        kept.append(_Prepared(conv, r))
    return kept, skipped, truncated, rows_read


def _check_output(out: Path, config_fp: str, overwrite: bool) -> Manifest | None:
    """Return the existing manifest when ``out`` already holds this exact build; refuse anything else unless
    ``overwrite`` (then None: build and replace)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if (out / MANIFEST_NAME).exists():
        try:
            existing = load_manifest(out)
        except ShardFormatError:
            existing = None
        if existing is not None and existing.config_fingerprint == config_fp:
            return existing  # the same build: nothing to redo, --overwrite or not
        if not overwrite:
            what = "a different cache" if existing is not None else "an unreadable cache"
            raise ConfigError(f"--out {out}: holds {what}; pass --overwrite to replace it")
        return None
    if any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: directory is not empty and holds no cache; choose another --out")
    return None


def _check_remote_output(location: CacheLocation, config_fp: str, overwrite: bool) -> Manifest | None:
    """_check_output for an fsspec URL: the same build is a no-op, anything else needs ``overwrite``."""
    fs, root = location.fs, location.root
    if not fs.exists(root) or not fs.ls(root):
        return None
    try:
        existing = load_manifest(location)
    except ShardFormatError:
        existing = None
    if existing is not None and existing.config_fingerprint == config_fp:
        return existing
    if not overwrite:
        raise ConfigError(f"--out {location}: holds other files or another cache; pass --overwrite to replace it")
    return None


def _batches(items: list[_Prepared], budget: int) -> list[list[_Prepared]]:
    """Consecutive groups whose token count stays within ``budget`` (a longer single row is its own group)."""
    groups, cur, used = [], [], 0
    for it in items:
        n = len(it.rendered.input_ids)
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(it)
        used += n
    if cur:
        groups.append(cur)
    return groups


def run_build(cfg: BuildConfig, *, engine: TeacherEngine | None = None, progress: bool = True) -> Manifest:
    """Build a cache as ``cfg`` says and return its manifest.

    Args:
        cfg: the build settings.
        engine: an already started engine for the same teacher (the demo and tests share one); by default the
            engine named by ``cfg.engine`` is started here and closed at the end.
        progress: show a progress bar (rows, answer tokens/s).

    Raises:
        ConfigError: bad settings, unknown teacher, or an output directory holding another cache.
        DataError: a malformed input row (before any model runs).
    """
    from transformers import AutoTokenizer

    from fusion_cache.hardware import default_dtype
    from fusion_cache.teachers import resolve_model

    t0 = time.perf_counter()
    teacher = resolve_model(cfg.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher.path, trust_remote_code=False)
    chat = has_chat_template(tokenizer)
    dtype = engine.dtype if engine is not None else (cfg.dtype or default_dtype())
    engine_name = engine.name if engine is not None else cfg.engine
    items, skipped, truncated, rows_read = _prepare(cfg, tokenizer, chat)

    teacher_info = {
        "name": cfg.teacher,
        "model": teacher.path,
        "revision": teacher.revision,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "chat_template": chat,
        "engine": engine_name,
        "dtype": dtype,
    }
    dataset_info = {"source": cfg.data, "hash": dataset_hash(cfg.data), "rows_read": rows_read}
    codec = make_codec(cfg.codec, value_bits=cfg.value_bits, vocab_size=_vocab_size(teacher.path, tokenizer)).to_json()
    settings = {
        "schema_version": SCHEMA_VERSION,
        # the resolved path is machine-specific (a home directory): the name and revision identify the weights
        "teacher": {k: v for k, v in teacher_info.items() if k != "model"},
        "dataset_hash": dataset_info["hash"],
        "rows_read": rows_read,
        "k": cfg.top_k,
        "codec": codec,
        "max_length": cfg.max_length,
        "overlong": cfg.overlong,
    }
    config_fp = config_fingerprint(settings)
    location = CacheLocation(cfg.out)
    if location.local:
        out = Path(location.root)
        existing = _check_output(out, config_fp, cfg.overwrite)
    else:  # an fsspec URL: build in a local temp dir, upload when complete (shards first, manifest last)
        out = Path(tempfile.mkdtemp(prefix="fusion-cache-build-")) / "cache"
        existing = _check_remote_output(location, config_fp, cfg.overwrite)
    if existing is not None:
        log.info("%s already holds this build (config fingerprint %s); nothing to do", out, config_fp[:12])
        return existing
    if not items:
        raise ConfigError(f"--data {cfg.data}: no usable rows ({rows_read} read, skipped: {skipped})")

    own_engine = engine is None
    if own_engine:
        from fusion_cache.engines import make_engine

        max_len = max(len(it.rendered.input_ids) for it in items)
        extra = {"max_model_len": max_len + 1, "max_k": cfg.top_k} if cfg.engine == "vllm" else {}
        engine = make_engine(cfg.engine, teacher.path, dtype=dtype, **extra)

    work = out.with_name(out.name + ".incomplete")
    if work.exists():
        shutil.rmtree(work)  # leftovers of a killed build: never trusted, always rebuilt
    provenance = {
        "schema_version": SCHEMA_VERSION,
        "k": cfg.top_k,
        "codec": codec,
        "config_fingerprint": config_fp,
        "teacher": cfg.teacher,
        "revision": teacher.revision,
    }
    total_answer = sum(it.rendered.n_answer for it in items)
    bar = tqdm(total=len(items), unit="row", disable=not progress, desc=f"build {cfg.teacher}", dynamic_ncols=True)
    tokens = answer_tokens = 0
    t_cap = time.perf_counter()
    try:
        with ShardWriter(work, provenance, shard_rows=cfg.shard_rows) as writer:
            for group in _batches(items, cfg.batch_tokens):
                reqs = [SequenceRequest(it.rendered.input_ids.tolist(), it.rendered.answer_start) for it in group]
                caps = engine.capture(reqs, cfg.top_k)
                rows = [_to_row(it, cap) for it, cap in zip(group, caps, strict=True)]
                writer.write_rows(rows)
                tokens += sum(len(it.rendered.input_ids) for it in group)
                answer_tokens += sum(it.rendered.n_answer for it in group)
                bar.update(len(group))
                bar.set_postfix(
                    tok_s=f"{tokens / (time.perf_counter() - t_cap):.0f}", answer=f"{answer_tokens}/{total_answer}"
                )
    finally:
        bar.close()
        if own_engine:
            engine.close()
    shards = writer.shards
    payload = sum(s["bytes"] for s in shards)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        fusion_cache_version=__version__,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        teacher=teacher_info,
        dataset=dataset_info,
        k=cfg.top_k,
        codec=codec,
        max_length=cfg.max_length,
        overlong=cfg.overlong,
        stats={
            "rows": len(items),
            "tokens": tokens,
            "answer_tokens": answer_tokens,
            "skipped": skipped,
            "truncated": truncated,
            "payload_bytes": payload,
            "wall_seconds": round(time.perf_counter() - t0, 3),
        },
        shards=shards,
        config_fingerprint=config_fp,
        fingerprint=chain_fingerprint(config_fp, shards),
    )
    manifest.write(work)
    publish_directory(work, out, overwrite=True)  # _check_output already refused what must not be replaced
    if not location.local:
        if location.fs.exists(location.root):
            location.fs.rm(location.root, recursive=True)  # _check_remote_output allowed the replacement
        upload_directory(str(out), cfg.out)
        shutil.rmtree(out.parent, ignore_errors=True)
    return manifest


def _vocab_size(model_path: str, tokenizer) -> int:
    """Largest id the teacher can emit + 1: the model's output size (often padded past the tokenizer's)."""
    n = len(tokenizer)
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
        n = max(n, int(getattr(cfg, "vocab_size", 0) or 0))
    except (OSError, ValueError):
        pass  # a GGUF-only dir or an unusual config: the tokenizer's size is the bound
    return n


def _to_row(it: _Prepared, cap) -> CacheRow:
    r = it.rendered
    assert cap.ids.shape == (r.n_answer, cap.ids.shape[1]), f"capture shape {cap.ids.shape} vs {r.n_answer} answers"
    return CacheRow(
        sample_id=it.conv.sample_id,
        row_index=it.conv.row_index,
        conversation=it.conv.canonical,
        input_ids=r.input_ids,
        answer_start=r.answer_start,
        token_byte_start=r.byte_start,
        token_byte_end=r.byte_end,
        topk_ids=np.ascontiguousarray(cap.ids, dtype=np.int32),
        topk_logprobs=np.ascontiguousarray(cap.logprobs, dtype=np.float32),
        target_logprobs=np.ascontiguousarray(cap.target_logprobs, dtype=np.float32),
    )
