"""Training-side performance: streaming reader vs trainer, KD vs CE-only step time, peak RSS as the cache grows.

    FUSION_CACHE_HOME=... PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py \
        [--cache /tmp/me/demo2/cache/train] [--student-layers 24] [--batch-size 4] [--rounds 4]

On one teacher cache (default: the demo's train cache of the embedded SmolLM2 teacher, K=64, raw codec) and the
demo's student (the teacher pruned to 24 of its 30 layers, `students.make_layer_subset_student`):

(a) the streaming reader's decode + collate answer tokens/s (`stream.DistillStream` + `batch.collate`, no model)
    against the trainer's consumption (answer tokens/s of `train.run_train` steps on the same cache); target >= 10x.
(b) the step time (forward + backward + AdamW step) of KD with ULD K=10 and with the top-K KL against a CE-only
    step (lambda = 0), same batches and student, interleaved in one run (the order rotates every round); target
    KD / CE <= 1.15. A CE-only step still computes the ULD value without a graph (the trainer logs it).
(c) peak RSS (``ru_maxrss`` of a child process from ``os.wait4``, one fresh process per measurement) of streaming
    the whole cache, and of a few train steps, on the cache and on a copy replicated 10x with the real shard
    writer; target: flat.

Appends the tables to benchmarks/results/train.md (and a JSON line to train.jsonl) with machine, date, version and
the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_markdown  # noqa: E402
from common import machine  # noqa: E402

DEMO_CACHE = "/tmp/me/demo2/cache/train"


# ------------------------------------------------------------------------------------------- helpers
def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def replicate_cache(src: str, out: Path, times: int, *, batch_rows: int = 16, shard_rows: int = 1000) -> Path:
    """Write ``times`` copies of ``src``'s rows (new sample ids) as a new cache with the real `ShardWriter`."""
    from fusion_cache.cache.fingerprint import chain_fingerprint
    from fusion_cache.cache.manifest import load_manifest
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.cache.resume import remove_part_records
    from fusion_cache.cache.writer import ShardWriter
    from fusion_cache.cache.writer import publish_directory

    if (out / "manifest.json").exists():
        return out
    reader = CacheReader(src)
    m = reader.manifest
    provenance = {
        "schema_version": m.schema_version,
        "k": m.k,
        "codec": m.codec,
        "config_fingerprint": m.config_fingerprint,
        "teacher": m.teacher.name,
        "revision": m.teacher.revision,
    }
    work = out.with_name(out.name + ".incomplete")
    n_rows = tokens = answer = 0
    with ShardWriter(work, provenance, shard_rows=shard_rows) as w:
        for copy in range(times):
            batch = []
            for row in reader.iter_rows():
                row.sample_id = hashlib.blake2b(f"{row.sample_id}/{copy}".encode(), digest_size=16).hexdigest()
                row.row_index = n_rows
                n_rows += 1
                tokens += len(row.input_ids)
                answer += row.n_answer
                batch.append(row)
                if len(batch) == batch_rows:
                    w.write_rows(batch)
                    batch = []
            if batch:
                w.write_rows(batch)
    remove_part_records(work)
    stats = m.stats.model_dump() | {
        "rows": n_rows,
        "tokens": tokens,
        "answer_tokens": answer,
        "payload_bytes": sum(s["bytes"] for s in w.shards),
    }
    fields = json.loads(m.to_json()) | {
        "shards": w.shards,
        "stats": stats,
        "fingerprint": chain_fingerprint(m.config_fingerprint, w.shards),
    }
    manifest = type(m).model_validate(fields)
    manifest.write(work)
    publish_directory(work, out, overwrite=False)
    load_manifest(out)  # validates the fingerprint chain
    return out


