"""HumanEval on top of the sandbox: problems, stop sequences, the program, and pass@1 of the embedded teacher."""

from __future__ import annotations

import pytest

from fusion_cache.eval.humaneval import STOP_SEQUENCES
from fusion_cache.eval.humaneval import evaluate_humaneval
from fusion_cache.eval.humaneval import extract_code
from fusion_cache.eval.humaneval import load_problems
from fusion_cache.eval.humaneval import run_problem
from fusion_cache.eval.humaneval import truncate_completion


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
    assert run_problem(p, cut).passed


def test_chat_answers_run_their_first_code_block():
    p = load_problems(1)[0]
    full = p["prompt"] + p["canonical_solution"]
    answer = f"Here it is:\n```python\n{full}```\nIt compares every pair.\n```python\nprint(1)\n```"
    code = extract_code(p, answer)
    assert code.startswith("\n") and "print(1)" not in code and "It compares" not in code
    assert run_problem(p, code).passed  # the whole function replaces the stub
    body = extract_code(p, f"```\n{p['canonical_solution']}```")
    assert body == p["canonical_solution"] and run_problem(p, body).passed  # a body continues it
    assert not run_problem(p, extract_code(p, "I cannot help with that.")).passed


def test_canonical_solutions_pass_and_wrong_ones_fail():
    for p in load_problems(5) + [load_problems(34)[33]]:  # HumanEval/33's tests name the function itself
        r = run_problem(p, p["canonical_solution"])
        assert r.passed and r.status == "passed", (p["task_id"], r.output)
        wrong = run_problem(p, "    return None\n")
        assert not wrong.passed and wrong.status == "failed" and "Error" in wrong.output, p["task_id"]


# Wrong programs written to be scored as passed; each worked against the sentinel harness or a shared process.
CHEATS = {
    # read the pass sentinel from its own source and print it, then leave before the tests
    "sentinel": "    import os, re, sys\n    src = open(sys.argv[0] if sys.argv[0] else __file__).read()\n"
    "    print(*re.findall('__fusion_cache_done_[0-9a-f]+__', src))\n    os._exit(0)\n",
    # exit 0 as the module is defined, before any test runs
    "early exit": "    pass\nimport os\nos._exit(0)\n",
    # an answer that equals everything
    "equal to all": "    class Any:\n        def __eq__(self, other):\n            return True\n    return Any()\n",
    # make every failed assertion a success at exit
    "atexit": "    return None\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_the_verdict_cannot_be_forged(cheat):
    p = load_problems(1)[0]
    r = run_problem(p, CHEATS[cheat])
    assert not r.passed and r.status == "failed", r.output


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
