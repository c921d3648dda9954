"""Rows of other shapes: a field and role mapping (ShareGPT's conversations/from/value), plain-text rows (all
answer), a directory of data files, the split of a saved dataset, Hub ids told apart from paths, and a format that
changes the dataset hash."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.inputs import RowFormat
from fusion_cache.capture.inputs import dataset_hash
from fusion_cache.capture.inputs import is_hub_dataset
from fusion_cache.capture.inputs import read_conversations
from fusion_cache.capture.render import render
from fusion_cache.errors import ConfigError
from fusion_cache.errors import DataError

SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
SHAREGPT_FORMAT = RowFormat(fields={"messages": "conversations", "role": "from", "content": "value"},
                            roles={"human": "user", "gpt": "assistant"})  # fmt: skip


def test_a_field_and_role_mapping_reads_sharegpt_rows(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT])
    (conv,) = read_conversations(path, SHAREGPT_FORMAT)
    assert conv.messages == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"})
    with pytest.raises(DataError, match="--data-fields maps other names"):
        list(read_conversations(path))
    assert dataset_hash(path, SHAREGPT_FORMAT) != dataset_hash(path)


def test_a_mapping_is_checked_by_the_build_config():
    with pytest.raises(ConfigError, match=r"data_fields: unknown field\(s\) \['convo'\]"):
        BuildConfig.create(teacher="t", data="d", out="o", data_fields={"convo": "x"})
    with pytest.raises(ConfigError, match=r"data_roles: values must be roles"):
        BuildConfig.create(teacher="t", data="d", out="o", data_roles={"gpt": "bot"})


def test_a_text_row_is_all_answer(tmp_path, write_jsonl, tiny_model_dir):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "def add(a, b):\n    return a + b\n"}])
    (conv,) = read_conversations(path)
    assert conv.messages == ({"role": "assistant", "content": "def add(a, b):\n    return a + b\n"},)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    r = render(tok, conv.messages, chat_template=True)  # a chat model too renders it as plain text
    assert r.answer_start <= 1 and len(r.input_ids) - r.answer_start >= 5
    assert "return a + b" in tok.decode(r.input_ids[r.answer_start :])


def test_a_directory_of_data_files_and_a_saved_datasets_split(tmp_path, write_jsonl):
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "a", "response": "b"}, {"text": "plain"}])
    assert len(list(read_conversations(folder))) == 2
    from datasets import Dataset
    from datasets import DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list([{"prompt": "p", "response": "r"}]),
                 "test": Dataset.from_list([{"prompt": "p2", "response": "r2"}] * 2)}).save_to_disk(saved)  # fmt: skip
    assert len(list(read_conversations(saved))) == 1
    assert len(list(read_conversations(saved, RowFormat(split="test")))) == 2
    with pytest.raises(DataError, match=r"no split 'dev'"):
        list(read_conversations(saved, RowFormat(split="dev")))


def test_hub_ids_are_told_apart_from_paths(tmp_path):
    assert is_hub_dataset("openai/openai_humaneval") and not is_hub_dataset(str(tmp_path))
    assert not is_hub_dataset("rows.jsonl") and not is_hub_dataset("./a/b/c")
