"""Deterministic fingerprints: sha256 over canonical JSON (sorted keys, no whitespace, no floats' repr games).

Two fingerprints describe a cache:
- ``config_fingerprint``: everything that decides what a build computes (schema version, teacher and revision,
  tokenizer hash, dataset hash, K, codec, engine, dtype, length policy). Same settings, same value: a build into a
  directory holding another config fingerprint is refused.
- ``fingerprint``: ``config_fingerprint`` chained with every shard's name, row count and sha256, so any change to
  any byte of any shard changes it.
Never falls back to a random value: what cannot be serialized raises FingerprintError.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from fusion_cache.errors import FingerprintError

_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces; raises FingerprintError for values JSON cannot represent exactly."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FingerprintError(f"cannot fingerprint {value!r}: {e}") from e


def hash_json(value: Any) -> str:
    """sha256 hex of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def config_fingerprint(settings: dict) -> str:
    """Fingerprint of the build settings (see module docstring)."""
    return hash_json({"kind": "fusion-cache/config", **settings})


def chain_fingerprint(config_fp: str, shards: list[dict]) -> str:
    """Fingerprint of a whole cache: the config fingerprint chained with each shard's (path, rows, sha256)."""
    validate_fingerprint(config_fp)
    entries = [[s["path"], int(s["rows"]), s["sha256"]] for s in shards]
    return hash_json({"kind": "fusion-cache/cache", "config": config_fp, "shards": entries})


def validate_fingerprint(fp: object, what: str = "fingerprint") -> str:
    """Raise FingerprintError unless ``fp`` is 64 lowercase hex characters."""
    if not isinstance(fp, str) or not _FINGERPRINT_RE.match(fp):
        raise FingerprintError(f"{what} must be 64 lowercase hex characters, got {fp!r}")
    return fp


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 hex of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
