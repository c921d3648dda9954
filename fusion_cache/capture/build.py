"""Stage one: run a teacher once over a dataset and write its top-K log-probs to a cache.

    fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2

Order of work: resolve the teacher, validate every input row (fail before any model runs), render each row with
the teacher's own template, refuse an output directory that holds another cache, then capture in token-budget
batches and write shards into ``<out>.incomplete/``, renamed to ``<out>`` when everything is written.

Resume (``--resume``): ``<out>.incomplete/`` keeps the build's settings (cache/build_state.py) and every complete
shard (cache/writer.py). A resumed build checks both, skips the rows the complete shards hold and captures the
rest with the same engine batches and shard boundaries, so it writes the same bytes as an uninterrupted build
(given a deterministic engine) and therefore the same fingerprint.

Distributed (``--num-shards N --shard-index I``): the build captures one contiguous range of input rows into
``<out>/part-I-of-N/``; the last part to finish writes the combined manifest (cache/parts.py).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fusion_cache import __version__
from fusion_cache.cache.background import BackgroundWriter
from fusion_cache.cache.codecs import make_codec
from fusion_cache.cache.fingerprint import chain_fingerprint
from fusion_cache.cache.fingerprint import config_fingerprint
from fusion_cache.cache.manifest import MANIFEST_NAME
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.parts import combine_parts
from fusion_cache.cache.parts import part_dir_name
from fusion_cache.cache.parts import part_rows
from fusion_cache.cache.resume import STATE_NAME
from fusion_cache.cache.resume import check_build_state
from fusion_cache.cache.resume import read_build_state
from fusion_cache.cache.resume import write_build_state
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.schema import SCHEMA_VERSION
from fusion_cache.cache.storage import CacheLocation
from fusion_cache.cache.storage import upload_directory
from fusion_cache.cache.writer import ShardWriter
from fusion_cache.cache.writer import load_completed_parts
from fusion_cache.cache.writer import publish_directory
from fusion_cache.cache.writer import remove_part_records
from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.engines.base import SequenceRequest
from fusion_cache.capture.engines.base import TeacherEngine
from fusion_cache.capture.engines.base import TopKCapture
from fusion_cache.capture.inputs import Conversation
from fusion_cache.capture.inputs import dataset_hash
from fusion_cache.capture.inputs import read_conversations
from fusion_cache.capture.render import Rendered
from fusion_cache.capture.render import has_chat_template
from fusion_cache.capture.render import render
from fusion_cache.capture.render import tokenizer_hash
from fusion_cache.errors import ConfigError
from fusion_cache.errors import FingerprintError
from fusion_cache.errors import ShardFormatError

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    conv: Conversation
    rendered: Rendered


def _read_inputs(cfg: BuildConfig) -> list[Conversation]:
    """Every input row (validated, so a bad row fails before any model runs), the first ``--limit`` only."""
    convs: list[Conversation] = []
    for conv in read_conversations(cfg.data):
        if cfg.limit is not None and len(convs) >= cfg.limit:
            break
        convs.append(conv)
    return convs


def _prepare(cfg: BuildConfig, tokenizer, chat_template: bool, convs: list[Conversation], limit: int | None = None):
    """Render ``convs``; rows longer than ``min(cfg.max_length, limit)`` are truncated or skipped (``cfg.overlong``).

    Returns (kept rows, skip counts by reason, truncated count).
    """
    skipped = {"empty_response": 0, "overlong": 0, "no_answer_after_truncation": 0}
    truncated = 0
    max_length = cfg.max_length if limit is None else min(cfg.max_length, limit)
    kept: list[_Prepared] = []
    for conv in convs:
        if not conv.response.strip():
            skipped["empty_response"] += 1
            continue
        r = render(tokenizer, conv.messages, chat_template=chat_template)
        if len(r.input_ids) > max_length:
            if cfg.overlong == "skip":
                skipped["overlong"] += 1
                continue
            if r.answer_start >= max_length:  # nothing of the answer would survive
                skipped["no_answer_after_truncation"] += 1
                continue
            n = max_length
            r = Rendered(r.input_ids[:n], r.answer_start, r.byte_start[:n], r.byte_end[:n], r.text)
            truncated += 1
        kept.append(_Prepared(conv, r))
    return kept, skipped, truncated


def _part_of(manifest: Manifest) -> dict | None:
    return manifest.part.model_dump() if manifest.part is not None else None


def _check_output(out: Path, config_fp: str, overwrite: bool, part: dict | None = None) -> Manifest | None:
    """Return the existing manifest when ``out`` already holds this exact build (the same ``part`` of it, if any);
    refuse anything else unless ``overwrite`` (then None: build and replace)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if (out / MANIFEST_NAME).exists():
        try:
            existing = load_manifest(out)
        except ShardFormatError:
            existing = None
        if existing is not None and existing.config_fingerprint == config_fp and _part_of(existing) == part:
            return existing  # the same build: nothing to redo, --overwrite or not
        if not overwrite:
            what = "a different cache" if existing is not None else "an unreadable cache"
            raise ConfigError(f"--out {out}: holds {what}; pass --overwrite to replace it")
        return None
    if any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: directory is not empty and holds no cache; choose another --out")
    return None


