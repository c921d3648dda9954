"""Input rows: formats, normalization, and errors that name the file, the line, the field and the value."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_cache.capture.inputs import dataset_hash
from fusion_cache.capture.inputs import read_conversations
from fusion_cache.errors import DataError


def test_prompt_response_and_messages_normalize(tmp_path, write_jsonl):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"prompt": "p", "response": "r", "system": "s"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        ],
    )
    convs = list(read_conversations(path))
    assert [m["role"] for m in convs[0].messages] == ["system", "user", "assistant"]
    assert convs[1].response == "a" and convs[1].row_index == 1
    assert len(convs[0].sample_id) == 32 and convs[0].sample_id != convs[1].sample_id


def test_sample_id_is_stable_and_content_based(tmp_path, write_jsonl):
    a = list(read_conversations(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])))[0]
    b = list(read_conversations(write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "response": "y"}, a_row()])))[1]
    assert a.sample_id == b.sample_id  # the same content has the same id, wherever it sits
    c = list(read_conversations(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "response": "r!"}])))[0]
    assert c.sample_id != a.sample_id


def a_row():
    return {"prompt": "p", "response": "r"}


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"prompt": "p", "response": ', r"bad\.jsonl:2: malformed JSON"),
        ('["a list"]', r"bad\.jsonl:2: a row must be a JSON object"),
        (
            '{"question": "q", "answer": "a"}',
            r"bad\.jsonl:2: row has neither 'messages', 'prompt'\+'response' nor 'text'.*question.*--data-fields",
        ),
        ('{"prompt": 3, "response": "r"}', r"bad\.jsonl:2: field 'prompt' must be a string, got 3"),
        ('{"messages": []}', r"bad\.jsonl:2: field 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r"messages\[0\]\.role must be one of .* got 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"bad\.jsonl:2: the last message must be the answer"),
        ('{"messages": [{"role": "user", "content": null}]}', r"messages\[0\]\.content must be a string, got None"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "response": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=pattern):
        list(read_conversations(path))


def test_parquet_gz_and_datasets_dir(tmp_path):
    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hfdir"))
    for src in ("d.parquet", "d.jsonl.gz", "hfdir"):
        convs = list(read_conversations(tmp_path / src))
        assert [c.response for c in convs] == ["r1", "r2"], src
    assert dataset_hash(tmp_path / "d.parquet") != dataset_hash(tmp_path / "d.jsonl.gz")


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_conversations(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported input"):
        list(read_conversations(tmp_path / "x.csv"))
