"""Stage one: run a teacher once over a dataset and write its top-K log-probs to a cache.

    fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2

`run_build` reads as its steps:

1. `resolve_teacher` (capture/teacher.py): the teacher's weights, tokenizer, engine, dtype and longest sequence
   (`TeacherSetup`).
2. `_prepare_inputs`: read and validate every input row (fail before any model runs), keep this part's range, render
   each row with the teacher's own template and apply the length policy (`PreparedInputs`).
3. `_describe`: what the manifest records and the config fingerprint hashes (`BuildSpec`).
4. `plan_output` (capture/output.py): refuse an output directory that holds another cache (`OutputPlan`); then
   `build_lock`: refuse a second build into the same place while this one runs (and check ``--out`` again).
5. `open_work_dir` (cache/resume.py): start ``<out>.incomplete/``, or continue it with ``--resume``.
6. `_capture`: capture in token-budget batches and write shards into ``<out>.incomplete/``; then the manifest and
   the resolved settings (``config.yaml``, which ``fusion-cache build --config`` replays).
7. `publish` (capture/output.py): rename ``<out>.incomplete/`` to ``<out>`` (and upload, for an fsspec URL).

Resume (``--resume``): ``<out>.incomplete/`` keeps the build's settings and a record of every complete shard
(cache/resume.py). A resumed build checks both, skips the rows the complete shards hold and captures the rest with
the same engine batches and shard boundaries, so it writes the same bytes as an uninterrupted build (given a
deterministic engine) and therefore the same fingerprint.

Distributed (``--num-shards N --shard-index I``): the build captures one contiguous range of input rows into
``<out>/part-I-of-N/``; the last part to finish writes the combined manifest (cache/parts.py).
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fusion_cache import __version__
from fusion_cache.cache.background import BackgroundWriter
from fusion_cache.cache.card import ContentAccumulator
from fusion_cache.cache.card import write_card
from fusion_cache.cache.codecs import make_codec
from fusion_cache.cache.fingerprint import chain_fingerprint
from fusion_cache.cache.fingerprint import config_fingerprint
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import config_settings
from fusion_cache.cache.parts import combine_parts
from fusion_cache.cache.parts import part_rows
from fusion_cache.cache.resume import open_work_dir
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.schema import SCHEMA_VERSION
from fusion_cache.cache.writer import ShardWriter
from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.engines.base import SequenceRequest
from fusion_cache.capture.engines.base import TeacherEngine
from fusion_cache.capture.engines.base import TopKCapture
from fusion_cache.capture.inputs import Conversation
from fusion_cache.capture.inputs import dataset_hash
from fusion_cache.capture.inputs import read_conversations
from fusion_cache.capture.output import build_lock
from fusion_cache.capture.output import generated_answers
from fusion_cache.capture.output import plan_output
from fusion_cache.capture.output import public_dataset_source
from fusion_cache.capture.output import public_model_label
from fusion_cache.capture.output import publish
from fusion_cache.capture.render import Rendered
from fusion_cache.capture.render import render
from fusion_cache.capture.render import tokenizer_hash
from fusion_cache.capture.sampling import RS
from fusion_cache.capture.sampling import sample_key
from fusion_cache.capture.teacher import TeacherSetup
from fusion_cache.capture.teacher import resolve_teacher
from fusion_cache.capture.teacher import start_engine
from fusion_cache.capture.teacher import vocab_size
from fusion_cache.config import write_config_yaml
from fusion_cache.errors import ConfigError
from fusion_cache.models.load import store_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRow:
    """One input row and its rendering for the teacher (cut to the length limit when truncated)."""

    conv: Conversation
    rendered: Rendered


@dataclass(frozen=True)
class PreparedInputs:
    """The rows this build captures: read, cut to this part's range, rendered, length policy applied.

    Attributes:
        rows: the rows kept, in input order.
        rows_read: input rows read (every part's; ``--limit`` applied).
        part: ``{"index", "count", "row_start", "row_end"}`` for a part of a distributed build, else None.
        skipped: rows left out, by reason.
        truncated: rows cut at the length limit.
    """

    rows: list[PreparedRow]
    rows_read: int
    part: dict | None
    skipped: dict[str, int]
    truncated: int


@dataclass(frozen=True)
class BuildSpec:
    """What the build computes: what its manifest records and what its config fingerprint hashes.

    Attributes:
        teacher: the manifest's ``teacher`` (name, model path, revision, tokenizer hash, chat template, engine,
            dtype).
        dataset: the manifest's ``dataset`` (source, hash, rows read).
        codec: the codec's JSON.
        settings: what the config fingerprint hashes: the same for every part of a distributed build and for a
            single build, so the parts combine into its cache.
        config_fingerprint: the fingerprint of ``settings``.
        card: the manifest's card fields: ``license``, ``answers`` and ``meta`` (cache/card.py).
    """

    teacher: dict
    dataset: dict
    codec: dict
    settings: dict
    config_fingerprint: str
    card: dict


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
    started = time.perf_counter()
    teacher = resolve_teacher(cfg, engine)
    inputs = _prepare_inputs(cfg, teacher)
    spec = _describe(cfg, teacher, inputs)
    plan = plan_output(cfg, spec.config_fingerprint, inputs.part)
    with build_lock(plan.work):
        # again under the lock: a build that held it may have published into --out meanwhile
        plan = plan_output(cfg, spec.config_fingerprint, inputs.part)
        if plan.existing is not None:
            fp = spec.config_fingerprint[:12]
            log.info("%s already holds this build (config fingerprint %s); nothing to do", plan.url, fp)
            manifest = plan.existing
        else:
            # a part may be empty (all its rows skipped): the others still combine
            if not inputs.rows and inputs.part is None:
                raise ConfigError(
                    f"--data {cfg.data}: no usable rows ({inputs.rows_read} read, skipped: {inputs.skipped})"
                )
            state = _resume_state(cfg, spec, inputs.part)
            completed, manifest = open_work_dir(plan.work, state, resume=cfg.resume, overwrite=cfg.overwrite)
            if manifest is None:  # (else the interrupted build had written its manifest: publish it as is)
                shards, content = _capture(
                    cfg, teacher, inputs, spec, plan.work, completed, engine=engine, progress=progress
                )
                manifest = _make_manifest(cfg, spec, inputs, shards, started, content)
                write_card(manifest, plan.work)  # before the manifest: a card alone never looks like a cache
                manifest.write(plan.work)
            else:
                write_card(manifest, plan.work)
            write_config_yaml(cfg, plan.work, "build")  # next to the shards: `build --config <out>/config.yaml` replays
            publish(plan)
    if inputs.part is not None:
        combine_parts(cfg.out, count=cfg.num_shards, require_all=False)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# the teacher and the inputs


def _prepare_inputs(cfg: BuildConfig, teacher: TeacherSetup) -> PreparedInputs:
    """Read every input row, keep this part's range of them, and render those for ``teacher``."""
    convs = _read_inputs(cfg)
    rows_read = len(convs)
    part = None
    if cfg.num_shards > 1:
        lo, hi = part_rows(rows_read, cfg.shard_index, cfg.num_shards)
        part = {"index": cfg.shard_index, "count": cfg.num_shards, "row_start": lo, "row_end": hi}
        convs = convs[lo:hi]
    limit = teacher.length_limit
    if limit is not None and limit < cfg.max_length:
        log.info(
            "max_length %d > %d, the longest row the %s engine takes: rows are cut there",
            cfg.max_length,
            limit,
            teacher.engine,
        )
    rows, skipped, truncated = _prepare(cfg, teacher, convs)
    return PreparedInputs(rows=rows, rows_read=rows_read, part=part, skipped=skipped, truncated=truncated)


