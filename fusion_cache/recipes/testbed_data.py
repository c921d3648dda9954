"""The testbed's data (`fusion_cache.recipes.testbed`): two domains whose gold answers the generators write.

    from fusion_cache.recipes.testbed_data import math_row, code_task, write_splits, SIZES
    math_row(random.Random(0))     # {"prompt": "Ana has 347 pens. ...", "response": "... The answer is 683.", ...}
    code_task(random.Random(0))    # CodeTask: prompt, solution text, function name, reference, input maker
    write_splits("work/data", SIZES["small"], seed=0)

- ``math``: arithmetic word problems (8 templates, varied names, objects and phrasing, numbers up to 5 digits)
  whose answers are worked out step by step ("28 * 12 = 336. ... The answer is 683."): full of multi-digit numerals,
  which is where a digit-splitting and a number-merging tokenizer disagree.
- ``code``: short Python function tasks (filters, sums, maps, string transforms, list statistics, dict counts)
  with a correct solution; some families have two equally correct styles, drawn at random, so the answers carry
  real uncertainty that a teacher's distribution can express and a single gold answer cannot.

Nothing is sampled from a model. Each split has its own seeded generator, and a prompt already used by an earlier
split is drawn again, so the splits are disjoint by construction; `check_disjoint` verifies it on the files.
"""

from __future__ import annotations

import json
import operator
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

DOMAINS = ("math", "code")

# ---------------------------------------------------------------------------------------------------------------
# math: templates draw numbers, compute the answer and write the worked solution

NAMES = (
    "Ana", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kofi", "Lena", "Mateo",
    "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wen", "Yara", "Zane",
)  # fmt: skip
OBJECTS = (
    "apples", "pens", "stickers", "marbles", "books", "cards", "shells", "coins", "stamps", "bricks", "beads",
    "tickets", "candles", "buttons", "seeds", "nails", "cups", "plates", "bottles", "boxes of tea",
)  # fmt: skip
ITEMS = ("bike", "lamp", "coat", "desk", "phone", "tent", "rug", "chair", "clock", "kettle", "drill", "radio")
GROUPS = ("friends", "classmates", "teams", "shelves", "bags", "baskets", "rooms", "tables")
PLACES = ("factory", "bakery", "workshop", "farm", "mill", "printer", "plant")
VEHICLES = ("truck", "train", "ship", "bus", "van", "plane")

Worked = tuple[str, list[str], int]  # (question, solution steps, final answer)


def _m_boxes(r: random.Random) -> Worked:
    name, obj = r.choice(NAMES), r.choice(OBJECTS)
    have, boxes, per = r.randint(100, 9999), r.randint(3, 99), r.randint(6, 99)
    got = boxes * per
    q = (f"{name} has {have} {obj}. {name} buys {boxes} boxes with {per} {obj} in each box. "
         f"How many {obj} does {name} have now?")  # fmt: skip
    steps = [f"The boxes hold {boxes} * {per} = {got} {obj}.", f"{name} now has {have} + {got} = {have + got} {obj}."]
    return q, steps, have + got


def _m_spend(r: random.Random) -> Worked:
    name, (i1, i2) = r.choice(NAMES), r.sample(ITEMS, 2)
    b, c = r.randint(100, 9999), r.randint(100, 9999)
    a = b + c + r.randint(1, 60000)
    q = f"{name} had {a} dollars and spent {b} dollars on a {i1} and {c} dollars on a {i2}. How many dollars are left?"
    steps = [f"{name} spent {b} + {c} = {b + c} dollars.", f"{a} - {b + c} = {a - b - c} dollars are left."]
    return q, steps, a - b - c


def _m_share(r: random.Random) -> Worked:
    name, obj, group = r.choice(NAMES), r.choice(OBJECTS), r.choice(GROUPS)
    k, each, keep = r.randint(3, 24), r.randint(12, 999), r.randint(10, 500)
    rest = k * each
    q = (f"{name} has {rest + keep} {obj}, keeps {keep} and shares the rest equally among {k} {group}. "
         f"How many {obj} does each of the {group} get?")  # fmt: skip
    steps = [f"{name} shares {rest + keep} - {keep} = {rest} {obj}.", f"Each gets {rest} / {k} = {each} {obj}."]
    return q, steps, each