# Runs the measured command and prints its rusage. A child forked from a big process starts with that process's
# resident pages counted in its ru_maxrss (Linux carries the high-water mark across exec), so the measured command
# is started from this small launcher (a fresh interpreter without site-packages) instead of from the benchmark.
_LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=sys.stdout, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "ru_maxrss_kib": usage.ru_maxrss}))
"""


def child_peak_rss(args: list[str]) -> tuple[float, dict]:
    """(peak RSS in MiB of a fresh process running this script's ``--child args``, the JSON it printed)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    out = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    usage = json.loads(lines[-1])
    if usage["exit"] != 0:
        raise RuntimeError(f"child {args} exited with {usage['exit']}: {out.stdout[-2000:]}")
    return usage["ru_maxrss_kib"] / 1024, json.loads(lines[-2])  # ru_maxrss is KiB on Linux


def stream_pass(cache: str, tokenizer, *, batch_size: int, max_length: int, epochs: int, shuffle_buffer: int) -> dict:
    """Decode + collate every row ``epochs`` times, as the trainer's stream does (no model)."""
    from fusion_cache.capture.render import has_chat_template
    from fusion_cache.train.batch import collate
    from fusion_cache.train.stream import DistillStream

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stream = DistillStream(
        cache,
        tokenizer,
        chat_template=has_chat_template(tokenizer),
        max_length=max_length,
        shuffle_buffer=shuffle_buffer,
        epochs=epochs,
    )
    t = time.perf_counter()
    answer = rows = 0
    batch = []
    for ex in stream:
        batch.append(ex)
        if len(batch) == batch_size:
            answer += int(collate(batch, pad, 1)["answer_targets"].numel())
            rows += len(batch)
            batch = []
    if batch:
        answer += int(collate(batch, pad, 1)["answer_targets"].numel())
        rows += len(batch)
    seconds = time.perf_counter() - t
    return {"rows": rows, "answer_tokens": answer, "seconds": seconds, "tokens_per_s": answer / seconds}


def train_cfg(student: str, cache: str, out: str, *, steps: int, batch_size: int, **kw):
    from fusion_cache.train.config import TrainConfig

    settings = dict(
        student=student, shards=[cache], out=out, top_k=10, lr=1e-4, batch_size=batch_size,
        max_steps=steps, max_length=512, seed=0, save=False,
    )  # fmt: skip
    return TrainConfig.create(**{"lambda": 0.5, **settings, **kw})


# ------------------------------------------------------------------------------------------- children
def child(argv: list[str]) -> None:
    """One RSS measurement, run in its own process: ``stream CACHE TOKENIZER`` or ``train CACHE STUDENT OUT``."""
    what = argv[0]
    if what == "stream":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(argv[2])
        r = stream_pass(argv[1], tok, batch_size=4, max_length=512, epochs=1, shuffle_buffer=256)
        print(json.dumps(r))
    elif what == "train":
        from fusion_cache.train.trainer import run_train

        # cache order (no shuffle): both cache sizes train on the same first rows, so activations are comparable
        cfg = train_cfg(argv[2], argv[1], argv[3], steps=2, batch_size=4, shuffle_buffer=1)
        res = run_train(cfg, progress=False)
        print(json.dumps({"steps": res.summary["steps"], "answer_tokens": res.summary["answer_tokens"]}))
    elif what == "baseline":  # the interpreter with torch, transformers and the tokenizer loaded
        import torch  # noqa: F401
        from transformers import AutoTokenizer

        from fusion_cache.train.stream import DistillStream  # noqa: F401

        AutoTokenizer.from_pretrained(argv[1])
        print(json.dumps({}))
    else:
        raise SystemExit(f"unknown child {what!r}")


# ------------------------------------------------------------------------------------------- (b)
def interleaved_steps(student: str, cache: str, *, batch_size: int, rounds: int) -> dict:
    """Median step time of CE-only, KD ULD K=10 and KD top-K KL on the same batches, interleaved."""
    import torch

    from fusion_cache.capture.render import has_chat_template
    from fusion_cache.models.load import load_student
    from fusion_cache.train.batch import collate
    from fusion_cache.train.losses import make_loss
    from fusion_cache.train.stream import DistillStream
    from fusion_cache.train.trainer import StudentLoss

    model, tok, _ = load_student(student)
    model.train()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stream = iter(DistillStream(cache, tok, chat_template=has_chat_template(tok), max_length=512, shuffle_buffer=1))
    batches = [collate([next(stream) for _ in range(batch_size)], pad, 1) for _ in range(rounds + 1)]

    def loss(name="uld", lambda_=0.5):
        return StudentLoss(model, [make_loss(name, k=10)], lambda_)

    kinds = {
        "CE only (lambda=0)": loss(lambda_=0.0),
        "KD ULD K=10 (lambda=0.5)": loss(),
        "KD top-K KL (lambda=0.5)": loss("kl"),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95))
    names = list(kinds)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0 warms up every path and is not counted
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            o = kinds[name](batches[r])
            o.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t
            if r > 0:
                times[name].append(dt)
    ce = statistics.median(times[names[0]])
    tokens = [int(b["answer_targets"].numel()) for b in batches[1:]]
    return {
        "median_s": {n: statistics.median(v) for n, v in times.items()},
        "all_s": times,
        "ratio_to_ce": {n: statistics.median(v) / ce for n, v in times.items()},
        "answer_tokens_per_batch": tokens,
        "seq_len": [int(b["input_ids"].shape[1]) for b in batches[1:]],
    }


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=DEMO_CACHE, help="teacher cache (read only)")
    ap.add_argument("--teacher", default="smollm2-135m", help="the cache's teacher, pruned into the student")
    ap.add_argument("--student-layers", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4, help="(b): measured rounds of the three step kinds")
    ap.add_argument("--train-steps", type=int, default=6, help="(a): trainer steps (the first is not counted)")
    ap.add_argument("--stream-epochs", type=int, default=5, help="(a): passes of the reader over the cache")
    ap.add_argument("--scale", type=int, default=10, help="(c): the larger cache holds this many copies")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fusion-cache-bench-train")
    ap.add_argument("--sections", default="cab", help="which of a, b, c to run (default all)")
    ap.add_argument("--stream-rss-only", action="store_true", help="(c): skip the train-step children")
    ap.add_argument("--write-partial", type=Path, help="write the tables from an interrupted run's partial.json")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    if args.write_partial:
        write_results(json.loads(args.write_partial.read_text()), args)
        return

    from transformers import AutoTokenizer

    from fusion_cache.models.presets import resolve_model
    from fusion_cache.models.prune import make_layer_subset_student

    t_all = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    load_start = load_avg()
    teacher = resolve_model(args.teacher)
    student = str(
        make_layer_subset_student(teacher.path, args.work / f"student-{args.student_layers}l", args.student_layers)
    )
    tok = AutoTokenizer.from_pretrained(student)
    data: dict = {"machine": machine(), "cache": args.cache, "student_layers": args.student_layers,
                  "batch_size": args.batch_size, "load_start": load_start}  # fmt: skip

    if "c" in args.sections:
        measure_rss(args, data, student)
    if "a" in args.sections:
        measure_reader_vs_trainer(args, data, student, tok)
    if "b" in args.sections:
        # (b) KD vs CE-only step time, interleaved
        print("(b) interleaved steps ...", flush=True)
        data["b"] = interleaved_steps(student, args.cache, batch_size=args.batch_size, rounds=args.rounds)
        data["b"]["load"] = load_avg()
        (args.work / "partial.json").write_text(json.dumps(data, indent=1))
        print("    " + json.dumps(data["b"]["ratio_to_ce"]), flush=True)
    data["wall_s"] = time.perf_counter() - t_all
    write_results(data, args)