def _read_inputs(cfg: BuildConfig) -> list[Conversation]:
    """Every input row (validated, so a bad row fails before any model runs), the first ``--limit`` only."""
    convs: list[Conversation] = []
    for conv in read_conversations(cfg.data, cfg.row_format):
        if cfg.limit is not None and len(convs) >= cfg.limit:
            break
        convs.append(conv)
    return convs


def _prepare(
    cfg: BuildConfig, teacher: TeacherSetup, convs: list[Conversation]
) -> tuple[list[PreparedRow], dict[str, int], int]:
    """Render ``convs``; rows longer than ``min(cfg.max_length, teacher.length_limit)`` are truncated or skipped
    (``cfg.overlong``).

    Returns:
        (kept rows, skip counts by reason, truncated count).
    """
    skipped = {"empty_response": 0, "overlong": 0, "no_answer_after_truncation": 0}
    truncated = 0
    limit = teacher.length_limit
    max_length = cfg.max_length if limit is None else min(cfg.max_length, limit)
    kept: list[PreparedRow] = []
    for conv in convs:
        if not conv.response.strip():
            skipped["empty_response"] += 1
            continue
        r = render(teacher.tokenizer, conv.messages, chat_template=teacher.chat_template)
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
        kept.append(PreparedRow(conv, r))
    return kept, skipped, truncated


