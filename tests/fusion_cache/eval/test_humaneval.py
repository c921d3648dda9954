"""HumanEval on top of the sandbox: problems, stop sequences, the program, and pass@1 of the embedded teacher."""

from __future__ import annotations

import pytest

from fusion_cache.eval.humaneval import STOP_SEQUENCES
from fusion_cache.eval.humaneval import evaluate_humaneval
from fusion_cache.eval.humaneval import extract_code
from fusion_cache.eval.humaneval import load_problems
from fusion_cache.eval.humaneval import program
from fusion_cache.eval.humaneval import truncate_completion
from fusion_cache.eval.sandbox import run_program


def test_problems_ship_with_the_package():
    problems = load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert [p["task_id"] for p in load_problems(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_completion_is_cut_at_the_first_stop_sequence():
    body = "    return x + 1\n"
    assert truncate_completion(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert truncate_completion(body + "\nif __name__ == '__main__':\n    f(1)\n") == body
    assert truncate_completion(body) == body and "\nprint" in STOP_SEQUENCES
    p = load_problems(1)[0]
    cut = truncate_completion(p["canonical_solution"] + "\nprint(has_close_elements([], 1.0))\n")
    assert run_program(program(p, cut)).passed


def test_chat_answers_run_their_first_code_block():
    p = load_problems(1)[0]
    full = p["prompt"] + p["canonical_solution"]
    answer = f"Here it is:\n```python\n{full}```\nIt compares every pair.\n```python\nprint(1)\n```"
    code = extract_code(p, answer)
    assert code.startswith("\n") and "print(1)" not in code and "It compares" not in code
    assert run_program(program(p, code)).passed  # the whole function replaces the stub
    body = extract_code(p, f"```\n{p['canonical_solution']}```")
    assert body == p["canonical_solution"] and run_program(program(p, body)).passed  # a body continues it
    assert not run_program(program(p, extract_code(p, "I cannot help with that."))).passed


@pytest.mark.slow
def test_pass_at_1_of_the_embedded_teacher():
    """Real greedy completions of SmolLM2-135M-Instruct on 2 problems, executed in the sandbox."""
    from fusion_cache.models.load import load_student

    model, tok, _ = load_student("smollm2-135m")
    seen = []
    r = evaluate_humaneval(model, tok, limit=2, max_new_tokens=64, on_problem=lambda i, rec: seen.append(i))
    assert r["problems"] == 2 and seen == [0, 1] and 0.0 <= r["pass@1"] <= 1.0
    assert r["passed"] == sum(x["passed"] for x in r["results"])
    assert all(x["status"] in ("passed", "failed", "timeout") or x["status"].startswith("killed") for x in r["results"])
    assert all(not any(s in x["completion"] for s in STOP_SEQUENCES) for x in r["results"])
