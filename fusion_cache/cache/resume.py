"""The settings of an interrupted build, kept in ``<out>.incomplete/build-state.json`` so `--resume` can check them.

A resumed build must compute exactly what the interrupted one would have: the same rows (teacher, data, K, codec,
length policy: the config fingerprint's settings) cut into the same shards (rows per shard, token budget per engine
call, which part of a distributed build). The state is one JSON object holding all of these (nested for the teacher
and codec); any difference is refused with an error that names the field, e.g. ``k`` or ``teacher.dtype``.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusion_cache.cache.fingerprint import canonical_json
from fusion_cache.errors import ConfigError

STATE_NAME = "build-state.json"


def write_build_state(work_dir: str | Path, state: dict) -> None:
    """Record ``state`` (JSON-serializable settings) in a fresh work directory, atomically."""
    path = Path(work_dir) / STATE_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(canonical_json(state) + "\n")
    tmp.replace(path)


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
