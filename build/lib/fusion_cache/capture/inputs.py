"""Input rows for a build: JSONL (optionally .gz), Parquet, or a saved HF `datasets` directory.

A row holds either ``messages`` (a chat: a list of {"role", "content"} whose last message is the assistant's
answer) or ``prompt`` + ``response`` (optionally ``system``). Rows are validated before any model runs, and every
error names the file, the 1-based line (row) and the field, with the value.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fusion_cache.cache.fingerprint import canonical_json
from fusion_cache.errors import DataError

ROLES = ("system", "user", "assistant")


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


def iter_raw_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row dict) from a JSONL / JSONL.gz / Parquet file or a `datasets` directory.

    Raises:
        DataError: unreadable file, malformed JSON line, or a row that is not an object.
    """
    p = Path(path)
    source = str(path)
    if not p.exists():
        raise DataError(source, None, "no such file or directory")
    if p.is_dir():
        yield from _iter_hf_dir(p)
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


def _iter_hf_dir(p: Path) -> Iterator[tuple[int, dict]]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(str(p), None, f"not a saved `datasets` dataset: {e}") from e
    if hasattr(ds, "keys"):  # a DatasetDict: take the train split, else the only one
        splits = list(ds.keys())
        ds = ds["train"] if "train" in splits else ds[splits[0]]
    for i, row in enumerate(ds):
        yield i + 1, row


def normalize_row(row: dict, *, source: str, line: int, row_index: int) -> Conversation:
    """Validate one raw row and turn it into a Conversation (the response may be empty; callers count those).

    Raises:
        DataError: naming the field and the value.
    """
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
    raise DataError(source, line, f"row has neither 'messages' nor 'prompt'+'response' (fields present: {keys})")


def read_conversations(path: str | Path) -> Iterator[Conversation]:
    """Normalized conversations of a file, in order (row_index counts every non-blank row)."""
    for i, (line, row) in enumerate(iter_raw_rows(path)):
        yield normalize_row(row, source=str(path), line=line, row_index=i)


def dataset_hash(path: str | Path) -> str:
    """sha256 of the input's bytes (all data files of a directory, in sorted order, with their relative names)."""
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
