"""A recipe: the whole pipeline as one YAML file (`fusion_cache.recipes.run` runs it; ``fusion-cache run FILE``).

    name: my-fusion
    out: ./runs/my-fusion              # every stage writes under here
    data: {train: rows.jsonl, heldout: heldout.jsonl}   # or a Hub id; or {bundled: demo} (the demo's rows)
    build: {top_k: 64, engine: vllm}   # BuildConfig fields every teacher shares
    teachers:                          # one cache per teacher (BuildConfig fields: teacher, and any override)
      - {teacher: qwen-coder}
      - {teacher: mistral-small, tensor_parallel_size: 2}
    student: phi-4                     # or {prune: smollm2-135m, layers: 24}: the teacher cut to N layers
    mode: pairwise                     # unified (one run, every cache) | single | pairwise (one run per cache)
    train: {loss_k: 10, max_steps: 1000}   # TrainConfig fields (not student, cache, out)
    merge: {method: rsaf}              # pairwise: MergeConfig fields (not base, models, out)
    eval: {cache: true, humaneval: true}   # held-out metrics of the result

Sections hold the fields of the stage configs (`BuildConfig`, `TrainConfig`, `MergeConfig`) under the names the CLI
flags and each run's ``config.yaml`` use; `plan_recipe` builds every stage's config before anything runs, so a
mistake anywhere is reported at once, with its place in the file (``teachers[1].top_k: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Literal

from pydantic import Field
from pydantic import model_validator

from fusion_cache.config import StrictConfig
from fusion_cache.errors import ConfigError
from fusion_cache.recipes.pairwise import PAIRWISE
from fusion_cache.recipes.pairwise import TRAIN_MODES

# Data the package ships: the demo's prompts with the embedded teacher's answers (`recipes.demo.write_demo_data`).
BUNDLED_DATA = ("demo",)


class RecipeData(StrictConfig):
    """The rows: train rows for the caches and the training, held-out rows for the evaluation."""

    train: str | None = Field(None, description="rows with answers (a file, a datasets directory or a Hub id)")
    heldout: str | None = Field(None, description="held-out rows: their caches and answer CE evaluate the result")
    bundled: Literal[BUNDLED_DATA] | None = Field(None, description="rows shipped with fusion-cache instead")
    n_train: int | None = Field(None, ge=1, description="bundled: the first N train rows")
    n_heldout: int | None = Field(None, ge=1, description="bundled: the first N held-out rows")
    split: str | None = Field(None, description="train rows: the split of a Hub dataset (build --data-split)")
    heldout_split: str | None = Field(None, description="held-out rows: the split of a Hub dataset")
    fields: dict[str, str] = Field(default_factory=dict, description="build --data-fields for both")
    roles: dict[str, str] = Field(default_factory=dict, description="build --data-roles for both")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.train is None) == (self.bundled is None):
            raise ValueError(f"give train rows or bundled data, one of them (got train={self.train!r}, "
                             f"bundled={self.bundled!r})")  # fmt: skip
        if self.bundled is None and (self.n_train or self.n_heldout):
            raise ValueError("n_train and n_heldout choose rows of bundled data only")
        return self


class PrunedStudent(StrictConfig):
    """A student made from a model by keeping its last ``layers`` decoder layers (`models.prune`)."""

    prune: str = Field(description="the model to cut (preset or local directory)")
    layers: int = Field(ge=1, description="decoder layers kept")


class RecipeEval(StrictConfig):
    """What the evaluation stage measures (`eval.evaluate`), written to ``<out>/eval.json``."""

    cache: bool = Field(True, description="answer CE, top-1 agreement and ULD against every teacher's held-out cache")
    data: bool = Field(False, description="answer CE over the held-out rows (no teacher)")
    humaneval: bool = Field(False, description="HumanEval pass@1 (greedy, sandboxed)")
    limit: int | None = Field(None, ge=1, description="the first N rows / problems only")
    loss_k: int = Field(10, ge=2, description="K of the reported ULD")
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=2)


class Recipe(StrictConfig):
    """A whole run of the pipeline (the module docstring has an example)."""

    name: str = Field(description="what the recipe is; the default out is ./runs/<name>")
    description: str = ""
    out: str | None = Field(None, description="the directory every stage writes under (default ./runs/<name>)")
    data: RecipeData
    build: dict[str, Any] = Field(default_factory=dict, description="BuildConfig fields shared by the teachers")
    teachers: list[dict[str, Any]] = Field(min_length=1, description="BuildConfig fields per teacher (+ name)")
    student: str | PrunedStudent
    mode: Literal[TRAIN_MODES] = "unified"
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields")
    merge: dict[str, Any] = Field(default_factory=dict, description="pairwise: MergeConfig fields")
    eval: RecipeEval | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.out or Path("runs") / self.name)


# ------------------------------------------------------------------------------------------------------ the plan
# Fields a recipe sets itself, per stage config: a section that sets them is refused.
_OWN = {
    "build": ("data", "out", "overwrite", "resume"),
    "train": ("student", "cache", "shards", "out", "save", "overwrite", "resume"),
    "merge": ("base", "models", "out", "overwrite"),
}


@dataclass(frozen=True)
class TeacherPlan:
    """One teacher's caches: the build settings of each split (``heldout`` None: no held-out cache)."""

    name: str
    train: Any  # BuildConfig
    heldout: Any | None


