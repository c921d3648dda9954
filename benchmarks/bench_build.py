"""Capture throughput: `fusion-cache build` against plain vLLM prefill, same teacher, same token ids, one run.

    .venv/bin/python benchmarks/bench_build.py --data /tmp/me/demo2/data/train.jsonl [--rows 24] [--reps 2]

Rows are the demo prompts with the embedded teacher's own answers (`fusion-cache demo` writes them to
`demo-out/data/train.jsonl`). Every path sees the same rendered token ids (the build renders them the same way):

- vllm plain prefill: ``llm.generate`` with max_tokens=1 and no logprobs, the ceiling (not reading vLLM's prefix
  cache, which prompt-logprob requests never read: the repeated passes would otherwise skip the prefill);
- vllm prompt_logprobs=K, engine only: the same call with ``prompt_logprobs=K`` whose results are left as vLLM's
  tensors (no decoding, no cache): what stock vLLM pays for the logits, log-softmax and top-K at every position
  (the reference for fusion-cache's answer-only hook, which this path does not use);
- build vllm K=64 (full codec) and K=10 (values codec): `run_build` end to end (render, capture, encode, write,
  fsync, sha256, manifest) on the same started engine, with the engine's answer-only prompt logprobs
  (`fusion_cache.capture.engines.vllm_answer_logits`: logits at answer positions only);
- build hf K=64: the transformers engine, run first (vLLM pins the process's threads once it starts).

The machine is shared, so the vLLM paths run interleaved (rep 1 of each, then rep 2, ...) and the medians are
compared: ``ratio build/prefill = prefill seconds / build seconds``. One more build run under cProfile gives the
profile summary (where the build's time goes beyond prefill). Appends a dated section to
benchmarks/results/build.md with the machine, its load and the versions.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_markdown  # noqa: E402
from common import machine  # noqa: E402

PREFILL = "vllm plain prefill (max_tokens=1, no logprobs)"
ENGINE_ONLY = "vllm prompt_logprobs=64, engine only (no decoding, no cache)"
BUILD_K64 = "build vllm K=64 (full codec)"

# Functions whose cumulative time the profile summary reports (file suffix, function name) -> label.
PROFILE_SECTIONS = [
    (("entrypoints/llm.py", "generate"), "vLLM generate (engine, everything below)"),
    (("llama.py", "forward"), "  model forward (all decoder layers)"),
    (("gpu_model_runner.py", "_get_prompt_logprobs_dict"), "  vLLM's prompt logprobs at every position (not used)"),
    (
        ("vllm_answer_logits.py", "_answer_only_prompt_logprobs_dict"),
        "  prompt logprobs at answer positions: lm_head + top-K + normalizer",
    ),
    (("vllm_answer_logits.py", "answer_topk"), "    of which top-K + normalizer (the rest: lm_head)"),
    (("vllm_engine.py", "keep_arrays"), "  tensors kept as numpy (replaces vLLM's per-token lists)"),
    (("vllm_engine.py", "_arrays_to_capture"), "our decode of the tensors (slice, tie re-sort)"),
    (("background.py", "submit"), "engine thread waiting for the writer thread"),
    (("build.py", "_prepare"), "render rows (chat template, byte offsets)"),
    (("inputs.py", "dataset_hash"), "dataset hash"),
]


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


class _WriterStats(logging.Handler):
    """Catches build.py's "writer thread: ..." log record (batches, seconds encoding+writing, seconds waited)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.last: tuple | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("writer thread:"):
            self.last = record.args