def _check_remote_output(
    location: CacheLocation, config_fp: str, overwrite: bool, part: dict | None = None
) -> Manifest | None:
    """_check_output for an fsspec URL: the same build is a no-op, anything else needs ``overwrite``."""
    fs, root = location.fs, location.root
    if not fs.exists(root) or not fs.ls(root):
        return None
    try:
        existing = load_manifest(location)
    except ShardFormatError:
        existing = None
    if existing is not None and existing.config_fingerprint == config_fp and _part_of(existing) == part:
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


def _check_parts_root(out: str, config_fp: str) -> None:
    """A part build's ``--out`` may hold other parts and their combined manifest, never another cache."""
    loc = CacheLocation(out)
    if not loc.exists(MANIFEST_NAME):
        return
    try:
        top = load_manifest(loc)
    except ShardFormatError:
        top = None
    if top is None or top.parts is None or top.config_fingerprint != config_fp:
        raise ConfigError(
            f"--out {out}: holds another cache (not the parts of this build); choose another --out for the parts"
        )


def _staging_dir(url: str) -> Path:
    """Where a build to an fsspec URL is written before the upload: fixed per URL, so ``--resume`` finds it."""
    from fusion_cache.models.convert import fusion_cache_home

    return fusion_cache_home() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _open_work_dir(work: Path, state: dict, cfg: BuildConfig) -> tuple[list[dict], Manifest | None]:
    """Prepare ``<out>.incomplete``: resume it or start it afresh.

    Returns:
        (complete parts, None), or ([], manifest) when the interrupted build had already written its manifest.
    """
    if work.exists():
        has_parts = any(work.glob("part-*.json"))
        has_state = read_build_state(work) is not None
        if cfg.resume and (has_parts or has_state or (work / MANIFEST_NAME).exists()):
            if has_parts or has_state:  # (a finished build deletes its state just before the publishing rename)
                check_build_state(work, state)
            finished = _finished_in_work(work, state["config_fingerprint"])
            if finished is not None:
                log.warning("resuming %s: the build was complete; publishing it", work)
                return [], finished
            parts = load_completed_parts(work)
            write_build_state(work, state)  # the same settings (checked above), for a later resume
            log.warning(
                "resuming %s: %d complete shard(s) with %d rows kept", work, len(parts), sum(p["rows"] for p in parts)
            )
            return parts, None
        if has_parts and not cfg.overwrite:
            n = len(list(work.glob("part-*.json")))
            raise ConfigError(
                f"{work}: holds an interrupted build with {n} complete shard(s); pass --resume to continue it, "
                "or --overwrite to discard it"
            )
        shutil.rmtree(work)  # nothing worth keeping (no complete shard) or --overwrite
    work.mkdir(parents=True)
    write_build_state(work, state)
    return [], None


def _finished_in_work(work: Path, config_fp: str) -> Manifest | None:
    """The manifest of a build killed after writing it into ``work`` but before publishing, if it is intact."""
    from fusion_cache.cache.reader import CacheReader

    if not (work / MANIFEST_NAME).exists():
        return None
    try:
        reader = CacheReader(work)
        if reader.manifest.config_fingerprint == config_fp and not reader.verify():
            return reader.manifest
    except (ShardFormatError, FingerprintError):
        pass
    (work / MANIFEST_NAME).unlink()
    return None


