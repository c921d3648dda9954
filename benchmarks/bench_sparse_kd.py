"""Sparse caches against full-vocabulary KD (issue 18 item 4): how close do top-K caches (with and without the tail
bucket) and sampled (RS-KD) caches come to distilling from the teacher's whole distribution?

    PYTHONPATH=. python benchmarks/bench_sparse_kd.py [--work /tmp/fc-sparsekd] [--lock /tmp/fc-cpu.lock]
    PYTHONPATH=. python benchmarks/bench_sparse_kd.py --table [--write-docs]

Setting (shared with `benchmarks/bench_packaged_quality.py`, whose helpers make it): the bundled demo prompts with
their gold answers, split into train, validation (40 train rows no run trains on) and held-out; the teacher
smollm2-135m; the student its 24-layer prune, the same start for every run. The teacher's caches are captured with
``--engine vllm`` (default; ``hf`` also works), codec ``full`` (what a user stores; its B/answer token are the
manifest's), top-K at K=12 and K=64, and the RS-KD sampled capture (codec ``sampled``) at N=12 and N=48.

Arms (`ARMS`): ``ce`` (lambda 0); ``full_kd``, the teacher run online in this process on the same batches, its full
logits in `full_kd_rows` (the quantity every sparse cache approximates); ``topk{12,64}_notail`` (``kl_notail``: the
top-K renormalised, the biased sparse KD most toolkits use); ``topk{12,64}_tail`` (``kl``: the top-K plus a tail
bucket); ``rs12`` and ``rs48`` (`RS_LOSS` on a sampled cache of N draws per position; N=48 tells sampling noise from
bias: a gap to full KD that is noise shrinks as N grows). Every arm trains in the same loop (`train_run`): the same
batches in the same order (the stream of the arm's train cache, shuffled by the seed; every cache holds the same
rows), AdamW with the trainer's schedule (`train.trainer.lr_lambda`), loss (1 - lambda) CE + lambda sum_r w_r d_r with
the trainer's row weights, and the same KD temperature. The trainer itself (`run_train`) reads teachers from caches
only, hence this loop.

Settings are chosen on the validation split only, at seed 0: the learning rate among `LRS` by the CE arm's validation
answer CE, then lambda among `LAMBDAS` by full KD's; every KD arm uses that lambda (the arms differ only in the
target). Every run records validation and held-out numbers; the choice reads validation only.

Metrics per run: held-out answer CE and ECE (`eval.calibration`: 15 equal-width top-1 bins) and the student's mass
outside the teacher's top-64 (`eval.evaluate.evaluate_model` against the K=64 held-out cache); validation CE and ECE
for the runs the choice reads. Per arm once: the cosine between the gradient of its distillation term (the CE arm:
of its CE) and full KD's, over all the student's parameters at the start weights, summed over `GRAD_BATCHES` fixed
train batches; and the cache's bytes per answer token.

Resumable: one JSON line per finished run (``"kind": "run"``) or gradient measurement (``"kind": "grad"``) in
``benchmarks/results/sparse_kd.jsonl`` with the machine, date and version; a rerun skips what is there. One torch
thread; ``--lock`` holds an flock on the shared CPU lock around each capture, each run and the gradient pass.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks' helpers, run from anywhere

from bench_packaged_quality import MAX_LENGTH  # noqa: E402  (the packaged setting: data, student, lengths)
from bench_packaged_quality import STUDENT_LAYERS  # noqa: E402
from bench_packaged_quality import T1 as TEACHER  # noqa: E402
from bench_packaged_quality import Paths  # noqa: E402
from bench_packaged_quality import cpu_lock  # noqa: E402
from bench_packaged_quality import write_data  # noqa: E402
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sparse_kd.jsonl"
SEEDS = (0, 1, 2)
LRS = (3e-4, 1e-3)  # the CE arm's candidates (validation, seed 0)
LAMBDAS = (0.5, 0.9)  # full KD's candidates at the chosen lr (validation, seed 0); every KD arm then uses the choice
KD_TEMPERATURE = 1.0  # the cached log-probs' own temperature: no rescaling on any arm
STEPS = 12  # x BATCH_SIZE = 48 train rows per run: a few minutes on one CPU thread
BATCH_SIZE = 4
GRAD_BATCHES = 2
CODEC = "full"
HELDOUT_K = 64  # the held-out cache the tail mass is measured against
GRID_ARMS = ("ce", "full_kd")  # the arms whose seed-0 validation numbers choose lr and lambda (`choose`)
RS_LOSS = "auto"  # the loss for a sampled cache: the registry's choice for its codec (rskd's importance-weighted KL)


@dataclass(frozen=True)
class Arm:
    """One arm: ``target`` "ce" (no teacher term), "full" (the online teacher) or "cache" (``loss`` on the cache
    ``sampling``/``k``). CE and full KD read the top-64 cache's stream for their batches (targets unused)."""

    name: str
    target: str
    k: int = 64
    loss: str = "kl"
    sampling: str = "topk"

    @property
    def cache_key(self) -> str:
        return f"{self.sampling}{self.k}"