def _profile_summary(stats: pstats.Stats, total: float) -> list[str]:
    rows, found = [], {}
    for (suffix, name), label in PROFILE_SECTIONS:
        # v = (primitive calls, calls, tottime, cumtime, callers); the largest cumtime is the outermost function
        # of that name in the file (llama.py has a forward per module, nested)
        cum = max(
            (v[3] for (file, _line, func), v in stats.stats.items() if func == name and file.endswith(suffix)),
            default=0.0,
        )
        rows.append(f"| {label} | {cum:.2f} | {100 * cum / total:.0f}% |")
        found[label] = cum
    # the rest of generate: scheduler, input preparation, attention metadata, the sampled token's lm_head + sampler,
    # output processing
    generate, *inner = (found[label] for (_key, label) in PROFILE_SECTIONS[:6] if "of which" not in label)
    rest = generate - sum(inner)
    label = "  rest of generate (scheduler, inputs, sampler, outputs)"
    rows.insert(6, f"| {label} | {rest:.2f} | {100 * rest / total:.0f}% |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of each vLLM path (median)")
    ap.add_argument("--data", type=Path, default=Path("demo-out/data/train.jsonl"))
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers engine")
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} is missing: run `fusion-cache demo` first (it writes the teacher's answers there)")

    from transformers import AutoTokenizer

    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig
    from fusion_cache.capture.engines.hf import HFEngine
    from fusion_cache.capture.engines.vllm import VLLMEngine
    from fusion_cache.capture.engines.vllm import _prompt_logprob_arrays
    from fusion_cache.capture.render import has_chat_template
    from fusion_cache.capture.render import render
    from fusion_cache.models.hardware import default_dtype
    from fusion_cache.models.presets import resolve_model

    teacher = resolve_model(args.teacher)
    tok = AutoTokenizer.from_pretrained(teacher.path)
    lines = [line for line in args.data.read_text().splitlines() if line.strip()][: args.rows]
    work = Path(tempfile.mkdtemp(prefix="bench_build-"))
    data = work / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    chat = has_chat_template(tok)
    rendered = [render(tok, json.loads(line)["messages"], chat_template=chat) for line in lines]
    tokens = sum(len(r.input_ids) for r in rendered)
    answers = sum(r.n_answer for r in rendered)
    dtype = default_dtype()
    load_before = _load_average()
    writer_stats = _WriterStats()
    logging.getLogger("fusion_cache.capture.build").addHandler(writer_stats)
    logging.getLogger("fusion_cache.capture.build").setLevel(logging.INFO)

    runs = iter(range(1_000_000))
    last_capture = [0.0]

    def build(engine, k: int, codec: str, name: str) -> float:
        # a fresh --out every run: the same settings into an existing cache are a no-op (run_build reuses it)
        cfg = BuildConfig.create(
            teacher=args.teacher,
            data=str(data),
            out=str(work / f"{name}-{next(runs)}"),
            top_k=k,
            codec=codec,
            engine=engine.name,
            overwrite=True,
        )
        # time inside engine.capture too: tells the engine's share of each run from the rest (render, encode,
        # write, fsync, hash) without a profiler
        original, spent = engine.capture, [0.0]

        def timed_capture(requests, k):
            t = time.perf_counter()
            try:
                return original(requests, k)
            finally:
                spent[0] += time.perf_counter() - t

        engine.capture = timed_capture
        t = time.perf_counter()
        try:
            run_build(cfg, engine=engine, progress=False)
        finally:
            del engine.capture  # the instance attribute: the class method is back
        last_capture[0] = spent[0]
        return time.perf_counter() - t

    times: dict[str, list[float]] = {}
    if not args.no_hf:
        hf = HFEngine(teacher.path, dtype=dtype)
        build(hf, 64, "full", "warm-hf")
        times["build hf K=64 (full codec)"] = [build(hf, 64, "full", "hf")]
        hf.close()

    t = time.perf_counter()
    max_len = max(len(r.input_ids) for r in rendered)
    eng = VLLMEngine(teacher.path, dtype=dtype, max_model_len=max_len + 1, max_k=64)
    start_s = time.perf_counter() - t
    batched_tokens = eng.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r.input_ids.tolist()) for r in rendered]
    # prompt-logprob requests never read vLLM's prefix cache; a plain request would, and from the second pass over
    # the same prompts it would skip most of the prefill: skip reading it here too, or the ceiling is fake
    plain = SamplingParams(max_tokens=1, detokenize=False, skip_reading_prefix_cache=True)
    with_logprobs = SamplingParams(max_tokens=1, prompt_logprobs=64, detokenize=False, flat_logprobs=True)

    def prefill() -> float:
        t = time.perf_counter()
        eng.llm.generate(prompts, plain, use_tqdm=False)
        return time.perf_counter() - t

    def engine_only() -> float:
        t = time.perf_counter()
        with _prompt_logprob_arrays():
            eng.llm.generate(prompts, with_logprobs, use_tqdm=False)
        return time.perf_counter() - t

    paths = {
        PREFILL: prefill,
        ENGINE_ONLY: engine_only,
        "build vllm K=64 (full codec)": lambda: build(eng, 64, "full", "v64"),
        "build vllm K=10 (values codec)": lambda: build(eng, 10, "values", "v10"),
    }
    prefill()  # warm-up
    build(eng, 64, "full", "warm")
    writer, in_capture = {}, {}
    order = list(paths)
    for rep in range(args.reps):
        # rotate the order every repetition, so no path always runs right after the same neighbour
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            fn = paths[name]
            times.setdefault(name, []).append(fn())
            if name.startswith("build vllm"):
                writer.setdefault(name, []).append(writer_stats.last)
                in_capture.setdefault(name, []).append(last_capture[0])

    profiler = cProfile.Profile()
    profiler.enable()
    t = time.perf_counter()
    build(eng, 64, "full", "profiled")
    profiled_s = time.perf_counter() - t
    profiler.disable()
    hook = eng.last_answer_hook
    eng.close()
    load_after = _load_average()
    stats = pstats.Stats(profiler)
    shutil.rmtree(work, ignore_errors=True)

    median = {name: statistics.median(v) for name, v in times.items()}
    base = median[PREFILL]
    info = machine()
    out = [
        f"teacher `{args.teacher}` ({teacher.revision}), {dtype}, {len(rendered)} rows, {tokens} tokens "
        f"(answers {answers}); vLLM engine start {start_s:.1f} s, max_num_batched_tokens "
        f"{batched_tokens}",
        f"machine: {info['cpu']}, {info['cores']} cores, avx512_bf16={info['avx512_bf16']}, gpu={info['gpu']}; "
        f"torch {info['torch']}, vllm {info['vllm']}, fusion-cache {info['fusion_cache']}",
        f"load average (1/5/15 min, `uptime`): {load_before} before, {load_after} after; the machine is shared, "
        f"so every vLLM path ran {args.reps}x interleaved (order rotated each time) and the table shows medians",
        "",
        "| path | median s | runs (s) | tokens/s | ratio to prefill |",
        "|---|---|---|---|---|",
    ]
    for name, sec in median.items():
        runs = ", ".join(f"{s:.1f}" for s in times[name])
        ratio = f"{base / sec:.2f}" if not name.startswith("build hf") else f"{base / sec:.2f} (not interleaved)"
        out.append(f"| {name} | {sec:.2f} | {runs} | {tokens / sec:.0f} | {ratio} |")
    out.append("")
    for name in ("build vllm K=64 (full codec)", "build vllm K=10 (values codec)"):
        k = name.split()[2]
        out.append(f"{k}: ratio build/prefill: {base / median[name]:.2f}")
    out.append(f"vLLM's own prompt-logprob cost: ratio engine-only/prefill: {base / median[ENGINE_ONLY]:.2f}")
    out.append(
        f"stock vLLM prompt_logprobs call / build K=64: {median[ENGINE_ONLY] / median[BUILD_K64]:.2f} "
        "(above 1: the whole build, with logits at answer positions only, is faster than stock vLLM's call alone)"
    )
    for name, spent in in_capture.items():
        rest = ", ".join(f"{b - c:.1f}" for b, c in zip(times[name], spent, strict=True))
        out.append(
            f"{name}: engine.capture {', '.join(f'{c:.1f}' for c in spent)} s of the runs above; "
            f"the rest of run_build (render, encode, write, fsync, hash): {rest} s"
        )
    for name, stats_list in writer.items():
        if stats_list and stats_list[-1]:
            batches, busy, waited = stats_list[-1]
            out.append(
                f"{name}: writer thread {busy:.2f} s encoding+writing over {batches} batches, "
                f"engine waited {waited:.2f} s on it"
            )
    if hook is not None and hook.installed:
        out.append(
            f"answer-only prompt logprobs (profiled run): logits at {hook.scored_rows} answer positions, "
            f"{hook.skipped_rows} other prompt positions skipped, {hook.fallback_steps} steps on vLLM's own path"
        )
    else:
        out.append(f"answer-only prompt logprobs OFF: {getattr(hook, 'reason', 'disabled')}")
    out += [
        "",
        f"profile of one more `build vllm K=64` run ({profiled_s:.1f} s under cProfile, main thread; the writer "
        "thread's time is the line above):",
        "",
        "| part | cumulative s | share |",
        "|---|---|---|",
        *_profile_summary(stats, profiled_s),
    ]
    body = "\n".join(out)
    print(body)
    path = append_markdown(
        "build",
        f"{info['date']} capture throughput (interleaved, medians)",
        body,
        {
            **info,
            "rows": len(rendered),
            "tokens": tokens,
            "answers": answers,
            "dtype": dtype,
            "seconds": times,
            "load": [load_before, load_after],
            "pid": os.getpid(),
        },
    )
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