def run_build(cfg: BuildConfig, *, engine: TeacherEngine | None = None, progress: bool = True) -> Manifest:
    """Build a cache as ``cfg`` says and return its manifest (the part's, for a part of a distributed build).

    Args:
        cfg: the build settings.
        engine: an already started engine for the same teacher (the demo and tests share one); by default the
            engine named by ``cfg.engine`` is started here and closed at the end.
        progress: show a progress bar (answer tokens, tokens/s, ETA; rows).

    Raises:
        ConfigError: bad settings, unknown teacher, an output directory holding another cache, an interrupted
            build without ``--resume``, or ``--resume`` with settings other than the interrupted build's.
        DataError: a malformed input row (before any model runs).
    """

    from fusion_cache.models.hardware import default_dtype
    from fusion_cache.models.presets import resolve_model

    t0 = time.perf_counter()
    teacher = resolve_model(cfg.teacher)
    tokenizer = _teacher_tokenizer(teacher.path, teacher.revision)
    chat = has_chat_template(tokenizer)
    dtype = engine.dtype if engine is not None else (cfg.dtype or default_dtype())
    engine_name = engine.name if engine is not None else cfg.engine
    convs = _read_inputs(cfg)
    rows_read = len(convs)
    part = None
    if cfg.num_shards > 1:
        lo, hi = part_rows(rows_read, cfg.shard_index, cfg.num_shards)
        part = {"index": cfg.shard_index, "count": cfg.num_shards, "row_start": lo, "row_end": hi}
        convs = convs[lo:hi]
    limit = _engine_length_limit(teacher.path, engine_name, engine)
    if limit is not None and limit < cfg.max_length:
        log.info(
            "max_length %d > %d, the longest row the %s engine takes: rows are cut there",
            cfg.max_length,
            limit,
            engine_name,
        )
    items, skipped, truncated = _prepare(cfg, tokenizer, chat, convs, limit)

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
    # the same for every part of a distributed build and for a single build: the parts combine into its cache
    config_fp = config_fingerprint(settings)
    out_url = cfg.out
    if part is not None:
        _check_parts_root(cfg.out, config_fp)
        name = part_dir_name(cfg.shard_index, cfg.num_shards)
        out_url = str(Path(cfg.out) / name) if CacheLocation(cfg.out).local else f"{cfg.out.rstrip('/')}/{name}"
    location = CacheLocation(out_url)
    if location.local:
        out = Path(location.root)
        existing = _check_output(out, config_fp, cfg.overwrite, part)
    else:  # an fsspec URL: build in a local staging dir, upload when complete (shards first, manifest last)
        out = _staging_dir(out_url) / "cache"
        existing = _check_remote_output(location, config_fp, cfg.overwrite, part)
    if existing is not None:
        log.info("%s already holds this build (config fingerprint %s); nothing to do", out_url, config_fp[:12])
        if part is not None:
            combine_parts(cfg.out, count=cfg.num_shards, require_all=False)
        return existing
    if not items and part is None:  # a part may be empty (all its rows skipped): the others still combine
        raise ConfigError(f"--data {cfg.data}: no usable rows ({rows_read} read, skipped: {skipped})")

    work = out.with_name(out.name + ".incomplete")
    # the settings plus what decides where shards end: a resume must cut the rows into the same shards
    state = {**settings, "shard_rows": cfg.shard_rows, "batch_tokens": cfg.batch_tokens, "part": part}
    state["config_fingerprint"] = config_fp
    completed, finished = _open_work_dir(work, state, cfg)
    manifest = finished or _capture(cfg, engine, teacher, dtype, items, codec, config_fp, work, completed, progress)
    if finished is None:
        manifest = _make_manifest(
            cfg, teacher_info, dataset_info, codec, config_fp, items, skipped, truncated, manifest, part, t0
        )
        manifest.write(work)
    remove_part_records(work)
    (work / STATE_NAME).unlink(missing_ok=True)
    publish_directory(work, out, overwrite=True)  # _check_output already refused what must not be replaced
    if not location.local:
        if location.fs.exists(location.root):
            location.fs.rm(location.root, recursive=True)  # _check_remote_output allowed the replacement
        upload_directory(str(out), out_url)
        shutil.rmtree(out.parent, ignore_errors=True)
        try:
            out.parent.parent.rmdir()  # the staging root, when no other build is staged there
        except OSError:
            pass
    if part is not None:
        combine_parts(cfg.out, count=cfg.num_shards, require_all=False)
    return manifest