# ---------------------------------------------------------------------------------------------------------------
# what the build records


def _describe(cfg: BuildConfig, teacher: TeacherSetup, inputs: PreparedInputs) -> BuildSpec:
    """The manifest's teacher, dataset and codec, and the settings the config fingerprint hashes."""
    model = teacher.model
    vocab = vocab_size(model.path, teacher.tokenizer, model.load_revision)
    tok_hash = tokenizer_hash(teacher.tokenizer)
    if model.is_local:  # training finds it by its hash (the manifest names no local path)
        store_tokenizer(teacher.tokenizer, tok_hash)
    teacher_info = {
        # no local paths in a manifest: a directory is recorded by its name (its content hash is the revision)
        "name": public_model_label(cfg.teacher, model),
        "model": public_model_label(model.path, model),
        "revision": model.revision,
        "tokenizer_hash": tok_hash,
        "chat_template": teacher.chat_template,
        "engine": teacher.engine,
        "dtype": teacher.dtype,
        "vocab_size": vocab,  # readers bound every token id by it (cache/validate.py)
    }
    data_hash = dataset_hash(cfg.data, cfg.row_format)
    dataset_info = {"source": public_dataset_source(cfg.data), "hash": data_hash, "rows_read": inputs.rows_read}
    meta = cfg.meta_block
    sampled = {"samples": cfg.samples, "seed": cfg.seed} if cfg.sampling == RS else {}
    codec = make_codec(cfg.codec, value_bits=cfg.value_bits, vocab_size=vocab, **sampled).to_json()
    settings = config_settings(
        schema_version=SCHEMA_VERSION,
        teacher=teacher_info,
        dataset_hash=dataset_info["hash"],
        rows_read=inputs.rows_read,
        k=cfg.top_k,
        codec=codec,
        max_length=cfg.max_length,
        overlong=cfg.overlong,
        meta=meta,
    )
    card = {
        "license": cfg.license or (model.preset.license if model.preset is not None else None),
        "answers": generated_answers(cfg.data),
        "meta": meta,
    }
    return BuildSpec(teacher_info, dataset_info, codec, settings, config_fingerprint(settings), card)


def _resume_state(cfg: BuildConfig, spec: BuildSpec, part: dict | None) -> dict:
    """The settings plus what decides where shards end: a resume must cut the rows into the same shards."""
    state = {**spec.settings, "shard_rows": cfg.shard_rows, "batch_tokens": cfg.batch_tokens, "part": part}
    state["config_fingerprint"] = spec.config_fingerprint
    return state


def _make_manifest(
    cfg: BuildConfig,
    spec: BuildSpec,
    inputs: PreparedInputs,
    shards: list[dict],
    started: float,
    content: dict | None = None,
) -> Manifest:
    """The finished cache's manifest; ``started`` is this run's `time.perf_counter` at its start, ``content`` the
    card's content statistics (None after a resume: the rows written before it were not seen)."""
    rows = inputs.rows
    return Manifest(
        schema_version=SCHEMA_VERSION,
        fusion_cache_version=__version__,
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        teacher=spec.teacher,
        dataset=spec.dataset,
        k=cfg.top_k,
        codec=spec.codec,
        max_length=cfg.max_length,
        overlong=cfg.overlong,
        stats={
            "rows": len(rows),
            "tokens": sum(len(it.rendered.input_ids) for it in rows),
            "answer_tokens": sum(it.rendered.n_answer for it in rows),
            "skipped": inputs.skipped,
            "truncated": inputs.truncated,
            "payload_bytes": sum(s["bytes"] for s in shards),
            "wall_seconds": round(time.perf_counter() - started, 3),  # of this run (a resumed build: since the resume)
        },
        shards=shards,
        config_fingerprint=spec.config_fingerprint,
        fingerprint=chain_fingerprint(spec.config_fingerprint, shards),
        part=inputs.part,
        content=content,
        **spec.card,
    )


# ---------------------------------------------------------------------------------------------------------------
# capture