ARMS = (
    Arm("ce", "ce"),
    Arm("full_kd", "full"),
    Arm("topk12_notail", "cache", 12, "kl_notail"),
    Arm("topk12_tail", "cache", 12, "kl"),
    Arm("topk64_notail", "cache", 64, "kl_notail"),
    Arm("topk64_tail", "cache", 64, "kl"),
    Arm("rs12", "cache", 12, RS_LOSS, "rs"),
    Arm("rs48", "cache", 48, RS_LOSS, "rs"),  # the N sweep: does a gap to full KD shrink with more draws?
)
RS_ARMS = tuple(a.name for a in ARMS if a.sampling == "rs")
ARM_NAMES = tuple(a.name for a in ARMS)


def rs_available() -> str | None:
    """None when this checkout can build sampled caches (`BuildConfig` has ``sampling``), else why not (one line)."""
    from fusion_cache.capture.config import BuildConfig

    if "sampling" not in BuildConfig.model_fields:
        return "rs arms skipped: this checkout has no sampled capture (BuildConfig has no 'sampling' field)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# the reference: KD from the teacher's full logits


def full_kd_rows(student_logits, teacher_logits, temperature: float = 1.0):
    """Per-row T^2 KL(softmax(z_t / T) || softmax(z_s / T)) over the whole vocabulary: full-vocabulary KD.

    The T^2 factor is `train.losses.TopKKL`'s, so lambda means the same on every arm.

    Args:
        student_logits: [N, V] (computed in fp32; differentiable).
        teacher_logits: [N, V] the teacher's logits at the same positions (no gradient).
        temperature: KD temperature T.

    Returns:
        [N] fp32 divergences.
    """
    import torch

    log_p = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# data, caches


def cache_dir(paths: Paths, key: str, split: str) -> Path:
    return paths.work / "cache" / key / split


