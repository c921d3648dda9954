"""Capture throughput: vLLM engine vs the transformers engine, same teacher, same rows, one run.

    .venv/bin/python benchmarks/bench_build.py [--rows 64] [--k 64]

Rows are the demo prompts with the embedded teacher's own answers (from `demo-out/data/train.jsonl`, written by
`fusion-cache demo`, or generated here with vLLM if missing). Reports tokens/s of: plain vLLM prefill
(max_tokens=1, no logprobs; the ceiling), the vLLM capture engine (prompt_logprobs=K) and the HF engine (forward,
lm_head at answer positions, top-K). Appends the table to benchmarks/results/build.md with machine and date.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_markdown  # noqa: E402
from common import machine  # noqa: E402


def _rows(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--data", type=Path, default=Path("demo-out/data/train.jsonl"))
    ap.add_argument("--teacher", default="smollm2-135m")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from fusion_cache.engines.base import SequenceRequest
    from fusion_cache.engines.hf import HFEngine
    from fusion_cache.engines.vllm_engine import VLLMEngine
    from fusion_cache.hardware import default_dtype
    from fusion_cache.render import has_chat_template
    from fusion_cache.render import render
    from fusion_cache.teachers import resolve_model

    teacher = resolve_model(args.teacher)
    tok = AutoTokenizer.from_pretrained(teacher.path)
    if not args.data.exists():
        sys.exit(f"{args.data} is missing: run `fusion-cache demo` first (it writes the teacher's answers there)")
    chat = has_chat_template(tok)
    rendered = [render(tok, r["messages"], chat_template=chat) for r in _rows(args.data, args.rows)]
    reqs = [SequenceRequest(r.input_ids.tolist(), r.answer_start) for r in rendered]
    tokens = sum(len(r.input_ids) for r in rendered)
    dtype = default_dtype()
    results = {}

    # HF first: vLLM binds the process's threads for good once it starts.
    hf = HFEngine(teacher.path, dtype=dtype)
    hf.capture(reqs[:2], args.k)  # warm-up
    t = time.perf_counter()
    hf_caps = hf.capture(reqs, args.k)
    results["hf engine (capture top-K)"] = time.perf_counter() - t
    hf.close()

    t = time.perf_counter()
    eng = VLLMEngine(teacher.path, dtype=dtype, max_model_len=max(len(r.input_ids) for r in rendered) + 1, max_k=args.k)
    start_s = time.perf_counter() - t
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(r.input_ids)) for r in reqs]
    eng.llm.generate(prompts[:2], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    eng.llm.generate(prompts, SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    results["vllm plain prefill (ceiling)"] = time.perf_counter() - t
    eng.capture(reqs[:2], args.k)
    t = time.perf_counter()
    v_caps = eng.capture(reqs, args.k)
    results["vllm engine (capture top-K)"] = time.perf_counter() - t
    eng.close()

    # the two engines must agree, or the comparison means nothing
    pairs = [(a, b) for x, y in zip(hf_caps, v_caps, strict=True) for a, b in zip(x.ids, y.ids, strict=True)]
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in pairs)
    total = sum(c.ids.size for c in hf_caps)
    max_diff = max(float(abs(x.logprobs - y.logprobs).max()) for x, y in zip(hf_caps, v_caps, strict=True))

    info = machine()
    lines = [
        f"teacher `{args.teacher}` ({teacher.revision}), {dtype}, K={args.k}, {len(reqs)} rows, {tokens} tokens "
        f"(answers {sum(r.n_answer for r in rendered)}); vLLM engine start {start_s:.1f} s",
        f"machine: {info['cpu']}, {info['cores']} cores, avx512_bf16={info['avx512_bf16']}, gpu={info['gpu']}; "
        f"torch {info['torch']}, vllm {info['vllm']}, fusion-cache {info['fusion_cache']}",
        "",
        "| path | seconds | tokens/s |",
        "|---|---|---|",
    ]
    for name, sec in results.items():
        lines.append(f"| {name} | {sec:.2f} | {tokens / sec:.0f} |")
    ratio = results["vllm plain prefill (ceiling)"] / results["vllm engine (capture top-K)"]
    speedup = results["hf engine (capture top-K)"] / results["vllm engine (capture top-K)"]
    lines += [
        "",
        f"vllm engine vs hf engine: {speedup:.2f}x; ratio build/prefill: {ratio:.2f}",
        f"engines agree: top-{args.k} id overlap {overlap / total:.4f}, max |delta logprob| {max_diff:.2e}",
    ]
    body = "\n".join(lines)
    print(body)
    path = append_markdown(
        "build",
        f"{info['date']} capture throughput",
        body,
        {
            **info,
            "rows": len(reqs),
            "tokens": tokens,
            "k": args.k,
            "dtype": dtype,
            "seconds": results,
            "overlap": overlap / total,
            "max_abs_diff": max_diff,
        },
    )
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
