"""The testbed's generated data: correct gold answers, disjoint deterministic splits, rows the input reader takes."""

from __future__ import annotations

import json
import random
import re

import pytest

from fusion_cache.capture.inputs import read_conversations
from fusion_cache.recipes.testbed_data import CODE_FAMILIES
from fusion_cache.recipes.testbed_data import MATH_TEMPLATES
from fusion_cache.recipes.testbed_data import SIZES
from fusion_cache.recipes.testbed_data import check_disjoint
from fusion_cache.recipes.testbed_data import code_task
from fusion_cache.recipes.testbed_data import make_splits
from fusion_cache.recipes.testbed_data import math_row
from fusion_cache.recipes.testbed_data import write_splits

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def test_every_math_answer_is_worked_out_correctly():
    r = random.Random(0)
    for _ in range(2000):
        row = math_row(r)
        equations = EQUATION.findall(row["response"])
        assert equations, row
        for a, op, b, c in equations:
            assert OPS[op](int(a), int(b)) == int(c), row
        final = re.fullmatch(r".* The answer is (\d+)\.", row["response"])
        assert final and int(final[1]) == int(equations[-1][3]), row
        assert all(0 < int(x) < 10**6 for eq in equations for x in (eq[0], eq[2], eq[3])), row


def test_math_templates_all_occur_with_multi_digit_numbers():
    r = random.Random(1)
    seen = {t: 0 for t in MATH_TEMPLATES}
    for _ in range(400):
        t = r.choice(MATH_TEMPLATES)
        question, steps, answer = t(r)
        seen[t] += 1
        assert any(len(n) >= 3 for n in re.findall(r"\d+", " ".join(steps))), (question, steps)
    assert all(seen.values())


def _inputs(task, r: random.Random, n: int) -> list:
    return [task.make_input(r) for _ in range(n)]


def test_every_code_solution_matches_its_reference():
    r = random.Random(0)
    families = {f: 0 for f in CODE_FAMILIES}
    for _ in range(1500):
        family = r.choice(CODE_FAMILIES)
        families[family] += 1
        task = family(r)
        namespace: dict = {}
        exec(compile(task.solution, task.fn_name, "exec"), namespace)  # noqa: S102 (our own generated code)
        fn = namespace[task.fn_name]
        assert f"`{task.fn_name}(" in task.prompt and task.solution.startswith(f"def {task.fn_name}(")
        for arg in _inputs(task, r, 20):
            assert fn(list(arg) if isinstance(arg, list) else arg) == task.reference(arg), (task.prompt, arg)
    assert all(families.values())


def test_code_task_is_seeded():
    a, b = code_task(random.Random(7)), code_task(random.Random(7))
    assert (a.prompt, a.solution) == (b.prompt, b.solution)


def test_splits_are_deterministic_disjoint_and_mixed():
    sizes = SIZES["small"]
    splits = make_splits(sizes, seed=3)
    assert splits == make_splits(sizes, seed=3)
    assert splits != make_splits(sizes, seed=4)
    assert len(splits["train"]) == sizes.train and len(splits["heldout"]) == sizes.heldout
    assert [r["domain"] for r in splits["train"][:4]] == ["math", "code", "math", "code"]
    assert splits["heldout-math"] + splits["heldout-code"] == sorted(
        splits["heldout"], key=lambda r: r["domain"] == "code"
    )
    assert {r["domain"] for r in splits["pretrain-math"]} == {"math"}
    prompts = [{r["prompt"] for r in splits[s]} for s in ("heldout", "validation", "train")]
    pretrain = {r["prompt"] for d in ("math", "code") for r in splits[f"pretrain-{d}"]}
    for i, p in enumerate(prompts):
        assert not p & pretrain
        assert all(not p & q for q in prompts[i + 1 :])


def test_check_disjoint_catches_a_shared_prompt(tmp_path):
    files = write_splits(tmp_path, SIZES["small"], seed=0)
    check_disjoint(files)
    leaked = files["train"].read_text().splitlines()[0]
    with files["heldout-code"].open("a") as fh:
        fh.write(leaked + "\n")
    with pytest.raises(ValueError, match="is in split"):
        check_disjoint(files)


def test_rows_read_as_prompt_and_response(tmp_path):
    files = write_splits(tmp_path, SIZES["small"], seed=0)
    convs = list(read_conversations(files["train"]))
    first = json.loads(files["train"].read_text().splitlines()[0])
    assert len(convs) == SIZES["small"].train
    assert convs[0].messages == ({"role": "user", "content": first["prompt"]},
                                 {"role": "assistant", "content": first["response"]})  # fmt: skip