def build_caches(paths: Paths, engine_name: str, lock: Path | None, rs: tuple[str, ...] = ()) -> dict[str, dict]:
    """Capture the teacher's caches (kept when built): top-64 of train and held-out, top-12 of train, and the
    sampled train cache of each rs arm in ``rs``. Returns {cache key: {"bytes_per_answer_token", "payload_bytes",
    "answer_tokens", "wall_seconds"}} of the train caches."""
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig
    from fusion_cache.capture.engines import make_engine
    from fusion_cache.models.hardware import default_dtype
    from fusion_cache.models.presets import resolve_model

    dtype = default_dtype()
    wanted = [("topk64", "train", {"top_k": 64}), ("topk64", "heldout", {"top_k": HELDOUT_K}),
              ("topk12", "train", {"top_k": 12})]  # fmt: skip
    for name in rs:  # the sampled caches of the rs arms asked for
        n = arm_of(name).k
        wanted.append((arm_of(name).cache_key, "train", {"sampling": "rs", "samples": n, "codec": "sampled"}))
    cfgs = [
        BuildConfig.create(teacher=TEACHER, data=str(paths.data(split)), out=str(cache_dir(paths, key, split)),
                           engine=engine_name, max_length=MAX_LENGTH, dtype=dtype, overwrite=True,
                           **({"codec": CODEC} | extra))
        for key, split, extra in wanted
    ]  # fmt: skip
    cfgs = [c for c in cfgs if not (Path(c.out) / "manifest.json").exists()]  # a cache once built is kept
    if cfgs:
        with cpu_lock(lock, "capture"):
            extra = {"max_model_len": 2048, "max_k": 64} if engine_name == "vllm" else {}
            engine = make_engine(engine_name, resolve_model(TEACHER).path, dtype=dtype, **extra)
            try:
                for cfg in cfgs:
                    m = run_build(cfg, engine=engine, progress=False)
                    print(f"[bench] {cfg.out}: {m.stats.rows} rows, {m.bytes_per_answer_token:.1f} B/answer token, "
                          f"{m.stats.wall_seconds:.0f} s", flush=True)  # fmt: skip
            finally:
                engine.close()
    out = {}
    for key, split, _ in wanted:
        if split == "train":
            m = CacheReader(str(cache_dir(paths, key, split))).manifest
            out[key] = {"bytes_per_answer_token": round(m.bytes_per_answer_token, 2),
                        "payload_bytes": m.stats.payload_bytes, "answer_tokens": m.stats.answer_tokens,
                        "wall_seconds": m.stats.wall_seconds, "engine": engine_name,
                        "codec": m.codec["name"]}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# one arm's objective and its training run


@dataclass(frozen=True)
class Job:
    arm: str
    seed: int
    lr: float
    lambda_: float

    @property
    def key(self) -> tuple:
        return ("run", self.arm, self.seed, self.lr, self.lambda_, KD_TEMPERATURE, STEPS)


def line_key(line: dict) -> tuple:
    if line["kind"] == "grad":
        return ("grad", line["arm"])
    return ("run", line["arm"], line["seed"], line["lr"], line["lambda"], line["kd_temperature"], line["steps"])


def arm_of(name: str) -> Arm:
    return next(a for a in ARMS if a.name == name)


class Objective:
    """(1 - lambda) CE + lambda sum_r w_r d_r for one arm on `train.batch.collate` batches, d from the arm's cache
    loss or from the online teacher (`full_kd_rows`); w_r the trainer's row weights (mean over a sample's rows, then
    over the batch's samples)."""

    def __init__(self, arm: Arm, paths: Paths, tokenizer, seed: int, teacher=None):
        from fusion_cache.train.config import TrainConfig
        from fusion_cache.train.trainer import plan_teachers

        self.arm, self.tokenizer, self.teacher = arm, tokenizer, teacher
        cache = cache_dir(paths, arm.cache_key if arm.target == "cache" else "topk64", "train")
        loss = arm.loss if arm.target == "cache" else "kl"  # CE and full KD: the cache gives only the batches
        self.cfg = TrainConfig.create(student=str(paths.student), shards=[str(cache)], out=str(paths.work / "unused"),
                                      kd_loss=[loss], kd_temperature=KD_TEMPERATURE, batch_size=BATCH_SIZE,
                                      max_steps=STEPS, max_length=MAX_LENGTH, seed=seed, save=False)  # fmt: skip
        self.plan = plan_teachers(self.cfg, tokenizer)  # the loss, checked against the cache as training checks it
        self.loss = self.plan.losses[0]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def batches(self, n: int):
        """The first ``n`` batches of the arm's train stream (shuffled by the seed; as many epochs as needed)."""
        from fusion_cache.cache.reader import CacheReader
        from fusion_cache.train.trainer import make_stream
        from fusion_cache.train.trainer import plan_steps

        rows = CacheReader(self.cfg.shards[0]).manifest.stats.rows
        _, epochs = plan_steps(self.cfg.model_copy(update={"max_steps": n}), rows, 1)
        examples = iter(make_stream(self.cfg, self.tokenizer, epochs, self.plan))
        for _ in range(n):
            yield list(islice(examples, BATCH_SIZE))

    def terms(self, student, examples: list):
        """(ce, kd) scalars of one batch; kd carries the graph of the arm's term (zero for the CE arm)."""
        import torch
        import torch.nn.functional as F

        from fusion_cache.train.batch import collate
        from fusion_cache.train.objective import answer_logits

        batch = collate(examples, self.pad, 1)
        logits = answer_logits(student, batch)  # [M, V]
        ce = F.cross_entropy(logits.float(), batch["answer_targets"])
        t = batch["teachers"][0]
        if self.arm.target == "ce" or t is None:
            return ce, logits.new_zeros((), dtype=torch.float32)
        rows = logits[t["rows"]]  # [N, V]
        if self.arm.target == "full":
            with torch.no_grad():
                z_t = answer_logits(self.teacher, batch)[t["rows"]]  # the same tokens: the teacher's tokenizer
            d = full_kd_rows(rows, z_t, KD_TEMPERATURE)
        else:
            d = self.loss.rows(rows, t)
        return ce, (t["loss_weights"].to(d.dtype) * d).sum()


