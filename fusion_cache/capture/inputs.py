"""Input rows for a build: JSONL (optionally .gz), Parquet, a saved HF `datasets` directory, a directory of data
files, or a Hub dataset id (``org/name``, read with ``datasets.load_dataset``; ``split`` chooses the split).

A row holds ``messages`` (a chat: a list of {"role", "content"} whose last message is the assistant's answer),
``prompt`` + ``response`` (optionally ``system``), or ``text``: plain text that is all answer (distillation over
pretraining-style text; rendered without a chat template, see `fusion_cache.capture.render`). Rows of other shapes
are read through a `RowFormat`: ``fields`` names the row's own fields for these (axolotl's ``field_messages``, e.g.
``{"messages": "conversations", "role": "from", "content": "value"}`` for ShareGPT) and ``roles`` maps its role
names (``{"human": "user", "gpt": "assistant"}``). Rows are validated before any model runs, and every error names
the file, the 1-based line (row) and the field, with the value.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from fusion_cache.cache.fingerprint import canonical_json
from fusion_cache.errors import DataError

ROLES = ("system", "user", "assistant")
# The fields a row may have (`RowFormat.fields` maps them to a dataset's own names); role and content are the
# properties of each message of ``messages``.
ROW_FIELDS = ("messages", "prompt", "response", "system", "text", "role", "content")
_MESSAGE_PROPERTIES = ("role", "content")
# org/name: a Hub dataset id (read with datasets.load_dataset) when no such local path exists
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class RowFormat:
    """How to read rows of another shape, and which split of a dataset.

    Attributes:
        split: the split of a Hub dataset id or a datasets directory (None: ``train``, else the only one).
        fields: {one of ``ROW_FIELDS``: the row's own field name}.
        roles: {the row's role name: one of ``ROLES``}.
    """

    split: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        from fusion_cache.errors import ConfigError

        bad = sorted(set(self.fields) - set(ROW_FIELDS))
        if bad:
            raise ConfigError(f"data_fields: unknown field(s) {bad}; valid: {', '.join(ROW_FIELDS)}")
        bad = sorted(v for v in self.roles.values() if v not in ROLES)
        if bad:
            raise ConfigError(f"data_roles: values must be roles {list(ROLES)}, got {bad}")

    @property
    def is_default(self) -> bool:
        return self.split is None and not self.fields and not self.roles

    def apply(self, row: dict) -> dict:
        """``row`` with this format's fields under the standard names and its roles mapped."""
        if not self.fields and not self.roles:
            return row
        top = {k: v for k, v in self.fields.items() if k not in _MESSAGE_PROPERTIES}
        out = {k: v for k, v in row.items() if k not in top.values()}
        out.update({k: row[v] for k, v in top.items() if v in row})
        messages = out.get("messages")
        if isinstance(messages, list):
            role, content = (self.fields.get(k, k) for k in _MESSAGE_PROPERTIES)
            out["messages"] = [
                {"role": self.roles.get(m.get(role), m.get(role)), "content": m.get(content)}
                if isinstance(m, dict) else m
                for m in messages
            ]  # fmt: skip
        return out


@dataclass(frozen=True)
class Conversation:
    """A normalized sample: messages whose last entry is the assistant's answer.

    Attributes:
        row_index: 0-based index of the row in the input.
        messages: tuple of {"role", "content"} dicts.
    """

    row_index: int
    messages: tuple[dict, ...]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]

    @property
    def canonical(self) -> str:
        """Canonical JSON of the messages: what a cache stores and what sample ids hash."""
        return canonical_json([{"role": m["role"], "content": m["content"]} for m in self.messages])

    @property
    def sample_id(self) -> str:
        """Stable, teacher-independent id: blake2b-128 of the canonical conversation."""
        return hashlib.blake2b(self.canonical.encode(), digest_size=16).hexdigest()


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_hub_dataset(path: str | Path) -> bool:
    """Whether ``path`` names a Hub dataset (``org/name`` with no such local path)."""
    return not Path(path).exists() and bool(_HUB_ID.match(str(path)))


def iter_raw_rows(path: str | Path, split: str | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row dict) from a JSONL / JSONL.gz / Parquet file, a `datasets` directory, a directory of
    data files or a Hub dataset id (``split``: the split of the last three).

    Raises:
        DataError: unreadable file, malformed JSON line, or a row that is not an object.
    """
    p = Path(path)
    source = str(path)
    if is_hub_dataset(path):
        yield from _iter_load_dataset(source, split)
        return
    if not p.exists():
        raise DataError(source, None, "no such file or directory (nor a Hub dataset id org/name)")
    if p.is_dir():
        yield from (_iter_hf_dir(p, split) if _is_saved_dataset(p) else _iter_load_dataset(source, split))
        return
    name = p.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(source, None, f"not a readable Parquet file: {e}") from e
        for i, row in enumerate(table.to_pylist()):
            yield i + 1, row
        return
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".json")):
        raise DataError(source, None, "unsupported input: expected .jsonl, .jsonl.gz, .parquet or a datasets directory")
    opener = gzip.open if name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        source, line_no, f"malformed JSON ({e.msg} at column {e.colno}): {_short(line.strip())}"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(source, line_no, f"a row must be a JSON object, got {type(row).__name__}")
                yield line_no, row
        except UnicodeDecodeError as e:
            raise DataError(source, None, f"not UTF-8 text: {e}") from e


def _is_saved_dataset(p: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def _choose_split(ds, split: str | None, source: str):
    """The split of a DatasetDict: ``split``, else ``train``, else the only one."""
    if not hasattr(ds, "keys"):
        return ds
    splits = list(ds.keys())
    if split is not None:
        if split not in splits:
            raise DataError(source, None, f"no split {split!r}; the dataset has {splits}")
        return ds[split]
    return ds["train"] if "train" in splits else ds[splits[0]]


def _iter_hf_dir(p: Path, split: str | None = None) -> Iterator[tuple[int, dict]]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(str(p), None, f"not a saved `datasets` dataset: {e}") from e
    for i, row in enumerate(_choose_split(ds, split, str(p))):
        yield i + 1, row


def load_hub_dataset(source: str, split: str | None):
    """``datasets.load_dataset(source)``'s split (a Hub id, or a local directory of data files), downloaded into the
    datasets cache once.

    Raises:
        DataError: the dataset or the split does not exist or cannot be read (the message is the first line of
            the datasets library's).
    """
    from datasets import load_dataset

    try:
        ds = load_dataset(source)
    except Exception as e:  # DatasetNotFoundError, FileNotFoundError, ConnectionError, ValueError, ...
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DataError(source, None, f"cannot load it with datasets.load_dataset: {first}") from e
    return _choose_split(ds, split, source)


def _iter_load_dataset(source: str, split: str | None) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(load_hub_dataset(source, split)):
        yield i + 1, row


def normalize_row(row: dict, *, source: str, line: int, row_index: int) -> Conversation:
    """Validate one raw row and turn it into a Conversation (the response may be empty; callers count those).

    A ``text`` row becomes one assistant message with no prompt (`fusion_cache.capture.render` renders it as plain
    text, all of it answer).

    Raises:
        DataError: naming the field and the value.
    """
    # a dataset of mixed rows fills the fields a row lacks with None (datasets' columns): None is absent
    if row.get("text") is not None and row.get("messages") is None and row.get("prompt") is None:
        text = row["text"]
        if not isinstance(text, str):
            raise DataError(source, line, f"field 'text' must be a string, got {_short(text)}")
        return Conversation(row_index, ({"role": "assistant", "content": text},))
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(source, line, f"field 'messages' must be a non-empty list, got {_short(msgs)}")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(source, line, f"messages[{j}] must be an object with role and content, got {_short(m)}")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise DataError(source, line, f"messages[{j}].role must be one of {list(ROLES)}, got {_short(role)}")
            if not isinstance(content, str):
                raise DataError(source, line, f"messages[{j}].content must be a string, got {_short(content)}")
            out.append({"role": role, "content": content})
        if out[-1]["role"] != "assistant":
            raise DataError(
                source,
                line,
                f"the last message must be the answer (role 'assistant'), got role {out[-1]['role']!r}; "
                "add the response, or generate responses first",
            )
        if not any(m["role"] == "user" for m in out[:-1]):
            raise DataError(source, line, "messages has no 'user' message before the answer")
        return Conversation(row_index, tuple(out))
    if "prompt" in row and "response" in row:
        prompt, response = row["prompt"], row["response"]
        for field, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise DataError(source, line, f"field {field!r} must be a string, got {_short(value)}")
        if not prompt.strip():
            raise DataError(source, line, f"field 'prompt' is empty: {_short(prompt)}")
        msgs = []
        system = row.get("system")
        if system:
            if not isinstance(system, str):
                raise DataError(source, line, f"field 'system' must be a string, got {_short(system)}")
            msgs.append({"role": "system", "content": system})
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return Conversation(row_index, tuple(msgs))
    keys = sorted(row)
    raise DataError(
        source, line, f"row has neither 'messages', 'prompt'+'response' nor 'text' (fields present: {keys}); "
        "--data-fields maps other names"
    )  # fmt: skip


def read_conversations(path: str | Path, fmt: RowFormat | None = None) -> Iterator[Conversation]:
    """Normalized conversations of a file, in order (row_index counts every non-blank row)."""
    fmt = fmt or RowFormat()
    for i, (line, row) in enumerate(iter_raw_rows(path, fmt.split)):
        yield normalize_row(fmt.apply(row), source=str(path), line=line, row_index=i)


def dataset_hash(path: str | Path, fmt: RowFormat | None = None) -> str:
    """sha256 of the input's bytes (all data files of a directory, in sorted order, with their relative names); a
    Hub dataset's: of its id, split and the datasets library's fingerprint of its files. A non-default ``fmt`` is
    hashed in too (it changes the rows)."""
    fmt = fmt or RowFormat()
    base = _hub_hash(str(path), fmt.split) if is_hub_dataset(path) else _bytes_hash(path)
    if fmt.is_default:
        return base  # the hash of every cache built before formats existed
    return hashlib.sha256(canonical_json([base, fmt.split, fmt.fields, fmt.roles]).encode()).hexdigest()


def _hub_hash(source: str, split: str | None) -> str:
    ds = load_hub_dataset(source, split)
    return hashlib.sha256(canonical_json(["hub", source, split, ds._fingerprint]).encode()).hexdigest()


def _bytes_hash(path: str | Path) -> str:
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