def measure_rss(args, data: dict, student: str) -> None:
    """(c) peak RSS as the cache grows."""
    from fusion_cache.cache.reader import CacheReader

    print("(c) peak RSS ...", flush=True)
    # the same shard size (the source's rows per shard) at both scales, plus the larger cache with 1000-row shards:
    # the reader memory-maps the shard it reads, so its pages count in RSS up to one shard's size
    rows = CacheReader(args.cache).manifest.shards[0].rows
    caches = {
        f"x1 ({rows}-row shards)": replicate_cache(args.cache, args.work / "cache-x1", 1, shard_rows=rows),
        f"x{args.scale} ({rows}-row shards)": replicate_cache(
            args.cache, args.work / f"cache-x{args.scale}", args.scale, shard_rows=rows
        ),
        f"x{args.scale} (1000-row shards)": replicate_cache(
            args.cache, args.work / f"cache-x{args.scale}-big-shards", args.scale, shard_rows=1000
        ),
    }
    rss: dict = {"baseline (python + torch + tokenizer)": child_peak_rss(["baseline", student])[0]}
    for name, cache in caches.items():
        m = CacheReader(cache).manifest
        size = sum(f.stat().st_size for f in cache.glob("*.arrow")) / 2**20
        mib, r = child_peak_rss(["stream", str(cache), student])
        rss[f"stream whole cache {name}: {r['rows']} rows, {len(m.shards)} shards, {size:.0f} MiB"] = mib
        if "1000-row" in name or args.stream_rss_only:
            continue
        out = args.work / f"run-c-{name.split()[0]}"
        if out.exists():
            shutil.rmtree(out)
        mib, _ = child_peak_rss(["train", str(cache), student, str(out)])
        rss[f"2 train steps (batch {args.batch_size}, cache order) on cache {name}"] = mib
    data["c"] = {"peak_rss_mib": rss, "load": load_avg()}
    (args.work / "partial.json").write_text(json.dumps(data, indent=1))  # survives an interrupted run
    for k, v in rss.items():
        print(f"    {k}: {v:.0f} MiB", flush=True)