def _m_rate(r: random.Random) -> Worked:
    place, obj = r.choice(PLACES), r.choice(OBJECTS)
    rate, hours, days = r.randint(12, 480), r.randint(4, 16), r.randint(2, 30)
    day = rate * hours
    q = (f"A {place} makes {rate} {obj} per hour and works {hours} hours a day. "
         f"How many {obj} does it make in {days} days?")  # fmt: skip
    steps = [f"In one day it makes {rate} * {hours} = {day} {obj}.", f"In {days} days it makes {day} * {days} = "
             f"{day * days} {obj}."]  # fmt: skip
    return q, steps, day * days


def _m_compare(r: random.Random) -> Worked:
    n1, n2 = r.sample(NAMES, 2)
    b = r.randint(100, 49999)
    a = b + r.randint(1, 49999)
    if r.random() < 0.5:
        q = f"{n1} scored {a} points and {n2} scored {b} points. How many more points did {n1} score than {n2}?"
        return q, [f"{n1} scored {a} - {b} = {a - b} more points."], a - b
    q = f"{n1} scored {a} points and {n2} scored {b} points. How many points did they score together?"
    return q, [f"Together they scored {a} + {b} = {a + b} points."], a + b


def _m_discount(r: random.Random) -> Worked:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    price, n = r.randint(12, 950), r.randint(2, 60)
    off = r.randint(1, price * n // 10 + 1)
    total = price * n
    q = (f"One {item} costs {price} dollars. {name} buys {n} of them with a coupon for {off} "
         f"dollars off the whole order. How many dollars does {name} pay?")  # fmt: skip
    steps = [f"{n} * {price} = {total} dollars.", f"With the coupon {name} pays {total} - {off} = {total - off} "
             "dollars."]  # fmt: skip
    return q, steps, total - off


def _m_travel(r: random.Random) -> Worked:
    vehicle = r.choice(VEHICLES)
    v, d, w = r.randint(40, 900), r.randint(2, 30), r.randint(10, 999)
    q = (f"A {vehicle} travels {v} km each day for {d} days and then {w} km on the last day. "
         "How many km does it travel in total?")  # fmt: skip
    steps = [f"In {d} days it travels {v} * {d} = {v * d} km.", f"In total {v * d} + {w} = {v * d + w} km."]
    return q, steps, v * d + w


def _m_sales(r: random.Random) -> Worked:
    obj = r.choice(OBJECTS)
    b, c = r.randint(10, 999), r.randint(2, 6)
    sold = b + b * c
    a = sold + r.randint(1, 9000)
    q = (f"A store had {a} {obj}. It sold {b} on Monday and {c} times as many on Tuesday. "
         f"How many {obj} are left?")  # fmt: skip
    steps = [f"On Tuesday it sold {c} * {b} = {b * c}.", f"In total it sold {b} + {b * c} = {sold}.",
             f"{a} - {sold} = {a - sold} {obj} are left."]  # fmt: skip
    return q, steps, a - sold


MATH_TEMPLATES: tuple[Callable[[random.Random], Worked], ...] = (
    _m_boxes, _m_spend, _m_share, _m_rate, _m_compare, _m_discount, _m_travel, _m_sales,
)  # fmt: skip


def math_row(r: random.Random) -> dict:
    """One arithmetic word problem with its worked gold answer: ``{"prompt", "response", "domain": "math"}``."""
    question, steps, answer = r.choice(MATH_TEMPLATES)(r)
    return {"prompt": question, "response": " ".join(steps) + f" The answer is {answer}.", "domain": "math"}


# ---------------------------------------------------------------------------------------------------------------
# code: each family draws its constants and names, writes the solution, and gives an independent reference


@dataclass(frozen=True)
class CodeTask:
    """One Python function task.

    Attributes:
        prompt: the instruction, naming the function and its argument.
        solution: the gold answer: the function's source.
        fn_name: the function's name.
        reference: the function's behaviour, written independently of ``solution`` (tests compare them).
        make_input: draws one argument for the function.
    """

    prompt: str
    solution: str
    fn_name: str
    reference: Callable
    make_input: Callable[[random.Random], object]


LIST_ARGS = ("nums", "numbers", "values", "xs", "data", "items", "scores", "arr", "seq", "counts", "prices")
STR_ARGS = ("s", "text", "word", "line", "name", "label", "msg", "title", "phrase")
WORDS_ARGS = ("words", "tokens", "names", "terms", "labels", "keys")
LOOP_VARS = ("x", "n", "v", "value", "item")
CMPS = (("greater than", ">", operator.gt), ("less than", "<", operator.lt), ("at least", ">=", operator.ge),
        ("at most", "<=", operator.le))  # fmt: skip
WORD_POOL = ("cat", "dog", "sun", "tree", "river", "stone", "apple", "cloud", "bird", "road", "moon", "fire")


def _ints(r: random.Random) -> list[int]:
    return [r.randint(-50, 150) for _ in range(r.randint(0, 8))]


def _text(r: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "   "
    return "".join(r.choice(alphabet) for _ in range(r.randint(0, 20)))


def _words(r: random.Random) -> list[str]:
    return [r.choice(WORD_POOL) for _ in range(r.randint(0, 8))]


def _sentence(r: random.Random) -> str:
    return " ".join(_words(r))


# nouns any family's function name may end with, besides its own
COMMON_NOUNS = ("data", "records", "entries", "output", "part", "info", "set", "batch")


def _name(r: random.Random, verbs: tuple[str, ...], nouns: tuple[str, ...]) -> str:
    return f"{r.choice(verbs)}_{r.choice(nouns + COMMON_NOUNS)}"


def _def(fn: str, arg: str, body: list[str]) -> str:
    return f"def {fn}({arg}):\n" + "".join(f"    {line}\n" for line in body)


def _c_filter(r: random.Random) -> CodeTask:
    arg, v = r.choice(LIST_ARGS), r.choice(LOOP_VARS)
    kind = r.randrange(3)
    if kind == 0:
        words, op, fn_op = r.choice(CMPS)
        k = r.randint(0, 99)
        what, cond, pred = f"{words} {k}", f"{v} {op} {k}", lambda x: fn_op(x, k)
    elif kind == 1:
        k = r.randint(2, 12)
        what, cond, pred = f"divisible by {k}", f"{v} % {k} == 0", lambda x: x % k == 0
    else:
        odd = r.random() < 0.5
        what, cond = ("odd", f"{v} % 2 == 1") if odd else ("even", f"{v} % 2 == 0")
        pred = (lambda x: x % 2 == 1) if odd else (lambda x: x % 2 == 0)
    fn = _name(r, ("keep", "filter", "select", "pick", "only"), ("values", "numbers", "matches", "items", "wanted"))
    prompt = f"Write a function `{fn}({arg})` that returns a list of the numbers in `{arg}` that are {what}."
    if r.random() < 0.5:
        body = [f"return [{v} for {v} in {arg} if {cond}]"]
    else:
        body = ["result = []", f"for {v} in {arg}:", f"    if {cond}:", f"        result.append({v})", "return result"]
    return CodeTask(prompt, _def(fn, arg, body), fn, lambda xs: [x for x in xs if pred(x)], _ints)


def _c_sum(r: random.Random) -> CodeTask:
    arg, v = r.choice(LIST_ARGS), r.choice(LOOP_VARS)
    words, op, fn_op = r.choice(CMPS)
    k = r.randint(-20, 99)
    fn = _name(r, ("sum", "total", "add"), ("above", "below", "selected", "filtered", "limited"))
    prompt = f"Write a function `{fn}({arg})` that returns the sum of the numbers in `{arg}` that are {words} {k}."
    if r.random() < 0.5:
        body = [f"return sum({v} for {v} in {arg} if {v} {op} {k})"]
    else:
        body = ["total = 0", f"for {v} in {arg}:", f"    if {v} {op} {k}:", f"        total += {v}", "return total"]
    return CodeTask(prompt, _def(fn, arg, body), fn, lambda xs: sum(x for x in xs if fn_op(x, k)), _ints)


def _c_map(r: random.Random) -> CodeTask:
    arg, v = r.choice(LIST_ARGS), r.choice(LOOP_VARS)
    k = r.randint(2, 99)
    what, expr, f = r.choice(
        (
            (f"multiplied by {k}", f"{v} * {k}", lambda x: x * k),
            (f"increased by {k}", f"{v} + {k}", lambda x: x + k),
            (f"decreased by {k}", f"{v} - {k}", lambda x: x - k),
            ("squared", f"{v} * {v}", lambda x: x * x),
            (f"taken modulo {k}", f"{v} % {k}", lambda x: x % k),
        )
    )
    fn = _name(r, ("map", "scale", "shift", "transform", "convert"), ("values", "numbers", "list", "all", "each"))
    prompt = f"Write a function `{fn}({arg})` that returns a new list with every number in `{arg}` {what}."
    if r.random() < 0.5:
        body = [f"return [{expr} for {v} in {arg}]"]
    else:
        body = ["result = []", f"for {v} in {arg}:", f"    result.append({expr})", "return result"]
    return CodeTask(prompt, _def(fn, arg, body), fn, lambda xs: [f(x) for x in xs], _ints)


def _c_count_chars(r: random.Random) -> CodeTask:
    arg = r.choice(STR_ARGS)
    c = r.choice(string.ascii_lowercase)
    what, cond, pred = r.choice(
        (
            ("vowels", 'ch in "aeiouAEIOU"', lambda ch: ch in "aeiouAEIOU"),
            ("digits", "ch.isdigit()", str.isdigit),
            ("uppercase letters", "ch.isupper()", str.isupper),
            ("spaces", 'ch == " "', lambda ch: ch == " "),
            (f"equal to '{c}'", f'ch == "{c}"', lambda ch: ch == c),
        )
    )
    fn = _name(r, ("count", "num", "tally"), ("chars", "letters", "matches", "symbols"))
    prompt = f"Write a function `{fn}({arg})` that returns how many characters of the string `{arg}` are {what}."
    if r.random() < 0.5:
        body = [f"return sum(1 for ch in {arg} if {cond})"]
    else:
        body = ["count = 0", f"for ch in {arg}:", f"    if {cond}:", "        count += 1", "return count"]
    return CodeTask(prompt, _def(fn, arg, body), fn, lambda s: sum(1 for ch in s if pred(ch)), _text)


def _c_string(r: random.Random) -> CodeTask:
    arg = r.choice(STR_ARGS)
    k = r.randint(1, 9)
    a, b = r.sample(string.ascii_lowercase, 2)
    what, expr, f = r.choice(
        (
            ("reversed", f"{arg}[::-1]", lambda s: s[::-1]),
            ("in upper case", f"{arg}.upper()", str.upper),
            ("in lower case", f"{arg}.lower()", str.lower),
            (f"with every '{a}' replaced by '{b}'", f'{arg}.replace("{a}", "{b}")', lambda s: s.replace(a, b)),
            (f"without its first {k} characters", f"{arg}[{k}:]", lambda s: s[k:]),
            (f"cut to its first {k} characters", f"{arg}[:{k}]", lambda s: s[:k]),
            (f"repeated {k + 1} times", f"{arg} * {k + 1}", lambda s: s * (k + 1)),
        )
    )
    fn = _name(r, ("make", "get", "build", "format"), ("text", "string", "result", "copy", "version"))
    prompt = f"Write a function `{fn}({arg})` that returns the string `{arg}` {what}."
    return CodeTask(prompt, _def(fn, arg, [f"return {expr}"]), fn, f, _text)


def _c_stat(r: random.Random) -> CodeTask:
    arg, v = r.choice(LIST_ARGS), r.choice(LOOP_VARS)
    k = r.randint(1, 9)
    kind = r.randrange(4)
    if kind < 2:
        big = kind == 0
        what, op, name, f = ("largest", ">", "best", max) if big else ("smallest", "<", "low", min)
        prompt_tail = f"the {what} number in the non-empty list `{arg}`"
        if r.random() < 0.5:
            body = [f"return {f.__name__}({arg})"]
        else:
            body = [f"{name} = {arg}[0]", f"for {v} in {arg}:", f"    if {v} {op} {name}:", f"        {name} = {v}",
                    f"return {name}"]  # fmt: skip
        ref, make = f, (lambda rr: _ints(rr) or [rr.randint(-50, 150)])
    elif kind == 2:
        prompt_tail, body = f"the last {k} numbers of `{arg}`", [f"return {arg}[-{k}:]"]
        ref, make = (lambda xs: xs[-k:]), _ints
    else:
        prompt_tail, body = f"how many numbers in `{arg}` are equal to {k}", [f"return {arg}.count({k})"]
        ref, make = (lambda xs: xs.count(k)), (lambda rr: [rr.randint(0, 9) for _ in range(rr.randint(0, 8))])
    fn = _name(r, ("find", "get", "compute", "pick"), ("stat", "result", "answer", "value"))
    prompt = f"Write a function `{fn}({arg})` that returns {prompt_tail}."
    return CodeTask(prompt, _def(fn, arg, body), fn, ref, make)


def _c_dict(r: random.Random) -> CodeTask:
    arg, w = r.choice(WORDS_ARGS), r.choice(("w", "word", "t", "key"))
    kind = r.randrange(3)
    if kind == 0:
        what = "the number of times it occurs in the list"
        body = ["counts = {}", f"for {w} in {arg}:", f"    counts[{w}] = counts.get({w}, 0) + 1", "return counts"]
        ref = lambda ws: {x: ws.count(x) for x in ws}  # noqa: E731
    elif kind == 1:
        what = "its length"
        body = [f"return {{{w}: len({w}) for {w} in {arg}}}"]
        ref = lambda ws: {x: len(x) for x in ws}  # noqa: E731
    else:
        what = "its position in the list (the last one when it occurs twice)"
        body = ["index = {}", f"for i, {w} in enumerate({arg}):", f"    index[{w}] = i", "return index"]
        ref = lambda ws: {x: max(i for i, y in enumerate(ws) if y == x) for x in ws}  # noqa: E731
    fn = _name(r, ("count", "map", "index", "group"), ("words", "tokens", "terms", "entries"))
    prompt = f"Write a function `{fn}({arg})` that returns a dict mapping each word in the list `{arg}` to {what}."
    return CodeTask(prompt, _def(fn, arg, body), fn, ref, _words)


def _c_words(r: random.Random) -> CodeTask:
    arg = r.choice(STR_ARGS)
    k, c = r.randint(2, 5), r.choice("cdsrbmatf")
    what, cond, pred = r.choice(
        (
            (f"longer than {k} characters", f"len(w) > {k}", lambda x: len(x) > k),
            (f"that start with '{c}'", f'w.startswith("{c}")', lambda x: x.startswith(c)),
            (f"that end with '{c}'", f'w.endswith("{c}")', lambda x: x.endswith(c)),
        )
    )
    fn = _name(r, ("count", "num", "tally"), ("words", "long_words", "matches", "terms"))
    prompt = f"Write a function `{fn}({arg})` that returns the number of words in the string `{arg}` {what}."
    body = [f"return len([w for w in {arg}.split() if {cond}])"]
    return CodeTask(prompt, _def(fn, arg, body), fn, lambda s: sum(1 for x in s.split() if pred(x)), _sentence)


CODE_FAMILIES: tuple[Callable[[random.Random], CodeTask], ...] = (
    _c_filter, _c_sum, _c_map, _c_count_chars, _c_string, _c_stat, _c_dict, _c_words,
)  # fmt: skip


def code_task(r: random.Random) -> CodeTask:
    """One Python function task, with its gold solution and an independent reference."""
    return r.choice(CODE_FAMILIES)(r)


def code_row(r: random.Random) -> dict:
    """One code task as an input row: ``{"prompt", "response", "domain": "code"}``."""
    task = code_task(r)
    return {"prompt": task.prompt, "response": task.solution, "domain": "code"}


ROW_MAKERS: dict[str, Callable[[random.Random], dict]] = {"math": math_row, "code": code_row}


# ---------------------------------------------------------------------------------------------------------------
# splits


@dataclass(frozen=True)
class DataSizes:
    """Rows per split: ``pretrain`` per domain (each teacher's own); the others mixed, half per domain."""

    pretrain: int
    train: int
    validation: int
    heldout: int


SIZES = {
    "full": DataSizes(pretrain=24_000, train=600, validation=200, heldout=300),
    "small": DataSizes(pretrain=240, train=24, validation=12, heldout=12),
}
# Drawn in this order: the evaluation splits first, so their prompts are never redrawn because of a pretraining row.
MIXED_SPLITS = ("heldout", "validation", "train")


def split_files(data_dir: str | Path) -> dict[str, Path]:
    """Every file `write_splits` writes: ``pretrain-<domain>``, the mixed splits, and ``<split>-<domain>`` for the
    evaluation splits (what `fusion_cache.eval.evaluate.evaluate_rows` reads per domain)."""
    d = Path(data_dir)
    files = {f"pretrain-{dom}": d / f"pretrain-{dom}.jsonl" for dom in DOMAINS}
    files |= {s: d / f"{s}.jsonl" for s in MIXED_SPLITS}
    files |= {f"{s}-{dom}": d / f"{s}-{dom}.jsonl" for s in ("validation", "heldout") for dom in DOMAINS}
    return files


def _draw(domain: str, n: int, r: random.Random, used: set[str]) -> list[dict]:
    """``n`` rows of ``domain`` whose prompts are not in ``used`` (which gains them)."""
    rows = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"{domain}: cannot draw {n} new prompts; the templates are too narrow")
        row = ROW_MAKERS[domain](r)
        if row["prompt"] in used:
            continue
        used.add(row["prompt"])
        rows.append(row)
    return rows


def make_splits(sizes: DataSizes, seed: int) -> dict[str, list[dict]]:
    """Every split's rows (see `split_files` for the names), deterministic in ``seed``.

    A mixed split alternates math and code rows; a prompt is used by one split only (pretraining rows may repeat
    among themselves: a teacher sees its domain's common prompts more than once, as a corpus would have them).
    """
    used: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in MIXED_SPLITS:
        n = getattr(sizes, split)
        per = {dom: _draw(dom, (n + (i == 0)) // 2, random.Random(f"{seed}:{split}:{dom}"), used)
               for i, dom in enumerate(DOMAINS)}  # fmt: skip
        out[split] = [row for pair in zip_longest(*per.values()) for row in pair if row is not None]
        for dom in DOMAINS:
            if split != "train":
                out[f"{split}-{dom}"] = per[dom]
    for dom in DOMAINS:
        r = random.Random(f"{seed}:pretrain:{dom}")
        rows = []
        while len(rows) < sizes.pretrain:
            row = ROW_MAKERS[dom](r)
            if row["prompt"] not in used:  # never an evaluation or student prompt
                rows.append(row)
        out[f"pretrain-{dom}"] = rows
    return out


def check_disjoint(files: dict[str, Path]) -> None:
    """Raise ValueError when a prompt occurs in two of the splits ``heldout``, ``validation``, ``train`` and the
    pretraining files (each domain file of a split is part of its split)."""
    owner: dict[str, str] = {}
    for name, path in files.items():
        split = name.split("-")[0]  # "heldout-math" is part of "heldout"; both pretraining files of "pretrain"
        for line in path.read_text(encoding="utf-8").splitlines():
            prompt = json.loads(line)["prompt"]
            if owner.setdefault(prompt, split) != split:
                raise ValueError(f"{path}: prompt {prompt[:60]!r} is in split {split!r} and in {owner[prompt]!r}")


def write_splits(data_dir: str | Path, sizes: DataSizes, *, seed: int) -> dict[str, Path]:
    """Write every split as JSONL (``prompt``, ``response``, ``domain``) into ``data_dir`` and check that they are
    disjoint. Each file is written whole to a temporary name and renamed, so a file that exists is complete.

    Returns:
        `split_files` of ``data_dir``.
    """
    files = split_files(data_dir)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    for name, rows in make_splits(sizes, seed).items():
        tmp = files[name].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        tmp.replace(files[name])
    check_disjoint(files)
    return files