def load_teacher():
    """The teacher for online full KD, in the capture's dtype (the caches' teacher numerics), eval mode."""
    from fusion_cache.models.hardware import default_dtype
    from fusion_cache.models.load import load_student
    from fusion_cache.models.presets import resolve_model

    teacher, _, _ = load_student(resolve_model(TEACHER).path, default_dtype(), role="teacher")
    return teacher.eval().requires_grad_(False)


def train_run(job: Job, paths: Paths) -> dict:
    """Train the start student as ``job`` says, then score held-out and, for the runs the choice reads (`GRID_ARMS`
    at seed 0), validation (elsewhere None: the validation pass is a third of a run and nothing reads it)."""
    import torch

    from fusion_cache.eval.evaluate import evaluate_model
    from fusion_cache.eval.evaluate import evaluate_rows
    from fusion_cache.models.load import load_student
    from fusion_cache.train.trainer import lr_lambda

    arm = arm_of(job.arm)
    torch.manual_seed(job.seed)
    student, tok, _ = load_student(str(paths.student))
    teacher = load_teacher() if arm.target == "full" else None
    obj = Objective(arm, paths, tok, job.seed, teacher)
    cfg = obj.cfg
    opt = torch.optim.AdamW(student.parameters(), lr=job.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(STEPS, math.ceil(cfg.warmup_ratio * STEPS)))
    student.train()
    seen = hashlib.sha256()  # which rows were trained on, in order: equal across arms of a seed
    last: dict = {}
    t0 = time.perf_counter()
    for step, examples in enumerate(obj.batches(STEPS)):
        seen.update("\n".join(e.sample_id for e in examples).encode())
        ce, kd = obj.terms(student, examples)
        loss = (1.0 - job.lambda_) * ce + job.lambda_ * kd if job.lambda_ > 0 else ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        last = {"step": step + 1, "loss": float(loss), "ce": float(ce), "kd": float(kd)}
    train_s = time.perf_counter() - t0
    del teacher
    t = time.perf_counter()
    validate = job.seed == 0 and job.arm in GRID_ARMS
    val = evaluate_rows(student, tok, str(paths.data("validation")), max_length=MAX_LENGTH) if validate else {}
    held = evaluate_model(student, tok, str(cache_dir(paths, "topk64", "heldout")), max_length=MAX_LENGTH)
    return {
        "kind": "run",
        "arm": job.arm,
        "seed": job.seed,
        "lr": job.lr,
        "lambda": job.lambda_,
        "kd_temperature": KD_TEMPERATURE,
        "steps": STEPS,
        "batch_size": BATCH_SIZE,
        "loss": None if arm.target == "ce" else ("full_kd" if arm.target == "full" else arm.loss),
        "cache": arm.cache_key if arm.target == "cache" else None,
        "heldout_answer_ce": held["answer_ce"],
        "heldout_answer_ece": held["answer_ece"],
        "heldout_tail_mass": held["tail_mass"],  # outside the teacher's top-64
        "heldout_top1_agreement": held["top1_agreement"],
        "validation_answer_ce": val.get("answer_ce"),
        "validation_answer_ece": val.get("answer_ece"),
        "answer_tokens": {"validation": val.get("answer_tokens"), "heldout": held["answer_tokens"]},
        "rows_sha256": seen.hexdigest()[:16],
        "final_step": last,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - t, 1),
    }


