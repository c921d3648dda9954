"""Distributed builds: N independent builds of disjoint parts of the input, combined into one cache.

``fusion-cache build --num-shards N --shard-index I --out OUT`` takes the input rows at positions
``floor(I*R/N) <= position < floor((I+1)*R/N)`` of the R rows read (after ``--limit``): contiguous ranges by row
index, so the parts in index order hold exactly the rows of a single build, in the same order. Part I is a
complete cache of its own in ``OUT/part-0000I-of-0000N/`` (resumable, verifiable alone; its manifest has ``part``).
When a part finishes and finds all N part manifests, it writes ``OUT/manifest.json`` (`combine_parts`); every
finisher writes the same bytes, so parts finishing at once do no harm. ``fusion-cache combine OUT`` does the same by
hand. The combined manifest lists every part's shards as ``part-.../shard-...arrow`` and records each part
(``parts``); its config fingerprint is the one a single build with the same settings has.
"""

from __future__ import annotations

import logging

from fusion_cache.cache.card import CARD_NAME
from fusion_cache.cache.card import combined_content
from fusion_cache.cache.card import render_card
from fusion_cache.cache.card import write_card
from fusion_cache.cache.fingerprint import chain_fingerprint
from fusion_cache.cache.manifest import MANIFEST_NAME
from fusion_cache.cache.manifest import PART_DIR_RE
from fusion_cache.cache.manifest import BuildStats
from fusion_cache.cache.manifest import CombinedPart
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import ShardInfo
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.storage import CacheLocation
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError

log = logging.getLogger(__name__)


def part_dir_name(index: int, count: int) -> str:
    """``part-00001-of-00004``."""
    return f"part-{index:05d}-of-{count:05d}"


def part_rows(n_rows: int, index: int, count: int) -> tuple[int, int]:
    """(start, end) positions of part ``index`` of ``count`` among ``n_rows`` input rows: contiguous, balanced."""
    if not 0 <= index < count:
        raise ConfigError(f"--shard-index: must be in [0, {count}), got {index}")
    return index * n_rows // count, (index + 1) * n_rows // count