def _capture(
    cfg: BuildConfig,
    teacher: TeacherSetup,
    inputs: PreparedInputs,
    spec: BuildSpec,
    work: Path,
    completed: list[dict],
    *,
    engine: TeacherEngine | None,
    progress: bool,
) -> tuple[list[dict], dict | None]:
    """Capture every row not held by ``completed`` parts and write the shards into ``work``.

    Returns:
        (the shards, the content statistics of the rows written: None after a resume, whose earlier rows this
        run did not see).

    Engine batches are cut from all of the rows as in an uninterrupted build; a batch that straddles the resume
    point is captured whole and only its new rows are written, so every row sees the same batch as before.
    """
    rows = inputs.rows
    done_rows = sum(p["rows"] for p in completed)
    own_engine = engine is None and done_rows < len(rows)
    if own_engine:
        engine = start_engine(cfg, teacher, max(len(it.rendered.input_ids) for it in rows))
    bar = _progress_bar(cfg, rows, done_rows, progress)
    content = ContentAccumulator(cfg.top_k)
    try:
        with ShardWriter(work, _shard_provenance(spec), shard_rows=cfg.shard_rows, completed=completed) as writer:

            def write(batch: list[tuple[PreparedRow, TopKCapture]]) -> None:
                out = [_to_row(it, cap) for it, cap in batch]
                for row in out:
                    content.add(row.topk_logprobs)
                writer.write_rows(out)

            # encoding and writing run on a worker thread while the engine captures the next batch
            with BackgroundWriter(write, max_pending=2) as background:
                samples = cfg.samples if cfg.sampling == RS else None
                for group, fresh, end in _batches_to_capture(rows, cfg.batch_tokens, done_rows):
                    reqs = [_request(it, cfg) for it in group]
                    caps = engine.capture(reqs, cfg.top_k, samples) if samples else engine.capture(reqs, cfg.top_k)
                    background.submit(list(zip(group[fresh:], caps[fresh:], strict=True)))
                    bar.set_postfix(rows=f"{end}/{len(rows)}", refresh=False)
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
    stats = content.stats() if done_rows == 0 else None
    return writer.shards, (stats.model_dump() if stats is not None else None)


def _shard_provenance(spec: BuildSpec) -> dict:
    """What every shard's schema metadata says about the build."""
    return {
        "schema_version": SCHEMA_VERSION,
        "k": spec.settings["k"],
        "codec": spec.codec,
        "config_fingerprint": spec.config_fingerprint,
        "teacher": spec.teacher["name"],
        "revision": spec.teacher["revision"],
    }


def _progress_bar(cfg: BuildConfig, rows: list[PreparedRow], done_rows: int, progress: bool) -> tqdm:
    """Answer tokens captured (a resumed build starts at those of its complete shards), and rows."""
    bar = tqdm(
        total=sum(it.rendered.n_answer for it in rows),
        initial=sum(it.rendered.n_answer for it in rows[:done_rows]),
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"build {cfg.teacher} (answer tokens)",
        dynamic_ncols=True,
    )
    bar.set_postfix(rows=f"{done_rows}/{len(rows)}")
    return bar


def _batches_to_capture(
    rows: list[PreparedRow], budget: int, done_rows: int
) -> Iterator[tuple[list[PreparedRow], int, int]]:
    """The engine batches still to capture: (batch, how many of its first rows are already written, end row).

    Every batch is cut from all of ``rows`` (`_batches`), so a resumed build sends the engine the same batches.
    """
    end = 0
    for group in _batches(rows, budget):
        start, end = end, end + len(group)
        if end > done_rows:  # (else held by a complete shard)
            yield group, max(0, done_rows - start), end


def _batches(items: list[PreparedRow], budget: int) -> list[list[PreparedRow]]:
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


def _request(it: PreparedRow, cfg: BuildConfig) -> SequenceRequest:
    """The engine request of one row; a sampled build's draws are seeded by the build seed and the sample id only
    (never by the batch or worker), so every build of the row draws the same tokens."""
    key = sample_key(cfg.seed, it.conv.sample_id) if cfg.sampling == RS else None
    return SequenceRequest(it.rendered.input_ids.tolist(), it.rendered.answer_start, key)


def _to_row(it: PreparedRow, cap: TopKCapture) -> CacheRow:
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
        sample_counts=None if cap.counts is None else np.ascontiguousarray(cap.counts, dtype=np.uint8),
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