def grad_lines(paths: Paths, arms: list[Arm]) -> list[dict]:
    """Per arm, the cosine between the gradient of its distillation term (the CE arm: its CE) and full KD's, over
    every parameter of the start student, summed over the first `GRAD_BATCHES` batches of the seed-0 stream."""
    import torch

    from fusion_cache.models.load import load_student

    student, tok, _ = load_student(str(paths.student))
    student.train()
    teacher = load_teacher()
    params = [p for p in student.parameters() if p.requires_grad]

    def grad(arm: Arm) -> tuple[torch.Tensor, str]:
        obj = Objective(arm, paths, tok, 0, teacher)
        seen = hashlib.sha256()
        for examples in obj.batches(GRAD_BATCHES):
            seen.update("\n".join(e.sample_id for e in examples).encode())
            ce, kd = obj.terms(student, examples)
            (ce if arm.target == "ce" else kd).backward()
        g = torch.cat([p.grad.flatten() for p in params]).double()
        student.zero_grad(set_to_none=True)
        return g, seen.hexdigest()[:16]

    ref, ref_rows = grad(arm_of("full_kd"))
    out = []
    for arm in arms:
        g, rows = (ref, ref_rows) if arm.name == "full_kd" else grad(arm)
        cos = float(torch.dot(g, ref) / (g.norm() * ref.norm()))
        out.append({"kind": "grad", "arm": arm.name, "grad_cosine_to_full_kd": cos,
                    "grad_norm_ratio_to_full_kd": float(g.norm() / ref.norm()), "grad_batches": GRAD_BATCHES,
                    "rows_sha256": rows, "same_rows_as_full_kd": rows == ref_rows})  # fmt: skip
        del g
        gc.collect()
    return out


# ---------------------------------------------------------------------------------------------------------------
# planning: the choice on validation, then the seeds


def choose(lines: list[dict]) -> dict[str, float] | None:
    """{"lr", "lambda"} chosen on validation at seed 0 (None until its candidates have run): lr by the CE arm's
    validation answer CE, then lambda by full KD's at that lr. Held-out numbers are never read here."""
    val = {line_key(x): x["validation_answer_ce"] for x in lines if x["kind"] == "run" and x["arm"] in GRID_ARMS}

    def key(arm, lr, lam):
        return ("run", arm, 0, lr, lam, KD_TEMPERATURE, STEPS)

    if not all(key("ce", lr, 0.0) in val for lr in LRS):
        return None
    lr = min(LRS, key=lambda c: val[key("ce", c, 0.0)])
    if not all(key("full_kd", lr, lam) in val for lam in LAMBDAS):
        return {"lr": lr}
    return {"lr": lr, "lambda": min(LAMBDAS, key=lambda c: val[key("full_kd", lr, c)])}


def plan(lines: list[dict], arm_names: list[str], seeds=SEEDS) -> list[Job]:
    """The runs that can run now and have not, in order: the lr grid, the lambda grid, then every arm's seeds."""
    done = {line_key(x) for x in lines}
    c = choose(lines) or {}
    todo = [Job("ce", 0, lr, 0.0) for lr in LRS]
    if "lr" in c:
        todo += [Job("full_kd", 0, c["lr"], lam) for lam in LAMBDAS]
    if "lambda" in c:
        for seed in seeds:  # seed-major: a partial table has every arm at the first seeds
            for name in arm_names:
                todo.append(Job(name, seed, c["lr"], 0.0 if name == "ce" else c["lambda"]))
    return [j for j in dict.fromkeys(todo) if j.key not in done]


# ---------------------------------------------------------------------------------------------------------------
# the table


