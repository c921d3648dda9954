"""The options of `build`, `train`, `merge` and `fuse` come from their configs: every field has a flag (or a stated
reason not to), the help lists the registries' names, every flag of the README's tour still exists, and the names of
merge methods, engines, combine and align modes are written once, in their registries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.engines import ENGINES
from fusion_cache.cli.main import app
from fusion_cache.cli.options import inventory
from fusion_cache.merge.config import MergeConfig
from fusion_cache.merge.registry import REGISTRY
from fusion_cache.train.align import ALIGNERS
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.losses import LOSS_CHOICES
from fusion_cache.train.weights import COMBINES

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
CONFIG_COMMANDS = {"build": [BuildConfig], "train": [TrainConfig], "merge": [MergeConfig]}
CONFIG_COMMANDS["fuse"] = [TrainConfig, MergeConfig]

# Every flag these commands had before their options were generated (tests/cli and the README's CLI tour use them).
FLAGS = {
    "build": "--teacher --data --out --top-k --engine --codec --value-bits --max-length --overlong --dtype "
    "--batch-tokens --shard-rows --limit --overwrite --resume --num-shards --shard-index --ray --ray-address",
    "train": "--student --shards --out --lambda --top-k --lr --batch-size --grad-accum --max-steps --epochs "
    "--max-length --seed --no-zscore --kd-loss --tail --mode --checkpoint-every --keep-checkpoints --resume --device "
    "--autocast --grad-checkpointing --fsdp --combine --align --uncertainty-temperature --join-window",
    "merge": "--base --models --out --method --alpha --density --sign-election --drop-rate --merge-seed --select-topk "
    "--rate-power --skew-strength --min-density --max-density --max-shard-mb --overwrite --threads",
    "fuse": "--student --shards --out --mode --lambda --top-k --lr --batch-size --grad-accum --max-steps --epochs "
    "--max-length --seed --method --alpha --density --sign-election --drop-rate --merge-seed --select-topk "
    "--rate-power --skew-strength --min-density --max-density --max-shard-mb --overwrite",
}
# Fields that had no flag before and have one now.
NEW = "--weight-decay --warmup-ratio --grad-clip --shuffle-buffer --dtype --temperature --softmax --save --log-every"


def _commands() -> dict:
    return {c.callback.__name__: c.callback for c in app.registered_commands}


def _flags(name: str) -> set[str]:
    command = typer.main.get_command(app).commands[name]
    return {f for p in command.params for f in (*p.opts, *p.secondary_opts)}


def _help(*args) -> str:
    r = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("name", sorted(CONFIG_COMMANDS))
def test_every_config_field_has_an_option_or_a_reason(name):
    exposed = inventory(_commands()[name])
    assert [e.model for e in exposed] == CONFIG_COMMANDS[name]
    flags = _flags(name)
    for e in exposed:
        assert set(e.flags) | e.own | set(e.skipped) == set(e.model.model_fields), e.model
        assert all(reason for reason in e.skipped.values())
        assert set(e.flags.values()) <= flags


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_every_earlier_flag_still_exists(name):
    assert set(FLAGS[name].split()) <= _flags(name)


def test_fields_without_a_flag_before_have_one_now():
    assert set(NEW.split()) <= _flags("train") and set(NEW.split()) <= _flags("fuse")


def test_defaults_come_from_the_configs():
    command = typer.main.get_command(app).commands["train"]
    defaults = {p.opts[0]: p.default for p in command.params if p.opts}
    assert defaults["--lambda"] == TrainConfig.model_fields["lambda_"].default == 0.5
    assert defaults["--loss-k"] == 10 and defaults["--lr"] == 5e-5 and defaults["--zscore"] is True
    command = typer.main.get_command(app).commands["merge"]
    defaults = {p.opts[0]: p.default for p in command.params if p.opts}
    assert defaults["--max-shard-mb"] == 2048 and defaults["--method"] == "ta" and defaults["--alpha"] is None


def test_help_lists_the_registries_names():
    assert "<" + "|".join(ENGINES) + ">" in _help("build")
    train = _help("train")
    assert "<" + "|".join(COMBINES) + ">" in train and "<" + "|".join(ALIGNERS) + ">" in train
    assert "<unified|single|pairwise>" in train and "<list[" + "|".join(LOSS_CHOICES) + "]>" in train
    for command in ("merge", "fuse"):
        text = _help(command)
        assert "<" + "|".join(REGISTRY) + ">" in text
        assert "(ta 0.3, ties 1.0, dare 0.3, rsaf 1.0)" in text  # --alpha: the methods that take it, their defaults


@pytest.mark.parametrize(
    ("model", "field", "names"),
    [
        (BuildConfig, "engine", list(ENGINES)),
        (TrainConfig, "combine", list(COMBINES)),
        (TrainConfig, "align", list(ALIGNERS)),
        (MergeConfig, "method", list(REGISTRY)),
    ],
)
def test_configs_take_their_names_from_the_registries(model, field, names):
    assert model.model_json_schema()["properties"][field]["enum"] == names
    required = {"student": "s", "shards": ["c"], "out": "o", "teacher": "t", "data": "d", "base": "b", "models": ["m"]}
    kwargs = {k: v for k, v in required.items() if k in model.model_fields}
    with pytest.raises(ValueError, match=rf"{field}: Input should be .*'{names[-1]}' \(got 'nope'\)"):
        model.create(**kwargs, **{field: "nope"})


def test_merge_method_names_are_written_only_in_the_registry():
    """String constants equal to a method name: only in merge/registry.py (and MergeConfig's default method)."""
    found = []
    for path in [*sorted((ROOT / "fusion_cache").rglob("*.py")), *sorted((ROOT / "cli").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in REGISTRY:
                found.append((path.relative_to(ROOT).as_posix(), node.value))
    assert [f for f in found if f[0] != "fusion_cache/merge/registry.py"] == [("fusion_cache/merge/config.py", "ta")]
    assert sorted({name for _, name in found}) == sorted(REGISTRY)


def test_merge_flags_map_to_their_fields():
    def merge(*args):
        base = ["merge", "--base", "b", "--models", "m", "--out", "o"]
        return runner.invoke(app, [*base, *map(str, args)], env={"COLUMNS": "200"})

    r = merge("--merge-seed", 3)
    assert r.exit_code == 2 and "seed=3 does not apply to method 'ta' (it takes: alpha)" in r.output
    r = merge("--max-shard-mb", 0)
    assert r.exit_code == 2 and "max_shard_bytes: Input should be greater than or equal to 1 (got 0)" in r.output
    r = merge("--method", "rsaf", "--min-density", 0.9, "--max-density", 0.5)
    assert r.exit_code == 2 and "min_density 0.9 > max_density 0.5" in r.output
    r = merge("--method", "nope")
    assert r.exit_code == 2 and "'nope' is not one of 'ta', 'ties', 'dare', 'sce', 'rsaf'" in r.output
    assert "Traceback" not in r.output


def test_train_refuses_an_unknown_mode_naming_the_valid_ones(tmp_path):
    r = runner.invoke(
        app, ["train", "--student", "s", "--shards", "c", "--out", str(tmp_path), "--mode", "x"], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 2 and "'x' is not one of 'unified', 'single', 'pairwise'" in r.output


def test_old_spellings_still_work_with_a_warning_naming_the_new_flag(tmp_path):
    def train(*args):
        base = ["train", "--student", "s", "--out", str(tmp_path / "o")]
        return runner.invoke(app, [*base, *map(str, args)], env={"COLUMNS": "200"})

    r = train("--shards", "c", "--top-k", 1)  # K=1 is refused: the old flags reached their fields
    assert "warning: --shards is deprecated; use --cache" in r.output
    assert "warning: --top-k is deprecated; use --loss-k" in r.output
    assert r.exit_code == 2 and "loss_k: Input should be greater than or equal to 2 (got 1)" in r.output
    r = train("--cache", "c", "--loss-k", 1)
    assert r.exit_code == 2 and "deprecated" not in r.output and "(got 1)" in r.output


def test_version_and_v_after_the_command():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("fusion-cache ")
    assert "--verbose" in _help("train") and "--config" in _help("inspect")


def test_a_required_field_with_an_old_spelling_is_required_by_the_config(tmp_path):
    r = runner.invoke(app, ["train", "--student", "s", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "cache: Field required" in r.output
