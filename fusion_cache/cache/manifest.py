"""manifest.json: what a cache is, how it was made, and how to check it.

The manifest is untrusted input when a cache comes from elsewhere, so loading validates every field (pydantic,
unknown keys refused), every shard path (a plain file name inside the cache directory, listed once), the schema
version and both fingerprints, and raises ShardFormatError / FingerprintError naming the problem. Anyone can reseal
an edited manifest (the formulas are public), so loading also recomputes what the manifest's fields imply:

- ``config_fingerprint`` from the fields it covers (`config_settings`: the teacher block but ``model``, the dataset
  hash and rows read, K, the codec, the length policy, the schema version, ``meta``): an edited
  ``teacher.tokenizer_hash`` or ``teacher.vocab_size`` no longer matches it;
- ``fingerprint`` from ``config_fingerprint`` and the shard list (path, rows, sha256);
- ``stats`` from the shard list (rows, answer tokens, bytes) and from the input rows (kept + skipped = read).

What is left is recomputed from the shards as they are read (cache/validate.py): each shard's size, sha256, rows and
answer tokens, and the total tokens. The remaining fields (``created_at``, ``fusion_cache_version``,
``dataset.source``, ``teacher.model``, ``stats.wall_seconds``, and the card's ``license``, ``answers`` and
``content``) are informational: nothing reads them to decide anything. ``meta``, a team's own fields, is covered by
``config_fingerprint`` (when present: a cache without it hashes as before it existed).
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
from fusion_cache.cache.fingerprint import config_fingerprint
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
    # largest token id the teacher can emit + 1 (its output size); None in caches written before it was recorded:
    # readers then bound ids by the codec (`cache.validate.ContentRules`)
    vocab_size: int | None = Field(None, ge=1)


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
    # full layout 4 (schema version 4): the shard's id order {"runs", "count", "zstd_b64"} (codecs/ids.py), which
    # its rows name by content hash; not in the fingerprint's formula, but pinned by the shard's sha256 (section 1.2)
    id_order: dict | None = None

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


# A team's own fields: small enough to read in a card and to hash with the config (canonical JSON bytes).
META_MAX_BYTES = 16384


class Answers(_Strict):
    """How the answers of the input rows were made: a dataset's own, or sampled by `fusion-cache generate`."""

    source: str  # "dataset" or "generate"
    model: str | None = None  # generate: the model that answered (name, no local path)
    revision: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None  # answers per prompt
    seed: int | None = None
    max_new_tokens: int | None = None


class ContentStats(_Strict):
    """What the teacher's top-K looks like, over every answer token written (percentiles p10/p50/p90)."""

    top1_prob: list[float]  # probability of the teacher's first choice
    topk_mass: list[float]  # probability mass the K kept tokens hold
    entropy: list[float]  # entropy (nats) of the top-K, renormalized
    exact: bool = True  # False in a combined cache: each the answer-token-weighted mean of its parts' percentiles


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
    # the card's fields (cache/card.py); absent in caches written before them. Only ``meta`` is fingerprinted.
    license: str | None = None  # the teacher's license or terms of use (its preset's, or `build --license`)
    answers: Answers | None = None
    content: ContentStats | None = None
    meta: dict | None = None  # a team's own fields (`build --meta key=value`), covered by config_fingerprint

    @field_validator("meta")
    @classmethod
    def _bounded_meta(cls, v: dict | None) -> dict | None:
        if v is not None:
            check_meta(v)
        return v

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
        """The manifest's JSON text; ``part`` / ``parts`` / ``teacher.vocab_size`` appear only when set (a cache
        written before them reads and writes back unchanged)."""
        data = self.model_dump()
        for key in ("part", "parts", "license", "answers", "content", "meta"):
            if data[key] is None:
                del data[key]
        if data["teacher"]["vocab_size"] is None:
            del data["teacher"]["vocab_size"]
        for shard in data["shards"]:
            if shard["id_order"] is None:
                del shard["id_order"]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def expected_input_rows(self) -> int:
        """Input rows this cache accounts for (kept + skipped): its part's range, or every row read."""
        if self.part is not None:
            return self.part.row_end - self.part.row_start
        return self.dataset.rows_read


def config_settings(
    *,
    schema_version: int,
    teacher: dict,
    dataset_hash: str,
    rows_read: int,
    k: int,
    codec: dict,
    max_length: int,
    overlong: str,
    meta: dict | None = None,
) -> dict:
    """What ``config_fingerprint`` hashes (docs/cache-format.md, "Fingerprints"): the build writes it, a reader
    recomputes it from the manifest. The teacher block goes in without ``model`` (a machine-specific path) and
    without a ``vocab_size`` of None (caches written before it was recorded hash as they did); ``meta`` goes in only
    when set, so a cache without it keeps its fingerprint."""
    teacher = {key: v for key, v in teacher.items() if key != "model" and not (key == "vocab_size" and v is None)}
    extra = {} if meta is None else {"meta": meta}
    return {
        **extra,
        "schema_version": schema_version,
        # the resolved path is machine-specific (a home directory): the name and revision identify the weights
        "teacher": teacher,
        "dataset_hash": dataset_hash,
        "rows_read": rows_read,
        "k": k,
        "codec": codec,
        "max_length": max_length,
        "overlong": overlong,
    }


