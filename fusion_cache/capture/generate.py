"""`fusion-cache generate`: a chosen model writes the responses first, then `build` captures teachers on them.

    fusion-cache generate --model smollm2-135m --data prompts.jsonl --out responses.jsonl --n 2 --temperature 0.8
    fusion-cache build --teacher smollm2-135m --data responses.jsonl --out ./cache/smollm2

Input rows are those of `build` without the answer: ``prompt`` (+ ``system``) or ``messages`` (a final assistant
message, if any, is replaced). Each row gets ``n`` sampled answers (`TeacherEngine.sample_n`: one vLLM request
with ``SamplingParams(n=n)`` per prompt; the hf engine's sample j uses seed ``seed + j``), written as
``{"messages": [..., {"role": "assistant", "content": answer}], "source_row": i, "sample": j}`` in input order,
so the file is valid `build` input. The settings go to ``<out>.meta.json``. Both files are written atomically
(cache/durable.py), so a killed run leaves no half-written output.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

from fusion_cache import __version__
from fusion_cache.cache.durable import write_atomic
from fusion_cache.capture.engines.base import check_sampling
from fusion_cache.capture.inputs import dataset_hash
from fusion_cache.capture.inputs import iter_raw_rows
from fusion_cache.capture.inputs import normalize_row
from fusion_cache.errors import ConfigError


def read_prompts(path: str, limit: int | None = None) -> list[tuple[int, list[dict]]]:
    """(row index, messages without the answer) of every input row, validated as `build` validates rows.

    Raises:
        DataError: a malformed row, naming the file, the line and the field.
    """
    out = []
    for i, (line, row) in enumerate(iter_raw_rows(path)):
        if limit is not None and i >= limit:
            break
        if isinstance(row.get("messages"), list):
            msgs = list(row["messages"])
            if not (msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant"):
                msgs.append({"role": "assistant", "content": ""})  # the placeholder the answer will replace
            row = {"messages": msgs}
        elif "prompt" in row:
            row = {**row, "response": ""}
        conv = normalize_row(row, source=str(path), line=line, row_index=i)
        out.append((i, list(conv.messages[:-1])))
    return out


def run_generate(
    *,
    model: str,
    data: str,
    out: str,
    engine: str = "vllm",
    max_tokens: int = 256,
    temperature: float = 0.8,
    n: int = 1,
    seed: int = 0,
    limit: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    engine_obj=None,
    progress: bool = False,
) -> dict:
    """Generate ``n`` answers per prompt with ``model`` and write them to ``out`` (JSONL). Returns the meta dict.

    Args:
        model: preset name, local model directory or HF id.
        engine_obj: an already started engine for ``model`` (tests); by default ``engine`` is started and closed.
        progress: show a progress bar over the prompts.

    Raises:
        ConfigError: bad settings or an existing ``out`` without ``overwrite``.
        DataError: a malformed input row (before any model runs).
    """
    from transformers import AutoTokenizer

    from fusion_cache.capture.render import has_chat_template
    from fusion_cache.capture.render import render_prompt_ids
    from fusion_cache.models.hardware import default_dtype
    from fusion_cache.models.presets import resolve_model

    check_sampling([[0]], n=n, max_tokens=max_tokens, temperature=temperature, flag="--")
    target = Path(out)
    if target.exists() and not overwrite:
        raise ConfigError(f"--out {out}: exists; pass --overwrite to replace it")
    prompts = read_prompts(data, limit)
    if not prompts:
        raise ConfigError(f"--data {data}: no rows")
    resolved = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=False)
    chat = has_chat_template(tokenizer)
    ids = [render_prompt_ids(tokenizer, msgs, chat_template=chat) for _, msgs in prompts]
    own = engine_obj is None
    if own:
        from fusion_cache.capture.engines import make_engine

        # vLLM on CPU samples from the engine's global seed (vllm_engine.sample_n): give it --seed
        extra = {"max_model_len": max(map(len, ids)) + max_tokens + 1, "seed": seed} if engine == "vllm" else {}
        engine_obj = make_engine(engine, resolved.path, dtype=dtype or default_dtype(), **extra)
    try:
        # one request per prompt with n outputs (vLLM prefills each prompt once for its n samples)
        samples = engine_obj.sample_n(ids, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                      progress=progress)  # fmt: skip
    finally:
        if own:
            engine_obj.close()
    lines = []
    for r, (row_index, msgs) in enumerate(prompts):
        for j in range(n):
            text = tokenizer.decode(samples[r][j], skip_special_tokens=True).strip()
            record = {"messages": [*msgs, {"role": "assistant", "content": text}], "source_row": row_index, "sample": j}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    body = "".join(lines).encode("utf-8")
    meta = {
        # build reads this beside its --data (capture/output.py `generated_answers`); the hash ties it to the rows
        "out_sha256": hashlib.sha256(body).hexdigest(),
        "model": {"name": model, "revision": resolved.revision, "engine": engine_obj.name, "dtype": engine_obj.dtype},
        "data": {"source": data, "hash": dataset_hash(data), "rows": len(prompts)},
        "sampling": {"max_tokens": max_tokens, "temperature": temperature, "n": n, "seed": seed},
        "rows_written": len(lines),
        "fusion_cache_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_atomic(target.with_name(target.name + ".meta.json"), meta_text.encode("utf-8"))
    write_atomic(target, body)
    return meta
