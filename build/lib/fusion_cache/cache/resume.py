"""Resume of an interrupted build: what ``<out>.incomplete/`` records, and how `--resume` checks and continues it.

Two kinds of record, both written atomically and durably (cache/durable.py):

- ``build-state.json``: the build's settings. A resumed build must compute exactly what the interrupted one would
  have: the same rows (teacher, data, K, codec, length policy: the config fingerprint's settings) cut into the same
  shards (rows per shard, token budget per engine call, which part of a distributed build). The state is one JSON
  object holding all of these (nested for the teacher and codec); any difference is refused with an error that
  names the field, e.g. ``k`` or ``teacher.dtype``.
- ``part-NNNNN.json``, one per complete part (cache/writer.py writes the part, then its record): ``index``,
  ``file``, ``rows``, ``answer_tokens``, ``bytes``, ``sha256``. `load_completed_parts` trusts a part only if its
  record parses and its file has the recorded size and sha256. Parts are written in input order, so the complete
  parts hold exactly the first ``sum(rows)`` rows.

`open_work_dir` puts these together for `capture/build.py`. The protocol and its crash windows:
docs/cache-format.md section 3.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from fusion_cache.cache.durable import fsync_dir
from fusion_cache.cache.durable import write_atomic
from fusion_cache.cache.fingerprint import canonical_json
from fusion_cache.cache.fingerprint import file_sha256
from fusion_cache.cache.manifest import MANIFEST_NAME
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.reader import CacheReader
from fusion_cache.errors import ConfigError
from fusion_cache.errors import FingerprintError
from fusion_cache.errors import ShardFormatError

log = logging.getLogger(__name__)

STATE_NAME = "build-state.json"
_PART_RE = re.compile(r"^part-(\d{5})\.json$")


# ---------------------------------------------------------------------------------------------------------------
# the work directory as a whole


def open_work_dir(work: Path, state: dict, *, resume: bool, overwrite: bool) -> tuple[list[dict], Manifest | None]:
    """Prepare ``<out>.incomplete``: resume it (``resume``), or start it afresh.

    Args:
        work: the work directory.
        state: this build's settings (`write_build_state`), with its ``config_fingerprint``.
        resume: continue an interrupted build found in ``work`` (``--resume``).
        overwrite: discard an interrupted build found in ``work`` (``--overwrite``).

    Returns:
        (complete parts, None), or ([], manifest) when the interrupted build had already written its manifest.

    Raises:
        ConfigError: ``work`` holds complete parts and neither ``resume`` nor ``overwrite`` is set, or ``resume``
            with settings other than the interrupted build's.
    """
    if work.exists():
        has_parts = any(work.glob("part-*.json"))
        has_state = read_build_state(work) is not None
        if resume and (has_parts or has_state or (work / MANIFEST_NAME).exists()):
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
        if has_parts and not overwrite:
            n = len(list(work.glob("part-*.json")))
            raise ConfigError(
                f"{work}: holds an interrupted build with {n} complete shard(s); pass --resume to continue it, "
                "or --overwrite to discard it"
            )
        shutil.rmtree(work)  # nothing worth keeping (no complete shard) or --overwrite
    work.mkdir(parents=True)
    write_build_state(work, state)
    return [], None


def clear_resume_records(work: Path) -> None:
    """Delete the part records and the build state of a finished build, just before it is published."""
    remove_part_records(work)
    (work / STATE_NAME).unlink(missing_ok=True)


def _finished_in_work(work: Path, config_fp: str) -> Manifest | None:
    """The manifest of a build killed after writing it into ``work`` but before publishing, if it is intact."""
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


# ---------------------------------------------------------------------------------------------------------------
# part records


def part_name(index: int) -> str:
    """``part-00003``: the stem of a part's file (``.arrow``, ``.arrow.tmp``) and of its record (``.json``)."""
    return f"part-{index:05d}"


def write_part_record(work_dir: str | Path, record: dict) -> None:
    """Record a complete part (its file already renamed into place): from now on a resume keeps it."""
    path = Path(work_dir) / f"{part_name(record['index'])}.json"
    write_atomic(path, json.dumps(record, sort_keys=True).encode())


def remove_part_records(work_dir: str | Path) -> None:
    """Delete the resume bookkeeping (part records) of a finished build before it is published."""
    for path in Path(work_dir).glob("part-*.json"):
        path.unlink()