def _part_dirs(loc: CacheLocation) -> dict[str, tuple[int, int]]:
    """{dir name: (index, count)} of the part directories under ``loc`` (finished or not)."""
    if not loc.fs.exists(loc.root):
        return {}
    found = {}
    for entry in loc.fs.ls(loc.root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = PART_DIR_RE.match(name)
        if m:
            found[name] = (int(m.group(1)), int(m.group(2)))
    return found


def combine_parts(out: str, *, count: int | None = None, require_all: bool = True) -> Manifest | None:
    """Write ``<out>/manifest.json`` over the finished parts in ``out`` and return it.

    Args:
        out: the shared output (a directory or an fsspec URL) holding ``part-*-of-*/`` caches.
        count: the expected number of parts (default: read from the part directories, which must agree).
        require_all: raise when a part is not finished yet; otherwise return None in that case.

    Raises:
        ConfigError: no parts, parts of different counts or builds, a part not finished (``require_all``), or
            ``out`` already holding another cache.
        ShardFormatError: a part's manifest or shard files are bad.
    """
    loc = CacheLocation(out)
    dirs = _part_dirs(loc)
    counts = {c for _, c in dirs.values()} | ({count} if count else set())
    if not counts:
        raise ConfigError(f"{out}: holds no part-NNNNN-of-NNNNN directories to combine")
    if len(counts) > 1:
        raise ConfigError(f"{out}: parts of different --num-shards {sorted(counts)}; each value needs its own --out")
    n = counts.pop()
    finished = {}
    for i in range(n):
        name = part_dir_name(i, n)
        if name in dirs and loc.child(name).exists(MANIFEST_NAME):
            finished[i] = name
    missing = [i for i in range(n) if i not in finished]
    if missing:
        if require_all:
            raise ConfigError(
                f"{out}: {len(missing)} of {n} parts are not finished (shard indices {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}); run `fusion-cache build --num-shards {n} --shard-index I` "
                "for each"
            )
        return None
    parts = [load_manifest(loc.child(finished[i])) for i in range(n)]
    _check_parts(out, parts, n)
    first = parts[0]
    shards, records = [], []
    for i, (name, m) in enumerate(zip([finished[i] for i in range(n)], parts, strict=True)):
        for s in m.shards:
            path = f"{name}/{s.path}"
            if loc.size(path) != s.bytes:
                raise ShardFormatError(f"{out}/{path}: {loc.size(path)} bytes on disk, its part says {s.bytes}")
            shards.append(ShardInfo(**{**s.model_dump(), "path": path}))
        records.append(
            CombinedPart(
                path=name,
                index=i,
                row_start=m.part.row_start,
                row_end=m.part.row_end,
                rows=m.stats.rows,
                shards=len(m.shards),
                fingerprint=m.fingerprint,
            )
        )
    reasons = sorted({r for m in parts for r in m.stats.skipped})
    stats = BuildStats(
        rows=sum(m.stats.rows for m in parts),
        tokens=sum(m.stats.tokens for m in parts),
        answer_tokens=sum(m.stats.answer_tokens for m in parts),
        skipped={r: sum(m.stats.skipped.get(r, 0) for m in parts) for r in reasons},
        truncated=sum(m.stats.truncated for m in parts),
        payload_bytes=sum(m.stats.payload_bytes for m in parts),
        wall_seconds=max(m.stats.wall_seconds for m in parts),  # the parts ran side by side
    )
    shard_dicts = [s.model_dump() for s in shards]
    combined = Manifest(
        schema_version=first.schema_version,
        fusion_cache_version=first.fusion_cache_version,
        created_at=max(m.created_at for m in parts),  # deterministic: every finisher writes the same bytes
        teacher=first.teacher,
        dataset=first.dataset,
        k=first.k,
        codec=first.codec,
        max_length=first.max_length,
        overlong=first.overlong,
        stats=stats,
        shards=shards,
        config_fingerprint=first.config_fingerprint,
        fingerprint=chain_fingerprint(first.config_fingerprint, shard_dicts),
        parts=records,
        license=first.license,
        answers=first.answers,
        content=combined_content(parts),
        meta=first.meta,  # in the config fingerprint, so the same in every part
    )
    _refuse_other_cache(loc, combined)
    # the card first: it is rendered from the combined manifest, which makes the directory a cache when it lands
    if loc.local:
        write_card(combined, loc.root)
        combined.write(loc.root)
    else:
        loc.fs.pipe_file(loc.join(CARD_NAME), render_card(combined).encode())
        loc.fs.pipe_file(loc.join(MANIFEST_NAME), combined.to_json().encode())
    log.info("%s: combined %d parts, %d rows, fingerprint %s", out, n, stats.rows, combined.fingerprint[:16])
    return combined


def _check_parts(out: str, parts: list[Manifest], n: int) -> None:
    """The parts come from one distributed build and their row ranges tile the input."""
    first = parts[0]
    expected_start = 0
    for i, m in enumerate(parts):
        where = f"{out}/{part_dir_name(i, n)}"
        if m.part is None or m.part.index != i or m.part.count != n:
            raise ConfigError(f"{where}: its manifest does not say it is part {i} of {n} (part={m.part})")
        if m.parts is not None:
            raise ConfigError(f"{where}: is itself a combined cache")
        if m.config_fingerprint != first.config_fingerprint:
            raise ConfigError(
                f"{where}: built with other settings than part 0 (config fingerprint {m.config_fingerprint[:16]} vs "
                f"{first.config_fingerprint[:16]}); rebuild it with the same teacher, data, K, codec and lengths"
            )
        if m.part.row_start != expected_start:
            raise ConfigError(f"{where}: starts at input row {m.part.row_start}, expected {expected_start}")
        expected_start = m.part.row_end
    if expected_start != first.dataset.rows_read:
        raise ConfigError(f"{out}: parts end at input row {expected_start}, the input has {first.dataset.rows_read}")


def _refuse_other_cache(loc: CacheLocation, combined: Manifest) -> None:
    """A top manifest that is not a combination of these parts' build is never replaced."""
    if not loc.exists(MANIFEST_NAME):
        return
    try:
        existing = load_manifest(loc)
    except ShardFormatError:
        existing = None
    if existing is None or existing.parts is None or existing.config_fingerprint != combined.config_fingerprint:
        raise ConfigError(f"{loc}: already holds another cache's manifest.json; combine the parts elsewhere")


def part_problems(loc: CacheLocation, manifest: Manifest) -> list[str]:
    """For `verify`: each part's own manifest must still match what the combined manifest recorded."""
    problems = []
    offset = 0
    for p in manifest.parts or []:
        try:
            m = load_manifest(loc.child(p.path))
        except ShardFormatError as e:
            problems.append(f"{p.path}: {e}")
            offset += p.shards
            continue
        if m.fingerprint != p.fingerprint:
            problems.append(
                f"{p.path}: fingerprint {m.fingerprint[:16]} differs from the recorded {p.fingerprint[:16]}"
            )
        own = [(f"{p.path}/{s.path}", s.sha256) for s in m.shards]
        listed = [(s.path, s.sha256) for s in manifest.shards[offset : offset + p.shards]]
        if own != listed:
            problems.append(f"{p.path}: its shards differ from those the combined manifest lists for it")
        offset += p.shards
    if manifest.parts is not None and offset != len(manifest.shards):
        problems.append(f"the parts account for {offset} shards, the manifest lists {len(manifest.shards)}")
    return problems
