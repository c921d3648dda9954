"""Cost of exact resume on the demo setup: checkpoint size, save and load time, and the stream's resume time.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_checkpoint.py [--cache DIR] [--work /tmp/bench-checkpoint]

The student is the demo's (the first 3 and last 3 of SmolLM2-135M's 30 layers, fp32), after one AdamW step so the
optimizer holds its two moment buffers. Checkpoint save (`checkpoint.save_checkpoint`: safetensors + torch.save +
JSON, every file fsynced, then a rename) and load (`load_checkpoint`, weights_only) are timed over a few repeats and
put next to one training step of the same student (batch 4, the demo cache) measured in the same run, so the
overhead of ``--checkpoint-every N`` is save / (N x step). The stream is advanced to 3/4 of the cache with a
``--buffer``-row shuffle buffer (smaller than the cache, so the read position is inside the epoch); resuming from its
saved state (re-decoding the buffered rows) is compared with the naive alternative of replaying the stream from the
start to the same example. The load average is recorded: on a shared machine every timing stretches with it.
Appends to benchmarks/results/checkpoint.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_TEACHER = "/work/main/.fusion-cache/models/smollm2-135m-b179c9523d0e"
DEFAULT_CACHE = "/tmp/me/demo2/cache/train"


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    import torch
    from common import append_markdown
    from common import machine

    from fusion_cache.capture.render import has_chat_template
    from fusion_cache.models.load import load_student
    from fusion_cache.models.prune import make_layer_subset_student
    from fusion_cache.train.batch import collate
    from fusion_cache.train.checkpoint import load_checkpoint
    from fusion_cache.train.checkpoint import rng_state
    from fusion_cache.train.checkpoint import save_checkpoint
    from fusion_cache.train.losses import make_loss
    from fusion_cache.train.stream import DistillStream
    from fusion_cache.train.trainer import StudentLoss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=DEFAULT_TEACHER)
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--work", default="/tmp/bench-checkpoint")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--buffer", type=int, default=16, help="shuffle buffer rows")
    args = ap.parse_args()
    work = Path(args.work)
    student_dir = make_layer_subset_student(args.teacher, work / "student-6l", 6)
    model, tok, _ = load_student(str(student_dir))
    loss = StudentLoss(model, [make_loss("uld")], 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stream = DistillStream(
        args.cache, tok, chat_template=has_chat_template(tok), max_length=1024, shuffle_buffer=args.buffer
    )
    rows = stream.readers[0].manifest.stats.rows

    def step(examples):
        o = loss(collate(list(islice(examples, 4)), pad, 1))
        o.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    it = stream.iterator()
    step(it)  # warm-up, and gives AdamW its moment buffers
    step_s, _ = _timed(lambda: step(it), args.repeats)

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    state = {"stream": it.state_dict(), "rng": rng_state()}
    counter = iter(range(1, 1000))

    def save():
        return save_checkpoint(
            run,
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            trainer={"step": next(counter), "world_size": 1},
            ranks=[state],
            keep=2,
        )

    save_s, path = _timed(save, args.repeats)
    size = sum(p.stat().st_size for p in path.iterdir())
    load_s, _ = _timed(lambda: load_checkpoint(path), args.repeats)

    # the stream: advance to 3/4 of the cache, then resume there from the state vs replay from the start
    position = 3 * rows // 4
    mid = stream.iterator()
    for _ in range(position):
        next(mid)
    saved = mid.state_dict()
    expect = next(mid).sample_id
    resume_s, first = _timed(lambda: next(stream.iterator(saved)), args.repeats)
    replay_s, again = _timed(lambda: next(islice(stream.iterator(), position, None)), args.repeats)
    assert first.sample_id == again.sample_id == expect

    n_params = sum(p.numel() for p in model.parameters())
    info = machine()
    body = (
        f"{info['date']}, {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
        f"fusion-cache {info['fusion_cache']}; student: 6 of SmolLM2-135M's layers, fp32, {n_params / 1e6:.1f}M "
        f"parameters; cache {args.cache} ({rows} rows); median of {args.repeats}; load average "
        f"{os.getloadavg()[0]:.1f} (shared machine: timings stretch with it).\n\n"
        "| what | value |\n|---|---|\n"
        f"| checkpoint size (weights + AdamW state + JSON) | {size / 2**20:.1f} MiB |\n"
        f"| save (fsync + rename) | {save_s:.2f} s |\n"
        f"| load (safetensors + weights_only) | {load_s:.2f} s |\n"
        f"| one training step, batch 4 (baseline) | {step_s:.2f} s |\n"
        f"| save / step: overhead of --checkpoint-every 100 | {save_s / step_s:.2f} steps = "
        f"{100 * save_s / (100 * step_s):.1f}% |\n"
        f"| stream resume at example {position} from its state ({args.buffer}-row buffer re-decoded) | "
        f"{resume_s:.3f} s |\n"
        f"| stream replay from the start to the same row (naive baseline) | {replay_s:.3f} s |\n"
    )
    data = {**info, "size_bytes": size, "save_s": save_s, "load_s": load_s, "step_s": step_s,
            "stream_resume_s": resume_s, "stream_replay_s": replay_s, "position": position, "rows": rows}  # fmt: skip
    md = append_markdown("checkpoint", "Checkpoint and resume cost (demo student)", body, data)
    print(body)
    print(f"appended to {md}")


if __name__ == "__main__":
    main()
