"""manifest.json: what a cache is, how it was made, and how to check it.

The manifest is untrusted input when a cache comes from elsewhere, so loading validates every field (pydantic,
unknown keys refused), every shard path (a plain file name inside the cache directory), the schema version and the
fingerprint chain, and raises ShardFormatError / FingerprintError naming the problem.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError
from pydantic import field_validator

from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.fingerprint import chain_fingerprint
from fusion_cache.cache.fingerprint import validate_fingerprint
from fusion_cache.cache.schema import FORMAT_NAME
from fusion_cache.cache.schema import READABLE_SCHEMA_VERSIONS
from fusion_cache.errors import FingerprintError
from fusion_cache.errors import ShardFormatError

MANIFEST_NAME = "manifest.json"
# A shard of a combined cache lives in its part's directory: "part-00001-of-00004/shard-00000-of-00002.arrow".
PART_DIR_RE = re.compile(r"^part-(\d{5})-of-(\d{5})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherInfo(_Strict):
    name: str  # preset name, or the model path / HF id as given
    model: str  # the path or HF id actually loaded
    revision: str | None = None  # package version + weights hash, commit, or None when unknown
    tokenizer_hash: str  # sha256 of the tokenizer definition + chat template
    chat_template: bool  # rendered with the tokenizer's chat template (False: plain text)
    engine: str  # "vllm" or "hf"
    dtype: str  # dtype the teacher ran in


class DatasetInfo(_Strict):
    source: str  # the --data argument
    hash: str  # sha256 of the input's bytes
    rows_read: int = Field(ge=0)


class ShardInfo(_Strict):
    path: str  # file name inside the cache directory
    rows: int = Field(ge=0)
    answer_tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _plain_file_name(cls, v: str) -> str:
        # A shard path is a bare file name, or "<part dir>/<bare file name>" in a combined cache: no other
        # directories, no "..", nothing absolute (path traversal).
        head, sep, name = v.rpartition("/")
        if sep and not PART_DIR_RE.match(head):
            raise ValueError(f"shard path must be a plain file name (or part-NNNNN-of-NNNNN/<file name>), got {v!r}")
        if not name or name != os.path.basename(name) or name in (".", "..") or "\\" in name:
            raise ValueError(f"shard path must be a plain file name inside the cache, got {v!r}")
        if not v.endswith(".arrow"):
            raise ValueError(f"shard path must end with .arrow, got {v!r}")
        return v


class BuildStats(_Strict):
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    answer_tokens: int = Field(ge=0)
    skipped: dict[str, int]  # reason -> count (empty_response, overlong, answer_truncated_away)
    truncated: int = Field(ge=0)
    payload_bytes: int = Field(ge=0)  # bytes of all shard files
    wall_seconds: float = Field(ge=0)


class PartInfo(_Strict):
    """This cache is part ``index`` of ``count`` of a distributed build (`--num-shards` / `--shard-index`)."""

    index: int = Field(ge=0)
    count: int = Field(ge=2)
    row_start: int = Field(ge=0)  # it holds the input rows with row_start <= position < row_end (after --limit)
    row_end: int = Field(ge=0)


class CombinedPart(_Strict):
    """One part of a combined cache: its directory, its input rows, and its own manifest's fingerprint."""

    path: str  # part-NNNNN-of-NNNNN
    index: int = Field(ge=0)
    row_start: int = Field(ge=0)
    row_end: int = Field(ge=0)
    rows: int = Field(ge=0)
    shards: int = Field(ge=0)
    fingerprint: str

    @field_validator("path")
    @classmethod
    def _part_dir(cls, v: str) -> str:
        if not PART_DIR_RE.match(v):
            raise ValueError(f"part path must be part-NNNNN-of-NNNNN, got {v!r}")
        return v


class Manifest(_Strict):
    format: str = FORMAT_NAME
    schema_version: int
    fusion_cache_version: str
    created_at: str
    teacher: TeacherInfo
    dataset: DatasetInfo
    k: int = Field(ge=1)
    codec: dict  # {"name": "raw", ...codec parameters}
    max_length: int = Field(ge=2)
    overlong: str
    stats: BuildStats
    shards: list[ShardInfo]
    config_fingerprint: str
    fingerprint: str
    part: PartInfo | None = None  # set in the cache of one part of a distributed build
    parts: list[CombinedPart] | None = None  # set in a combined cache: every part, in order

    @property
    def bytes_per_answer_token(self) -> float:
        return self.stats.payload_bytes / max(1, self.stats.answer_tokens)

    def write(self, directory: str | Path) -> Path:
        """Write manifest.json atomically (temp file + rename)."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_name(f"{MANIFEST_NAME}.{os.getpid()}.tmp")  # per process: parts may combine at once
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    def to_json(self) -> str:
        """The manifest's JSON text; ``part`` / ``parts`` appear only when set (a plain cache is unchanged)."""
        data = self.model_dump()
        for key in ("part", "parts"):
            if data[key] is None:
                del data[key]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def load_manifest(directory) -> Manifest:
    """Read and validate ``<directory>/manifest.json`` (a path, an fsspec URL, or a CacheLocation).

    Raises:
        ShardFormatError: missing or malformed manifest, unknown format/schema version/codec, bad shard paths.
        FingerprintError: the recorded fingerprint does not match the recorded shards.
    """
    from fusion_cache.cache.storage import CacheLocation

    loc = directory if isinstance(directory, CacheLocation) else CacheLocation(str(directory))
    path = loc.join(MANIFEST_NAME) if not loc.local else Path(loc.join(MANIFEST_NAME))
    try:
        present = loc.exists(MANIFEST_NAME)
    except OSError as e:
        raise ShardFormatError(f"{directory}: cannot be read: {e}") from e
    if not present:
        raise ShardFormatError(f"{directory}: not a fusion-cache directory (no {MANIFEST_NAME})")
    try:
        raw = json.loads(loc.read_bytes(MANIFEST_NAME).decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{path}: manifest must be a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{path}: format must be {FORMAT_NAME!r}, got {raw.get('format')!r}")
    if raw.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ShardFormatError(
            f"{path}: schema_version {raw.get('schema_version')!r} is not supported by this fusion-cache "
            f"(it reads versions {list(READABLE_SCHEMA_VERSIONS)}); upgrade fusion-cache or rebuild the cache"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ShardFormatError(f"{path}: invalid manifest: {problems}") from None
    codec = parse_codec(manifest.codec, str(path), manifest.schema_version)  # each version's codecs and keys
    if manifest.k < 2 and codec.name != "raw":
        raise ShardFormatError(f"{path}: codec {codec.name!r} needs K >= 2, got K={manifest.k}")
    validate_fingerprint(manifest.config_fingerprint, "config_fingerprint")
    validate_fingerprint(manifest.fingerprint, "fingerprint")
    expected = chain_fingerprint(manifest.config_fingerprint, [s.model_dump() for s in manifest.shards])
    if expected != manifest.fingerprint:
        raise FingerprintError(
            f"{path}: fingerprint {manifest.fingerprint} does not match its shards (expected {expected}); "
            "the manifest was edited or is corrupt"
        )
    return manifest