def load_lines(path: Path = RESULTS) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def mean_sd(xs: list[float], digits: int = 4) -> str:
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def versus(a: dict[int, float], ref: dict[int, float], digits: int = 4, words: tuple[str, str] = ("worse", "better")):
    """Paired by seed: mean ± sd of a - ref, and "tie" when |mean| is not above the seed spread (the largest of the
    paired differences' sd and each arm's own sd over seeds); else ``words`` (above, below: "worse", "better" for
    CE and ECE; "higher", "lower" for a quantity with no better side)."""
    seeds = sorted(a.keys() & ref.keys())
    if len(seeds) < 2:
        return "n/a"
    d = [a[s] - ref[s] for s in seeds]
    m = statistics.mean(d)
    spread = max(statistics.stdev(xs) for xs in (d, [a[s] for s in seeds], [ref[s] for s in seeds]))
    verdict = "tie" if abs(m) <= spread else (words[0] if m > 0 else words[1])
    return f"{m:+.{digits}f} ± {statistics.stdev(d):.{digits}f} {verdict}"


def table(lines: list[dict], caches: dict[str, dict] | None = None) -> str:
    """Markdown: per arm at the chosen settings, mean ± sd over seeds of the held-out answer CE, ECE and tail mass,
    each paired against full KD; the gradient cosine; the cache's B/answer token; then the validation grid."""
    c = choose(lines)
    if not c or "lambda" not in c:
        return "(the validation choice has not finished: nothing to tabulate yet)"
    chosen = {a: ("run", a, c["lr"], 0.0 if a == "ce" else c["lambda"], KD_TEMPERATURE, STEPS) for a in ARM_NAMES}
    runs = [x for x in lines if x["kind"] == "run" and line_key(x)[:2] + line_key(x)[3:] == chosen[x["arm"]]]
    grads = {x["arm"]: x for x in lines if x["kind"] == "grad"}
    if caches is None:  # every cache any run recorded, the latest record of each (runs of some arms add caches)
        caches = {}
        for x in lines:
            caches.update(x.get("caches") or {})
    cols = ("heldout_answer_ce", "heldout_answer_ece", "heldout_tail_mass")
    per = {a: {col: {x["seed"]: x[col] for x in runs if x["arm"] == a} for col in cols} for a in ARM_NAMES}
    out = [
        "| arm | cache B/answer token | seeds | held-out CE | vs full KD | held-out ECE | vs full KD | "
        "mass outside top-64 | vs full KD | grad cosine to full KD |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        vals = per[arm.name]
        n = len(vals[cols[0]])
        if not n:
            out.append(f"| {arm.name} | | 0 | not run | | | | | | |")
            continue
        b = caches.get(arm.cache_key, {}).get("bytes_per_answer_token") if arm.target == "cache" else None
        cells = [f"{b:.1f}" if b is not None else "-", str(n)]
        for col in cols:
            words = ("higher", "lower") if col == "heldout_tail_mass" else ("worse", "better")
            vs = versus(vals[col], per["full_kd"][col], words=words) if arm.name != "full_kd" else ""
            cells += [mean_sd(list(vals[col].values())), vs]
        g = grads.get(arm.name)
        cells.append(f"{g['grad_cosine_to_full_kd']:.3f}" if g else "n/a")
        out.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"Chosen on validation (seed 0): lr {c['lr']:g}, lambda {c['lambda']:g}; KD temperature {KD_TEMPERATURE:g}, "
        f"{STEPS} steps of {BATCH_SIZE} rows. Differences are paired by seed (arm minus full KD, mean ± sd; lower is "
        "better); a gap smaller than the seed spread (the largest of the differences' sd and the two arms' sd over "
        "seeds) is called a tie. The gradient cosine is of the distillation term alone (CE arm: its CE) over all "
        f"parameters at the start weights, {GRAD_BATCHES} fixed batches.",
        "",
        "Validation grid (seed 0; the choice reads this only):",
        "",
        "| arm | lr | lambda | val CE | val ECE |",
        "|---|---|---|---|---|",
    ]
    grid = [x for x in lines if x["kind"] == "run" and x["seed"] == 0 and x["arm"] in GRID_ARMS]
    for x in sorted(grid, key=lambda x: (x["arm"], x["lr"], x["lambda"])):
        out.append(f"| {x['arm']} | {x['lr']:g} | {x['lambda']:g} | {x['validation_answer_ce']:.4f} | "
                   f"{x['validation_answer_ece']:.4f} |")  # fmt: skip
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# running