def load_completed_parts(work_dir: str | Path) -> list[dict]:
    """The complete parts of an interrupted build in ``work_dir``, checked, in order; deletes the rest.

    A part counts when its record ``part-NNNNN.json`` parses, the records are numbered 0, 1, 2... without a gap, and
    its file (``part-NNNNN.arrow``, or ``shard-NNNNN-of-*.arrow`` when the build was killed while renaming) has the
    recorded size and sha256. The first part that fails ends the list: it and every later part, temp file and
    stray shard are deleted, so the build rewrites those rows.

    Returns:
        The part records ``{"index", "file", "rows", "answer_tokens", "bytes", "sha256"}``, files named
        ``part-NNNNN.arrow``.
    """
    work = Path(work_dir)
    records: dict[int, Path] = {}
    for path in work.glob("part-*.json"):
        m = _PART_RE.match(path.name)
        if m:
            records[int(m.group(1))] = path
    good: list[dict] = []
    for index in range(len(records) + 1):
        if index not in records:
            break
        record = _read_record(records[index], index)
        if record is None:
            break
        candidates = [work / f"{part_name(index)}.arrow", *sorted(work.glob(f"shard-{index:05d}-of-*.arrow"))]
        found = next((c for c in candidates if _matches(c, record)), None)
        if found is None:
            log.warning("%s: part %d does not match its record (missing or corrupt); rewriting it", work, index)
            break
        target = work / f"{part_name(index)}.arrow"
        if found != target:
            os.replace(found, target)
        good.append({**record, "file": target.name})
    keep = {p["file"] for p in good} | {f"{part_name(p['index'])}.json" for p in good}
    for path in work.iterdir():
        is_part = path.name.startswith(("part-", "shard-")) or path.name.endswith(".tmp")
        if is_part and path.name not in keep and path.is_file():
            path.unlink()
    fsync_dir(work)
    return good


def _read_record(path: Path, index: int) -> dict | None:
    """The part record at ``path`` if it is whole and is part ``index``'s, else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    want = {"index": int, "file": str, "rows": int, "answer_tokens": int, "bytes": int, "sha256": str}
    if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in want.items()):
        return None
    if record["index"] != index or record["rows"] < 1:
        return None
    return record


def _matches(path: Path, record: dict) -> bool:
    """Whether ``path`` is a file with the record's size and sha256."""
    try:
        return path.is_file() and path.stat().st_size == record["bytes"] and file_sha256(path) == record["sha256"]
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# the build state


def write_build_state(work_dir: str | Path, state: dict) -> None:
    """Record ``state`` (JSON-serializable settings) in the work directory, atomically and durably."""
    write_atomic(Path(work_dir) / STATE_NAME, (canonical_json(state) + "\n").encode())


def read_build_state(work_dir: str | Path) -> dict | None:
    """The recorded state, or None when there is none or it is unreadable (a build killed before writing it)."""
    try:
        state = json.loads((Path(work_dir) / STATE_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _flatten(value, prefix: str = "") -> dict[str, object]:
    """{"teacher": {"name": "a"}, "k": 8} -> {"teacher.name": "a", "k": 8}."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, object] = {}
    for key in sorted(value):
        out.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
    if not value and prefix:
        out[prefix] = {}
    return out


def state_differences(recorded: dict, current: dict) -> list[str]:
    """Dotted names of the fields whose values differ (or exist on one side only), sorted."""
    a, b = _flatten(recorded), _flatten(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def check_build_state(work_dir: str | Path, current: dict) -> None:
    """Refuse to resume ``work_dir`` with settings other than those it was started with.

    Raises:
        ConfigError: the recorded state is missing, or differs; the message names every differing field with
            both values.
    """
    recorded = read_build_state(work_dir)
    if recorded is None:
        raise ConfigError(
            f"--resume: {work_dir} has no readable {STATE_NAME}, so its settings are unknown; "
            "pass --overwrite to discard it and start over"
        )
    diffs = state_differences(recorded, current)
    if len(diffs) > 1:  # the config fingerprint is derived from the fields: name those
        diffs = [d for d in diffs if d != "config_fingerprint"]
    if diffs:
        a, b = _flatten(recorded), _flatten(current)
        shown = "; ".join(f"{k}: {a.get(k, '<absent>')!r} then, {b.get(k, '<absent>')!r} now" for k in diffs[:5])
        raise ConfigError(
            f"--resume: {work_dir} was started with different settings ({shown}); rerun with the same "
            "settings, or pass --overwrite to discard the interrupted build"
        )
