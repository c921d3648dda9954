"""`fusion-cache run RECIPE.yaml`: the whole pipeline of a recipe (`fusion_cache.recipes.config`), stage by stage.

    fusion-cache run demo                                # a shipped recipe (fusion_cache/recipes/configs/)
    fusion-cache run my.yaml --out ./runs/x --set train.max_steps=100

Stages, in order, each under ``<out>``:

1. data: the bundled rows written to ``data/`` (recipes with ``data: {bundled: demo}``);
2. build: every teacher's cache of the train rows (``cache/<teacher>/train``) and, for the evaluation, of the
   held-out rows (``cache/<teacher>/heldout``); one engine per teacher, started only if a cache is missing;
3. student: the pruned student (``student-<N>l``), when the recipe asks for one;
4. train: one run against every cache (``train/``), or one per cache (``runs/<teacher>/``, mode pairwise);
5. merge: the pairwise runs merged around the student (``merged/``);
6. eval: held-out metrics of the result (``eval.json``).

Resumable: each stage's fingerprint (its settings and the fingerprints of what it reads) goes to
``stages/<stage>.json`` when it starts and when it is done; a rerun skips a done stage with the same fingerprint and
says so, continues an interrupted build or training (from its shards / checkpoints) when the fingerprint is the
same, and redoes a stage whose fingerprint changed. The resolved recipe goes to ``<out>/recipe.yaml``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fusion_cache.cache.fingerprint import hash_json
from fusion_cache.config import load_config_file
from fusion_cache.errors import ConfigError
from fusion_cache.recipes.config import PrunedStudent
from fusion_cache.recipes.config import Recipe
from fusion_cache.recipes.config import RecipePlan
from fusion_cache.recipes.config import plan_recipe

Say = Callable[[str], None]
STAGES_DIR = "stages"
RECIPE_FILE = "recipe.yaml"
# Settings that do not change what a stage computes (left out of its fingerprint).
_NOT_COMPUTED = ("out", "overwrite", "resume", "report_to", "log_every", "keep_checkpoints", "checkpoint_every",
                 "threads")  # fmt: skip


# ------------------------------------------------------------------------------------------------ loading
def shipped_recipes() -> dict[str, Path]:
    """{name: path} of the recipes fusion-cache ships (``fusion_cache/recipes/configs/*.yaml``)."""
    root = resources.files("fusion_cache.recipes") / "configs"
    return {Path(str(f)).stem: Path(str(f)) for f in root.iterdir() if str(f).endswith(".yaml")}


def recipe_summary(path: str | Path) -> str:
    """The first line of a recipe's header comment (what it is)."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _set(data: dict, dotted: str, value: Any) -> None:
    """``data[a][b][...] = value`` for ``dotted`` = "a.b...." (a number indexes a list)."""
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {dotted}: {'.'.join(keys[:i]) or 'the recipe'} has no item {key!r}")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:i])} is not a section")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def load_recipe(source: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe from a file or a shipped recipe's name, with ``key.path=value`` overrides (values read as YAML).

    Raises:
        ConfigError: no such file or recipe, a bad override, or invalid settings (every problem at once).
    """
    import yaml

    path = Path(source)
    if not path.exists():
        shipped = shipped_recipes()
        if str(source) not in shipped:
            raise ConfigError(f"recipe: {source} is neither a file nor a shipped recipe ({', '.join(sorted(shipped))})")
        path = shipped[str(source)]
    data = load_config_file(path)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=100")
        _set(data, key.strip(), yaml.safe_load(text))
    return Recipe.create(**data)


# ------------------------------------------------------------------------------------------------ stage records
class Stages:
    """``<out>/stages/<stage>.json``: the fingerprint a stage started and finished with."""

    def __init__(self, out: Path, say: Say):
        self.dir = out / STAGES_DIR
        self.say = say

    def _read(self, stage: str) -> dict:
        p = self.dir / f"{stage}.json"
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except json.JSONDecodeError:
            return {}

    def record(self, stage: str) -> dict:
        """What ``stages/<stage>.json`` holds ({} when nothing)."""
        return self._read(stage)

    def done(self, stage: str, fp: str) -> bool:
        rec = self._read(stage)
        return rec.get("fingerprint") == fp and rec.get("status") == "done"

    def started(self, stage: str, fp: str) -> bool:
        """Whether an earlier attempt at this stage with this fingerprint started (and may have left work)."""
        return self._read(stage).get("fingerprint") == fp

    def mark(self, stage: str, fp: str, status: str, **extra) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.dir / f"{stage}.json"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stage": stage, "fingerprint": fp, "status": status, **extra}, indent=2) + "\n")
        tmp.replace(p)

    def skip(self, stage: str, fp: str, what: str = "") -> None:
        self.say(f"{stage}: done before with the same settings (fingerprint {fp[:12]}), skipped{what}")


def _settings_fp(cfg, **inputs) -> str:
    """A stage's fingerprint: its computing settings and the fingerprints of what it reads."""
    settings = {k: v for k, v in cfg.model_dump(mode="json", by_alias=True).items() if k not in _NOT_COMPUTED}
    return hash_json({"settings": settings, **inputs})


# ------------------------------------------------------------------------------------------------ stages
def _stage_data(recipe: Recipe, out: Path, say: Say) -> dict[str, str | None]:
    """The row files: the recipe's, or the bundled rows written to ``<out>/data/``."""
    d = recipe.data
    if d.bundled is None:
        return {"train": d.train, "heldout": d.heldout}
    from fusion_cache.recipes.demo import DemoSettings
    from fusion_cache.recipes.demo import write_demo_data

    first = str(recipe.teachers[0].get("teacher"))
    engine = str({**recipe.build, **recipe.teachers[0]}.get("engine", "vllm"))
    settings = DemoSettings(n_train=d.n_train or DemoSettings.n_train, n_heldout=d.n_heldout or DemoSettings.n_heldout,
                            teacher=first, engine=engine)  # fmt: skip
    say(f"data: the bundled {d.bundled} rows into {out / 'data'}")
    paths, gen_engine = write_demo_data(out, settings)
    if gen_engine is not None:
        gen_engine.close()
    return {k: str(v) for k, v in paths.items()}


class LazyEngine:
    """A teacher engine started on its first capture, so that one engine serves a teacher's train and held-out
    builds and none starts when both caches are already built. It runs and records exactly what ``run_build``
    would start on its own (name, dtype, context)."""

    def __init__(self, cfg):
        from fusion_cache.models.hardware import canonical_dtype
        from fusion_cache.models.hardware import default_dtype

        self.cfg = cfg
        self.name = cfg.engine
        self.dtype = canonical_dtype(cfg.dtype) if cfg.dtype else default_dtype()
        self.max_model_len = cfg.max_model_len or cfg.max_length + 1
        self._engine = None

    def _started(self):
        if self._engine is None:
            from fusion_cache.capture.engines import make_engine
            from fusion_cache.capture.teacher import engine_options
            from fusion_cache.models.presets import resolve_model

            path = resolve_model(self.cfg.teacher).path
            self._engine = make_engine(self.name, path, dtype=self.dtype,
                                       **engine_options(self.cfg, self.max_model_len - 1))  # fmt: skip
        return self._engine

    def capture(self, requests, k, samples=None):
        engine = self._started()
        return engine.capture(requests, k) if samples is None else engine.capture(requests, k, samples)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _stage_build(plan: RecipePlan, stages: Stages, say: Say, progress: bool) -> dict[str, str]:
    """Build every teacher's caches; returns {cache directory: its fingerprint}."""
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.inputs import dataset_hash

    fingerprints = {}
    for t in plan.teachers:
        engine = LazyEngine(t.train)
        try:
            for split, cfg in (("train", t.train), ("heldout", t.heldout)):
                if cfg is None:
                    continue
                stage = f"build-{t.name}-{split}"
                fp = _settings_fp(cfg, data=dataset_hash(cfg.data, cfg.row_format))
                before = _manifest_id(cfg.out)
                if stages.done(stage, fp) and before is not None and before[0] == stages.record(stage).get(
                    "cache_fingerprint"
                ):  # fmt: skip
                    stages.skip(stage, fp, f" (cache {cfg.out}, fingerprint {before[0][:12]})")
                    fingerprints[str(cfg.out)] = before[0]
                    continue
                # an interrupted build of the same settings continues; anything else in the way is replaced
                cfg = cfg.model_copy(update={"resume": stages.started(stage, fp), "overwrite": True})
                stages.mark(stage, fp, "started")
                t0 = time.perf_counter()
                m = run_build(cfg, engine=engine, progress=progress)
                stages.mark(stage, fp, "done", cache_fingerprint=m.fingerprint)
                if before == (m.fingerprint, m.created_at):  # run_build found this very cache and did nothing
                    stages.skip(stage, fp, f" (cache {cfg.out}, fingerprint {m.fingerprint[:12]})")
                else:
                    say(f"{stage}: {m.stats.rows} rows, {m.stats.answer_tokens} answer tokens into {cfg.out} "
                        f"({time.perf_counter() - t0:.0f} s, fingerprint {m.fingerprint[:12]})")  # fmt: skip
                fingerprints[str(cfg.out)] = m.fingerprint
        finally:
            engine.close()
    return fingerprints


def _manifest_id(out: str) -> tuple[str, str] | None:
    """(fingerprint, created_at) of the cache in ``out``, or None."""
    from fusion_cache.cache.manifest import load_manifest
    from fusion_cache.errors import FusionCacheError

    try:
        m = load_manifest(out)
    except FusionCacheError:
        return None
    return m.fingerprint, m.created_at


def _stage_student(plan: RecipePlan, stages: Stages, say: Say) -> str:
    """The student's identity for the training fingerprints (making the pruned student first if asked)."""
    from fusion_cache.models.presets import resolve_model

    student = plan.recipe.student
    if isinstance(student, PrunedStudent):
        from fusion_cache.models.prune import make_layer_subset_student

        source = resolve_model(student.prune)
        fp = hash_json({"prune": source.revision or source.path, "layers": student.layers})
        if stages.done("student", fp) and Path(plan.student, "config.json").exists():
            stages.skip("student", fp)
        else:
            say(f"student: {student.prune} cut to its last {student.layers} decoder layers ({plan.student})")
            make_layer_subset_student(source.path, plan.student, student.layers)
            stages.mark("student", fp, "done")
        return fp
    resolved = resolve_model(plan.student, role="student")
    return resolved.revision or resolved.path


def _stage_train(plan: RecipePlan, stages: Stages, caches: dict[str, str], student_fp: str, say: Say,
                 progress: bool) -> list[str]:  # fmt: skip
    """Train every run; returns their fingerprints."""
    from fusion_cache.train.checkpoint import latest_checkpoint
    from fusion_cache.train.trainer import run_train

    fps = []
    for cfg in plan.runs:
        stage = "train" if len(plan.runs) == 1 else f"train-{Path(cfg.out).name}"
        fp = _settings_fp(cfg, student=student_fp, caches=[caches[c] for c in cfg.shards])
        fps.append(fp)
        if stages.done(stage, fp) and (Path(cfg.out) / "summary.json").exists():
            stages.skip(stage, fp, f" (model in {Path(cfg.out) / 'model'})")
            continue
        resume = stages.started(stage, fp) and latest_checkpoint(Path(cfg.out)) is not None
        say(f"{stage}: {'resuming' if resume else 'training'} into {cfg.out}")
        stages.mark(stage, fp, "started")
        result = run_train(cfg.model_copy(update={"resume": resume, "overwrite": True}), progress=progress)
        f = result.summary["final"] or {}
        say(f"{stage}: {result.summary['steps']} steps, ce {f.get('ce', float('nan')):.4f}, "
            f"kd {f.get('kd', float('nan')):.4f}")  # fmt: skip
        stages.mark(stage, fp, "done")
        del result
    return fps


def _stage_merge(plan: RecipePlan, stages: Stages, train_fps: list[str], say: Say, progress: bool) -> str:
    from fusion_cache.merge.run import merge_summary
    from fusion_cache.merge.run import run_merge

    cfg = plan.merge
    fp = _settings_fp(cfg, runs=train_fps)
    if stages.done("merge", fp) and (Path(cfg.out) / "config.json").exists():
        stages.skip("merge", fp, f" (model in {cfg.out})")
        return fp
    stages.mark("merge", fp, "started")
    summary = run_merge(cfg.model_copy(update={"overwrite": True}), progress=progress)
    say(f"merge: {merge_summary(summary)}")
    stages.mark("merge", fp, "done")
    return fp


def _stage_eval(plan: RecipePlan, stages: Stages, model_fp: str, caches: dict[str, str], say: Say,
                progress: bool) -> dict:  # fmt: skip
    """Held-out metrics of the result, written to ``<out>/eval.json``."""
    from fusion_cache.eval.evaluate import evaluate_rows
    from fusion_cache.eval.evaluate import evaluate_teachers
    from fusion_cache.eval.evaluate import resolve_eval_model
    from fusion_cache.models.load import load_student

    e = plan.recipe.eval
    target = plan.out / "eval.json"
    held = [str(t.heldout.out) for t in plan.teachers if t.heldout is not None]
    fp = hash_json({"eval": e.model_dump(mode="json"), "model": model_fp, "caches": [caches[c] for c in held]})
    if stages.done("eval", fp) and target.exists():
        stages.skip("eval", fp, f" ({target})")
        return json.loads(target.read_text())
    path, _ = resolve_eval_model(str(plan.model))
    model, tok, _ = load_student(path)
    result: dict = {"model": str(plan.model)}
    if e.cache and held:
        result["cache"] = evaluate_teachers(model, tok, held, batch_size=e.batch_size, max_length=e.max_length,
                                            k=e.loss_k, limit=e.limit, progress=progress)  # fmt: skip
    heldout_rows = plan.teachers[0].heldout.data if plan.teachers[0].heldout is not None else plan.recipe.data.heldout
    if e.data and heldout_rows:
        result["data"] = evaluate_rows(model, tok, heldout_rows, batch_size=e.batch_size, max_length=e.max_length,
                                       limit=e.limit, progress=progress)  # fmt: skip
    if e.humaneval:
        from fusion_cache.eval.humaneval import evaluate_humaneval

        result["humaneval"] = evaluate_humaneval(model, tok, limit=e.limit, progress=progress)
    target.write_text(json.dumps(result, indent=2) + "\n")
    c = result.get("cache")
    if c:
        agree = "n/a" if c["top1_agreement"] is None else f"{c['top1_agreement']:.4f}"
        say(f"eval: held-out answer CE {c['answer_ce']:.4f}, teacher top-1 agreement {agree} ({target})")
    stages.mark("eval", fp, "done")
    return result


# ------------------------------------------------------------------------------------------------ the run
def run_recipe(recipe: Recipe, *, out: str | Path | None = None, say: Say = print, progress: bool = True) -> dict:
    """Run every stage of ``recipe`` (see the module docstring); returns ``{"out", "model", "eval"}``.

    Raises:
        ConfigError: a bad setting anywhere (before anything runs), or what a stage refuses.
    """
    out = Path(out) if out is not None else recipe.out_dir
    plan = plan_recipe(recipe, out)  # every stage's settings are checked before the first one runs
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_FILE).write_text(
        f"# resolved recipe {recipe.name}; replay: fusion-cache run {out / RECIPE_FILE}\n"
        + _yaml(recipe.model_dump(mode="json", exclude_none=True) | {"out": str(out)})
    )
    stages = Stages(out, say)
    t0 = time.perf_counter()
    data = _stage_data(recipe, out, say)
    plan = plan_recipe(recipe, out, data)
    caches = _stage_build(plan, stages, say, progress)
    student_fp = _stage_student(plan, stages, say)
    train_fps = _stage_train(plan, stages, caches, student_fp, say, progress)
    model_fp = _stage_merge(plan, stages, train_fps, say, progress) if plan.merge is not None else train_fps[0]
    evaluation = _stage_eval(plan, stages, model_fp, caches, say, progress) if recipe.eval is not None else None
    say(f"recipe {recipe.name}: done in {time.perf_counter() - t0:.0f} s; model in {plan.model}")
    return {"out": str(out), "model": str(plan.model), "eval": evaluation}


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