def _append(path: Path, line: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fc-sparsekd"), help="data, caches and student start")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the finished runs and exit")
    ap.add_argument("--write-docs", action="store_true", help="with --table: also write it into docs/results.md")
    ap.add_argument("--engine", default="vllm", choices=("vllm", "hf"), help="capture engine")
    ap.add_argument("--arms", nargs="+", default=list(ARM_NAMES), choices=ARM_NAMES, help="only these arms")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of the comparison")
    ap.add_argument("--lock", type=Path, default=None, help="flock this file around each capture and run")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (resume later)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSONL file of finished runs")
    args = ap.parse_args()
    if args.table:
        text = table(load_lines(args.results))
        print(text)
        if args.write_docs:
            write_docs(text)
        return

    import torch

    from fusion_cache.models.presets import resolve_model
    from fusion_cache.models.prune import make_layer_subset_student

    torch.set_num_threads(1)
    paths = Paths(args.work)
    arms = list(args.arms)
    if set(RS_ARMS) & set(arms) and (why := rs_available()) is not None:
        print(f"[bench] {why}", flush=True)
        arms = [a for a in arms if a not in RS_ARMS]
    write_data(paths)
    caches = build_caches(paths, args.engine, args.lock, rs=tuple(a for a in arms if a in RS_ARMS))
    make_layer_subset_student(resolve_model(TEACHER).path, paths.student, STUDENT_LAYERS)
    common = {"machine": machine(), "torch_threads": 1, "engine": args.engine, "codec": CODEC, "max_length": MAX_LENGTH,
              "student_layers": STUDENT_LAYERS, "teacher": TEACHER, "caches": caches}  # fmt: skip
    done = {line_key(x) for x in load_lines(args.results)}
    missing = [arm_of(a) for a in ["full_kd", *arms] if ("grad", a) not in done]
    if missing:
        with cpu_lock(args.lock, "gradient cosines"):
            for line in grad_lines(paths, list(dict.fromkeys(missing))):
                _append(args.results, line | common | {"date": common["machine"]["date"]})
    runs = 0
    while jobs := plan(load_lines(args.results), arms, tuple(args.seeds)):
        if args.max_runs is not None and runs >= args.max_runs:
            print(f"[bench] --max-runs {args.max_runs} reached; {len(jobs)} runnable job(s) left", flush=True)
            break
        job = jobs[0]
        with cpu_lock(args.lock, f"{job.arm} seed {job.seed} lr {job.lr:g} lambda {job.lambda_:g}"):
            line = train_run(job, paths) | common
        line["codec"] = caches.get(arm_of(job.arm).cache_key, {}).get("codec", CODEC)  # the arm's own cache's
        line["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _append(args.results, line)
        runs += 1
        print(f"[bench] {job.arm} seed {job.seed} lr {job.lr:g} lambda {job.lambda_:g}: val CE "
              f"{line['validation_answer_ce']}, held-out CE {line['heldout_answer_ce']:.4f} ECE "
              f"{line['heldout_answer_ece']:.4f}, train {line['train_seconds']:.0f} s, "
              f"eval {line['eval_seconds']:.0f} s",
              flush=True)  # fmt: skip
    print(table(load_lines(args.results)))


DOCS_HEADING = "## Sparse caches against full-vocabulary KD (benchmarks/bench_sparse_kd.py)"


def write_docs(text: str) -> None:
    """Replace (or add) this benchmark's section of docs/results.md with the table and the command that made it."""
    from common import replace_section

    body = ("`PYTHONPATH=. python benchmarks/bench_sparse_kd.py --lock /tmp/fc-cpu.lock` (runs), then "
            "`PYTHONPATH=. python benchmarks/bench_sparse_kd.py --table --write-docs` (this table); results in "
            "`benchmarks/results/sparse_kd.jsonl`.\n\n" + text)  # fmt: skip
    replace_section(ROOT / "docs" / "results.md", DOCS_HEADING, body, first=True)  # newest results first


if __name__ == "__main__":
    main()