def manifest_settings(manifest: Manifest) -> dict:
    """`config_settings` of a loaded manifest."""
    return json_settings(manifest.model_dump())


def json_settings(m: dict) -> dict:
    """`config_settings` of a manifest's JSON as written (``manifest.json`` read with `json.load`, or edited)."""
    return config_settings(
        schema_version=m["schema_version"],
        teacher=m["teacher"],
        dataset_hash=m["dataset"]["hash"],
        rows_read=m["dataset"]["rows_read"],
        k=m["k"],
        codec=m["codec"],
        max_length=m["max_length"],
        overlong=m["overlong"],
        meta=m.get("meta"),
    )


def check_meta(meta: object) -> dict:
    """``meta`` if it is a JSON object of at most `META_MAX_BYTES` canonical bytes, else ValueError naming it."""
    from fusion_cache.cache.fingerprint import canonical_json

    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise ValueError(f"meta must be a JSON object with string keys, got {meta!r:.80}")
    size = len(canonical_json(meta).encode())
    if size > META_MAX_BYTES:
        raise ValueError(f"meta is {size} bytes of JSON; at most {META_MAX_BYTES} fit a manifest")
    return meta


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
    needs_order = "id_order" in codec.shard_entry_fields()  # full layout 4: every entry has its id order
    for s in manifest.shards:
        if (s.id_order is not None) != needs_order:
            state, verb = ("lacks", "needs") if needs_order else ("has", "does not have")
            raise ShardFormatError(f"{path}: shards: {s.path} {state} 'id_order', which codec {manifest.codec} {verb}")
    validate_fingerprint(manifest.config_fingerprint, "config_fingerprint")
    validate_fingerprint(manifest.fingerprint, "fingerprint")
    expected = config_fingerprint(manifest_settings(manifest))
    if expected != manifest.config_fingerprint:
        raise FingerprintError(
            f"{path}: config_fingerprint {manifest.config_fingerprint} does not match the manifest's teacher, dataset, "
            f"k, codec, max_length, overlong and meta (expected {expected}); the manifest was edited or is corrupt"
        )
    expected = chain_fingerprint(manifest.config_fingerprint, [s.model_dump() for s in manifest.shards])
    if expected != manifest.fingerprint:
        raise FingerprintError(
            f"{path}: fingerprint {manifest.fingerprint} does not match its shards (expected {expected}); "
            "the manifest was edited or is corrupt"
        )
    problem = manifest_problem(manifest)
    if problem is not None:
        raise ShardFormatError(f"{path}: {problem}")
    return manifest


def manifest_problem(m: Manifest) -> str | None:
    """The first field of ``m`` that contradicts the others (stats against the shard list, counts against the
    length policy, a shard listed twice), or None. Everything here is recomputed, not trusted."""
    seen = set()
    for s in m.shards:
        if s.path in seen:
            return f"shards: {s.path!r} is listed twice"
        seen.add(s.path)
        if s.rows > s.answer_tokens or s.answer_tokens > s.rows * m.max_length:
            return (
                f"shards: {s.path} has {s.rows} rows and {s.answer_tokens} answer tokens; every row has 1 to "
                f"max_length={m.max_length} of them"
            )
    st = m.stats
    for name, value, recomputed in (
        ("rows", st.rows, sum(s.rows for s in m.shards)),
        ("answer_tokens", st.answer_tokens, sum(s.answer_tokens for s in m.shards)),
        ("payload_bytes", st.payload_bytes, sum(s.bytes for s in m.shards)),
    ):
        if value != recomputed:
            return f"stats.{name}={value}, but the shards listed hold {recomputed}"
    if not st.answer_tokens <= st.tokens <= st.rows * m.max_length:
        return (
            f"stats.tokens={st.tokens} is impossible for {st.rows} rows of {st.answer_tokens} answer tokens "
            f"and max_length={m.max_length}"
        )
    bad = {reason: n for reason, n in st.skipped.items() if n < 0}
    if bad:
        return f"stats.skipped: negative counts {bad}"
    accounted = st.rows + sum(st.skipped.values())
    if accounted != m.expected_input_rows():
        return (
            f"stats.rows={st.rows} plus stats.skipped={sum(st.skipped.values())} is {accounted} input rows, but the "
            f"cache covers {m.expected_input_rows()} (dataset.rows_read={m.dataset.rows_read}, part={m.part})"
        )
    if st.truncated > st.rows:
        return f"stats.truncated={st.truncated} exceeds stats.rows={st.rows}"
    if m.part is not None and not m.part.row_start <= m.part.row_end <= m.dataset.rows_read:
        return f"part: rows {m.part.row_start}..{m.part.row_end} are not within the {m.dataset.rows_read} read"
    if m.parts is not None:
        if sum(p.rows for p in m.parts) != st.rows or sum(p.shards for p in m.parts) != len(m.shards):
            return "parts: their rows and shards do not add up to the manifest's"
        ends = [0] + [p.row_end for p in m.parts]
        if [p.row_start for p in m.parts] != ends[:-1] or ends[-1] != m.dataset.rows_read:
            return f"parts: their row ranges do not tile the {m.dataset.rows_read} input rows"
    return None