@dataclass(frozen=True)
class RecipePlan:
    """Every stage's settings, checked.

    Attributes:
        recipe: the recipe.
        out: its output directory.
        teachers: the caches to build.
        student: the student (a path or name; a pruned student's directory).
        runs: the training runs (one; pairwise: one per teacher), TrainConfig each.
        merge: the MergeConfig of the pairwise merge, else None.
        model: the result: a run directory or the merged model.
    """

    recipe: Recipe
    out: Path
    teachers: list[TeacherPlan]
    student: str
    runs: list[Any]
    merge: Any | None
    model: Path


def _refuse_own(section: str, settings: dict, where: str) -> None:
    own = sorted(set(settings) & set(_OWN[section]))
    if own:
        raise ConfigError(f"{where}: {own} are set by the recipe itself ({section} stage); remove them")


def _create(model, where: str, **settings):
    """``model.create(**settings)``, its errors prefixed with ``where`` (the place in the recipe)."""
    try:
        return model.create(**settings)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def teacher_names(recipe: Recipe) -> list[str]:
    """One cache directory name per teacher: its ``name``, else the teacher's last path component; unique."""
    names = [str(t.get("name") or Path(str(t.get("teacher", "?"))).name) for t in recipe.teachers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"teachers: the names {dupes} repeat; give each teacher a distinct `name`")
    return names


def plan_recipe(recipe: Recipe, out: str | Path | None = None, data: dict[str, str] | None = None) -> RecipePlan:
    """Build every stage's settings (nothing runs); ``data``: the row files (bundled data once written).

    Raises:
        ConfigError: a bad setting anywhere, named by its place in the recipe.
    """
    from fusion_cache.capture.config import BuildConfig
    from fusion_cache.merge.config import MergeConfig
    from fusion_cache.train.config import TrainConfig

    out = Path(out) if out is not None else recipe.out_dir
    d = recipe.data
    data = data or {"train": d.train or "<bundled>", "heldout": d.heldout or ("<bundled>" if d.bundled else None)}
    want_heldout_cache = recipe.eval is not None and recipe.eval.cache
    if want_heldout_cache and data.get("heldout") is None:
        raise ConfigError("eval.cache: needs held-out rows (data.heldout) to capture the teachers' held-out caches")
    _refuse_own("build", recipe.build, "build")
    teachers = []
    row_format = {"data_fields": d.fields, "data_roles": d.roles}
    for i, (name, t) in enumerate(zip(teacher_names(recipe), recipe.teachers, strict=True)):
        where = f"teachers[{i}]"
        _refuse_own("build", t, where)
        settings = {**recipe.build, **{k: v for k, v in t.items() if k != "name"}, **row_format}
        caches = out / "cache" / name
        train = _create(BuildConfig, where, data=data["train"], out=str(caches / "train"), data_split=d.split,
                        **settings)  # fmt: skip
        heldout = None
        if want_heldout_cache:
            heldout = _create(BuildConfig, where, data=data["heldout"], out=str(caches / "heldout"),
                              data_split=d.heldout_split, **settings)  # fmt: skip
        teachers.append(TeacherPlan(name, train, heldout))
    student = recipe.student
    student_path = str(out / f"student-{student.layers}l") if isinstance(student, PrunedStudent) else student
    _refuse_own("train", recipe.train, "train")
    caches = [str(t.train.out) for t in teachers]
    if recipe.mode == "single" and len(caches) > 1:
        raise ConfigError(f"mode: single takes one teacher, the recipe has {len(caches)}; use unified or pairwise")
    if recipe.mode == PAIRWISE:
        if len(caches) < 2:
            raise ConfigError(f"mode: pairwise needs at least 2 teachers, the recipe has {len(caches)}")
        runs = [
            _create(
                TrainConfig, "train", student=student_path, cache=[c], out=str(out / "runs" / t.name), **recipe.train
            )  # fmt: skip
            for c, t in zip(caches, teachers, strict=True)
        ]
        _refuse_own("merge", recipe.merge, "merge")
        merge = _create(MergeConfig, "merge", base=student_path, models=[r.out for r in runs],
                        out=str(out / "merged"), **recipe.merge)  # fmt: skip
        model = out / "merged"
    else:
        if recipe.merge:
            raise ConfigError(f"merge: only a pairwise recipe merges (mode is {recipe.mode!r})")
        runs = [_create(TrainConfig, "train", student=student_path, cache=caches, out=str(out / "train"),
                        **recipe.train)]  # fmt: skip
        merge = None
        model = out / "train"
    return RecipePlan(recipe, out, teachers, student_path, runs, merge, model)
