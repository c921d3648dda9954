"""The bundled demo prompts: 164 HumanEval problems and 160 generated arithmetic word problems.

The file is written by ``scripts/make_demo_prompts.py``; each row is
``{"id", "source": "humaneval"|"arithmetic", "split": "train"|"heldout", "messages": [...], "answer": str|None}``.
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
