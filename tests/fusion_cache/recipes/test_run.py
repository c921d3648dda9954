"""`fusion-cache run RECIPE.yaml` on the tiny test models: every stage (capture each teacher, train pairwise or
unified, merge, evaluate), a rerun that skips every stage, a changed setting that redoes only what depends on it,
and the mistakes a recipe is refused for (named by their place in the file)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fusion_cache.cli.main import app
from fusion_cache.errors import ConfigError
from fusion_cache.recipes.config import Recipe
from fusion_cache.recipes.config import plan_recipe
from fusion_cache.recipes.run import load_recipe
from fusion_cache.recipes.run import run_recipe
from fusion_cache.recipes.run import shipped_recipes

runner = CliRunner()


def _recipe(tiny_model_dir, other_teacher_dir, data_file, **over) -> dict:
    recipe = {
        "name": "tiny",
        "data": {"train": str(data_file), "heldout": str(data_file)},
        "build": {"engine": "hf", "top_k": 8, "dtype": "float32"},
        "teachers": [{"teacher": str(tiny_model_dir), "name": "qwen"}, {"teacher": str(other_teacher_dir),
                                                                          "name": "llama", "top_k": 6}],
        "student": str(tiny_model_dir),
        "mode": "pairwise",
        "train": {"max_steps": 2, "batch_size": 2, "loss_k": 4, "kd_loss": ["auto"], "dtype": "float32"},
        "merge": {"method": "ties"},
        "eval": {"cache": True, "data": True, "batch_size": 2, "loss_k": 4},
    }  # fmt: skip
    return {**recipe, **over}


def test_a_pairwise_recipe_runs_every_stage_then_skips_them(tmp_path, tiny_model_dir, other_teacher_dir, data_file):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tiny_model_dir, other_teacher_dir, data_file)))
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", str(path), "--out", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for d in ("cache/qwen/train", "cache/qwen/heldout", "cache/llama/train", "cache/llama/heldout"):
        assert (out / d / "manifest.json").exists(), d
    assert (out / "runs/qwen/model/config.json").exists() and (out / "runs/llama/model/config.json").exists()
    assert (out / "merged/config.json").exists() and (out / "merged/config.yaml").exists()
    result = json.loads((out / "eval.json").read_text())
    assert result["cache"]["samples"] > 0 and result["data"]["answer_ce"] > 0
    assert "merge: " in r.output and "eval: held-out answer CE" in r.output
    # the resolved recipe replays: every stage is done with the same settings, so each one says it is skipped
    r = runner.invoke(app, ["run", str(out / "recipe.yaml")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for stage in ("build-qwen-train", "build-llama-heldout", "train-qwen", "train-llama", "merge", "eval"):
        assert f"[run] {stage}: done before with the same settings" in r.output, stage
    # a changed merge setting redoes the merge and the evaluation, nothing before them
    r = runner.invoke(app, ["run", str(out / "recipe.yaml"), "--set", "merge.method=ta"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "[run] train-qwen: done before" in r.output and "[run] merge: done before" not in r.output
    assert "[run] eval: done before" not in r.output
    assert json.loads((out / "stages/merge.json").read_text())["status"] == "done"


def test_a_unified_recipe_trains_one_run_on_every_cache(tmp_path, tiny_model_dir, other_teacher_dir, data_file):
    recipe = Recipe.create(**_recipe(tiny_model_dir, other_teacher_dir, data_file, mode="unified", merge={},
                                     eval=None))  # fmt: skip
    said = []
    result = run_recipe(recipe, out=tmp_path / "u", say=said.append, progress=False)
    summary = json.loads((tmp_path / "u/train/summary.json").read_text())
    assert sorted(summary["teachers"]) == sorted(["qwen", "llama"]) or len(summary["teachers"]) == 2
    assert result["model"] == str(tmp_path / "u/train") and result["eval"] is None
    assert not (tmp_path / "u/cache/qwen/heldout").exists()  # no evaluation: no held-out caches


def test_mistakes_are_refused_before_anything_runs_with_their_place(tmp_path, tiny_model_dir, other_teacher_dir,
                                                                    data_file):  # fmt: skip
    def plan(**over):
        return plan_recipe(Recipe.create(**_recipe(tiny_model_dir, other_teacher_dir, data_file, **over)), tmp_path)

    with pytest.raises(ConfigError, match=r"(?s)teachers\[1\]: .*top_k"):
        plan(teachers=[{"teacher": "a"}, {"teacher": "b", "top_k": 1}])
    with pytest.raises(ConfigError, match=r"train: \['out'\] are set by the recipe itself"):
        plan(train={"out": "x"})
    with pytest.raises(ConfigError, match=r"merge: only a pairwise recipe merges"):
        plan(mode="unified")
    with pytest.raises(ConfigError, match=r"the names \['a'\] repeat"):
        plan(teachers=[{"teacher": "x/a"}, {"teacher": "y/a"}])
    with pytest.raises(ConfigError, match=r"--set train\.max_steps: expected KEY=VALUE|expected KEY=VALUE"):
        load_recipe(shipped_recipes()["demo"], ["train.max_steps"])
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["demo", "infifusion-paper"])
def test_the_shipped_recipes_plan(name, tmp_path):
    recipe = load_recipe(name)
    plan = plan_recipe(recipe, tmp_path)  # every stage's settings are valid
    if name == "infifusion-paper":
        assert recipe.mode == "pairwise" and len(plan.teachers) == 3 and plan.merge is not None
        assert plan.teachers[2].train.tensor_parallel_size == 2 and plan.runs[0].student == "phi-4"
    else:
        assert plan.student == str(tmp_path / "student-24l") and plan.merge is None and plan.teachers[0].heldout