def _capture(cfg, engine, teacher, dtype, items, codec, config_fp, work, completed, progress) -> list[dict]:
    """Capture every row not held by ``completed`` parts and write the shards into ``work``. Returns the shards.

    Engine batches are cut from all of ``items`` as in an uninterrupted build; a batch that straddles the resume
    point is captured whole and only its new rows are written, so every row sees the same batch as before.
    """
    done_rows = sum(p["rows"] for p in completed)
    done_answer = sum(it.rendered.n_answer for it in items[:done_rows])
    own_engine = engine is None and done_rows < len(items)
    if own_engine:
        from fusion_cache.capture.engines import make_engine

        max_len = max(len(it.rendered.input_ids) for it in items)
        extra = {"max_model_len": max_len + 1, "max_k": cfg.top_k} if cfg.engine == "vllm" else {}
        engine = make_engine(cfg.engine, teacher.path, dtype=dtype, **extra)
    provenance = {
        "schema_version": SCHEMA_VERSION,
        "k": cfg.top_k,
        "codec": codec,
        "config_fingerprint": config_fp,
        "teacher": cfg.teacher,
        "revision": teacher.revision,
    }
    total_answer = sum(it.rendered.n_answer for it in items)
    bar = tqdm(
        total=total_answer,
        initial=done_answer,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"build {cfg.teacher} (answer tokens)",
        dynamic_ncols=True,
    )
    bar.set_postfix(rows=f"{done_rows}/{len(items)}")
    try:
        with ShardWriter(work, provenance, shard_rows=cfg.shard_rows, completed=completed) as writer:

            def write(batch: list[tuple[_Prepared, TopKCapture]]) -> None:
                writer.write_rows([_to_row(it, cap) for it, cap in batch])

            # encoding and writing run on a worker thread while the engine captures the next batch
            with BackgroundWriter(write, max_pending=2) as background:
                pos = 0
                for group in _batches(items, cfg.batch_tokens):
                    start, pos = pos, pos + len(group)
                    if pos <= done_rows:
                        continue  # held by a complete shard
                    reqs = [SequenceRequest(it.rendered.input_ids.tolist(), it.rendered.answer_start) for it in group]
                    caps = engine.capture(reqs, cfg.top_k)
                    fresh = max(0, done_rows - start)
                    background.submit(list(zip(group[fresh:], caps[fresh:], strict=True)))
                    bar.set_postfix(rows=f"{pos}/{len(items)}", refresh=False)
                    bar.update(sum(it.rendered.n_answer for it in group[fresh:]))
            log.info(
                "writer thread: %d batches, %.2f s encoding and writing, engine waited %.2f s on it",
                background.batches_written,
                background.busy_seconds,
                background.wait_seconds,
            )
    finally:
        bar.close()
        if own_engine:
            engine.close()
    return writer.shards


def _make_manifest(cfg, teacher_info, dataset_info, codec, config_fp, items, skipped, truncated, shards, part, t0):
    payload = sum(s["bytes"] for s in shards)
    return Manifest(
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
            "tokens": sum(len(it.rendered.input_ids) for it in items),
            "answer_tokens": sum(it.rendered.n_answer for it in items),
            "skipped": skipped,
            "truncated": truncated,
            "payload_bytes": payload,
            "wall_seconds": round(time.perf_counter() - t0, 3),  # of this run (a resumed build: since the resume)
        },
        shards=shards,
        config_fingerprint=config_fp,
        fingerprint=chain_fingerprint(config_fp, shards),
        part=part,
    )


def build_summary(manifest: Manifest, out: str) -> str:
    """The end-of-build report: rows, tokens, skipped rows by reason, bytes per answer token, wall time."""
    s = manifest.stats
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(s.skipped.items()) if v) or "none"
    rate = s.answer_tokens / s.wall_seconds if s.wall_seconds > 0 else 0.0
    where = f" (part {manifest.part.index} of {manifest.part.count})" if manifest.part else ""
    where += f" ({len(manifest.parts)} parts combined)" if manifest.parts else ""
    lines = [
        f"wrote {out}{where}",
        f"  rows           {s.rows} kept of {manifest.dataset.rows_read} read; skipped: {skipped}; "
        f"truncated: {s.truncated}",
        f"  tokens         {s.tokens} ({s.answer_tokens} answer tokens)",
        f"  size           {s.payload_bytes} bytes in {len(manifest.shards)} shard(s), "
        f"{manifest.bytes_per_answer_token:.1f} bytes/answer token "
        f"({manifest.codec.get('name')} codec, K={manifest.k})",
        f"  wall time      {s.wall_seconds:.1f} s ({rate:.0f} answer tokens/s)",
        f"  fingerprint    {manifest.fingerprint}",
    ]
    return "\n".join(lines)


@functools.lru_cache(maxsize=4)
def _teacher_tokenizer(path: str, revision: str):
    """The teacher's tokenizer, loaded once per process and revision.

    Loading takes ~0.9 s for SmolLM2 (most of a small build's fixed cost), paid again by every `run_build` in one
    process (the demo, the tests, a benchmark) without this. Builds only read it (render, hash).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _engine_length_limit(model_path: str, engine_name: str, engine: TeacherEngine | None) -> int | None:
    """Longest sequence the engine can score for this teacher (None: no known limit).

    The teacher's ``max_position_embeddings`` (its text config's, for multimodal configs); vLLM needs one position
    more than the prompt (it must generate a token after it, and refuses ``max_model_len`` above the model's
    positions), so a vLLM row holds at most ``max_position_embeddings - 1`` tokens. An already started engine
    adds its own ``max_model_len`` the same way.
    """
    limit = None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
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
