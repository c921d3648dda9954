"""The bundled demo prompts: 164 HumanEval problems and 160 generated arithmetic word problems.

The file is written by ``scripts/make_demo_prompts.py``; each row is
``{"id", "source": "humaneval"|"arithmetic", "split": "train"|"heldout", "messages": [...], "answer": str|None,
"gold": str}``. ``gold`` is a reference answer written by the generator, not sampled from a model (the canonical
HumanEval solution without its docstring; the arithmetic template's worked steps ending in ``Answer: <answer>``);
`gold_rows` gives the rows with it as the assistant's answer.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from fusion_cache.errors import ConfigError

SPLITS = ("train", "heldout")


def demo_prompts_path() -> Path:
    """Path of the bundled ``demo_prompts.jsonl`` inside the installed package."""
    # files() gives a real path for normal and editable installs; the package is never imported from a zip.
    return Path(str(resources.files("fusion_cache").joinpath("data", "demo_prompts.jsonl")))


def load_demo_prompts(split: str | None = None) -> list[dict]:
    """The demo prompt rows, in file order.

    Args:
        split: ``"train"``, ``"heldout"``, or None for all rows.

    Returns:
        One dict per row.

    Raises:
        ConfigError: ``split`` is not one of the above.
    """
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown demo split {split!r}; expected one of {list(SPLITS)} or None")
    with demo_prompts_path().open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return rows if split is None else [row for row in rows if row["split"] == split]


def gold_rows(split: str | None = None) -> list[dict]:
    """The demo prompts answered with their gold answers, as `build --data` rows, in file order.

    Args:
        split: ``"train"``, ``"heldout"``, or None for all rows.

    Returns:
        ``{"id", "source", "messages": [user, assistant]}`` per row (``id`` and ``source`` ride along: an input row
        is read by its ``messages``, and the sample id hashes them only).

    Raises:
        ConfigError: ``split`` is not one of the above.
    """
    return [
        {
            "id": row["id"],
            "source": row["source"],
            "messages": [*row["messages"], {"role": "assistant", "content": row["gold"]}],
        }
        for row in load_demo_prompts(split)
    ]


# ---------------------------------------------------------------- the teacher's answers
# The demo distils on answers the teacher samples itself (the usual distillation recipe; sampled rather than
# greedy, so that the teacher's distribution at an answer token is not trivially peaked on that token). Generating
# them takes minutes on a CPU, so the answers of the embedded teacher are bundled, with the settings that produced them;
# they are used only when the resolved teacher's revision and the settings match, and regenerated otherwise
# (`scripts/make_demo_responses.py` rewrites the bundled file).
RESPONSES_FILE = "demo_responses.jsonl"
RESPONSES_META = "demo_responses.meta.json"


def _data_file(name: str) -> Path:
    return Path(str(resources.files("fusion_cache").joinpath("data", name)))


def generation_settings(
    teacher_revision: str | None, max_tokens: int, dtype: str, *, temperature: float = 0.8, seed: int = 0
) -> dict:
    """What decides the teacher's answers: the weights, the length limit, the sampling and the dtype."""
    return {
        "teacher_revision": teacher_revision,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "dtype": dtype,
    }


def bundled_responses(settings: dict) -> dict[str, str] | None:
    """{prompt id: answer} from the bundled file when it was made with ``settings``, else None.

    The dtype is recorded but not required to match: answers of the same weights in bf16 and fp32 differ only where
    greedy decoding meets a near-tie, and they are the teacher's answers either way.
    """
    meta, data = _data_file(RESPONSES_META), _data_file(RESPONSES_FILE)
    if not (meta.is_file() and data.is_file()):
        return None
    recorded = json.loads(meta.read_text())
    if {k: v for k, v in recorded.items() if k != "dtype"} != {k: v for k, v in settings.items() if k != "dtype"}:
        return None
    with data.open(encoding="utf-8") as fh:
        return {r["id"]: r["response"] for r in (json.loads(line) for line in fh if line.strip())}


def generate_responses(
    engine, tokenizer, rows: list[dict], *, max_tokens: int, temperature: float = 0.8, seed: int = 0
) -> dict[str, str]:
    """Sampled (or, at temperature 0, greedy) answers of ``engine``'s model: {prompt id: answer text}."""
    from fusion_cache.capture.render import has_chat_template
    from fusion_cache.capture.render import render_prompt_ids

    chat = has_chat_template(tokenizer)
    prompts = [render_prompt_ids(tokenizer, r["messages"], chat_template=chat) for r in rows]
    outs = engine.generate(prompts, max_tokens=max_tokens, temperature=temperature, seed=seed)
    return {r["id"]: tokenizer.decode(ids, skip_special_tokens=True).strip() for r, ids in zip(rows, outs, strict=True)}


def write_bundled_responses(responses: dict[str, str], settings: dict) -> Path:
    """Rewrite the bundled answers (in prompt-file order) and their settings."""
    order = [r["id"] for r in load_demo_prompts()]
    lines = [
        json.dumps({"id": i, "response": responses[i]}, ensure_ascii=False) + "\n" for i in order if i in responses
    ]
    _data_file(RESPONSES_FILE).write_text("".join(lines), encoding="utf-8")
    _data_file(RESPONSES_META).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return _data_file(RESPONSES_FILE)