def measure_reader_vs_trainer(args, data: dict, student: str, tok) -> None:
    """(a) the streaming reader's tokens/s against the trainer's."""
    from fusion_cache.train.trainer import run_train

    print("(a) streaming reader ...", flush=True)
    stream_pass(args.cache, tok, batch_size=args.batch_size, max_length=512, epochs=1, shuffle_buffer=256)  # warm
    reader = stream_pass(
        args.cache, tok, batch_size=args.batch_size, max_length=512, epochs=args.stream_epochs, shuffle_buffer=256
    )
    print(f"    {reader['tokens_per_s']:.0f} answer tokens/s; trainer ...", flush=True)
    out = args.work / "run-a"
    run_train(train_cfg(student, args.cache, str(out), steps=args.train_steps, batch_size=args.batch_size),
              progress=False)  # fmt: skip
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = recs[0], recs[-1]
    trainer_tps = (last["answer_tokens"] - first["answer_tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    data["a"] = {"reader": reader, "trainer_tokens_per_s": trainer_tps, "trainer_steps": len(recs) - 1,
                 "ratio": reader["tokens_per_s"] / trainer_tps, "load": load_avg()}  # fmt: skip
    (args.work / "partial.json").write_text(json.dumps(data, indent=1))
    print(f"    trainer {trainer_tps:.0f} answer tokens/s, ratio {data['a']['ratio']:.0f}x", flush=True)


def write_results(data: dict, args) -> None:
    """Append the tables to benchmarks/results/train.md; a section that was not measured says so."""
    m, a, b, c = data["machine"], data.get("a"), data.get("b"), data.get("c")
    skipped = f"Not measured in this run (`--sections {args.sections}`, or interrupted)."
    loads = ", ".join(f"after ({k}) {data[k]['load']}" for k in "cab" if data.get(k))
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu']}, torch {m['torch']}, fusion-cache "
        f"{m['fusion_cache']}; {m['date']}. Load average (1/5/15 min) at the start {data['load_start']}, {loads} "
        "(2 cores shared with other jobs: absolute times are noisy, the ratios are measured within one run).",
        "",
        f"Cache `{data['cache']}` (K=64, raw codec), student = the teacher pruned to {data['student_layers']} layers, "
        f"batch {data['batch_size']}, max length 512, fp32 on the CPU.",
        "",
        "(a) Streaming reader (decode + collate, no model) against the trainer's consumption (target >= 10x):",
        "",
    ]
    if a:
        lines += [
            "| what | answer tokens/s |",
            "|---|---|",
            f"| reader: DistillStream + collate, {a['reader']['rows']} rows ({args.stream_epochs} passes), "
            f"shuffle buffer 256 | {a['reader']['tokens_per_s']:.0f} |",
            f"| trainer: run_train, lambda 0.5 ULD K=10, steps 2..{a['trainer_steps'] + 1} | "
            f"{a['trainer_tokens_per_s']:.1f} |",
            f"| **ratio** | **{a['ratio']:.0f}x** ({'met' if a['ratio'] >= 10 else 'MISSED'}) |",
        ]
    else:
        lines.append(skipped)
    lines += ["", "(b) Step time (forward + backward + clip + AdamW), target KD / CE <= 1.15:", ""]
    if b:
        ce = b["median_s"]["CE only (lambda=0)"]
        lines += [
            f"Median of {args.rounds} interleaved rounds on the same batches (answer tokens per batch "
            f"{b['answer_tokens_per_batch']}, padded lengths {b['seq_len']}).",
            "",
            "| step | median s | / CE-only | all rounds (s) |",
            "|---|---|---|---|",
        ]
        for name, med in b["median_s"].items():
            r = med / ce
            verdict = "" if name.startswith("CE") else (" (met)" if r <= 1.15 else " (MISSED)")
            rounds = ", ".join(f"{x:.2f}" for x in b["all_s"][name])
            lines.append(f"| {name} | {med:.3f} | {r:.3f}{verdict} | {rounds} |")
    else:
        lines.append(skipped)
    lines += [
        "",
        f"(c) Peak RSS (ru_maxrss of a fresh child process per row, started from a small launcher), cache x1 vs "
        f"x{args.scale} replicated with the shard writer (target: flat):",
        "",
    ]
    if c:
        rss = c["peak_rss_mib"]
        keys = list(rss)
        lines += ["| measurement | peak RSS MiB |", "|---|---|", *(f"| {k} | {v:.0f} |" for k, v in rss.items()), ""]
        streams = [k for k in keys if k.startswith("stream")]
        trains = [k for k in keys if k.startswith("2 train")]
        if len(streams) >= 2:
            growth = f"streaming {rss[streams[1]] / rss[streams[0]]:.3f}"
            if len(trains) >= 2:
                growth += f", train steps {rss[trains[1]] / rss[trains[0]]:.3f}"
            lines.append(
                f"x{args.scale} / x1 at the same shard size: {growth}. The reader memory-maps the shard it is "
                "reading (file-backed pages count in RSS while mapped); RSS stays bounded by the shards in use, not "
                "by the cache, as long as no example keeps a view of an old shard (docs/training.md)."
            )
    else:
        lines.append(skipped)
    wall = f" ({data['wall_s']:.0f} s)" if "wall_s" in data else " (interrupted; written from its partial results)"
    lines += [
        "",
        f"Command: `PYTHONPATH=. python benchmarks/bench_train.py --cache {data['cache']} --rounds {args.rounds} "
        f"--train-steps {args.train_steps} --sections {args.sections}"
        f"{' --stream-rss-only' if args.stream_rss_only else ''}`{wall}.",
    ]
    md = append_markdown("train", f"Training throughput and memory ({m['date']})", "\n".join(lines), data)
    print("\n".join(lines))
    print(f"appended to {md}")


if __name__ == "__main__":
    main()
