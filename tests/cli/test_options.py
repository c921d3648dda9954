"""`config_options` on a small config and a throwaway typer app: flag names, defaults, choices, booleans, lists,
aliases, units, JSON fields, a command's own options, stacking, and the mistakes it refuses."""

from __future__ import annotations

from typing import Literal

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from fusion_cache.cli.options import Flag
from fusion_cache.cli.options import config_options
from fusion_cache.cli.options import inventory
from fusion_cache.config import StrictConfig

runner = CliRunner()
NAMES = ("red", "green")


class Toy(StrictConfig):
    """A config with one field of each kind the command line knows."""

    path: str = Field(description="where")
    colour: Literal[NAMES] = Field("red", description="a colour")
    top_k: int = Field(8, ge=1, description="how many")
    lambda_: float = Field(0.5, alias="lambda", description="a weight")
    zscore: bool = Field(True, description="standardize")
    tags: list[str] = Field(default_factory=list, description="labels")
    limit: int | None = Field(None, description="at most")
    size: int = Field(4 * 1024**2, description="bytes")
    extra: dict[str, int] = Field(default_factory=dict, description="anything else")


class Other(StrictConfig):
    """A second config for stacking; its ``top_k`` would clash with Toy's flag."""

    seed: int = Field(0, description="a seed")
    path: str = Field("x", description="another path")


def _app(command) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    app.command()(lambda: None)  # a second command, so the first is addressed by name
    return app


def _invoke(app, *args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})


def _capture(**kw):
    got = {}

    @config_options(Toy, into="settings", **kw)
    def toy(settings: dict, dry_run: bool = typer.Option(False, "--dry-run")) -> None:
        """Toy."""
        got.update(settings=settings, dry_run=dry_run)

    return _app(toy), got, toy


def test_only_given_options_reach_the_settings_under_field_names():
    app, got, _ = _capture(flags={"size": Flag("--size-mb", scale=1024**2, unit="MiB")})
    r = _invoke(app, "toy", "--path", "p", "--colour", "green", "--lambda", "0.2", "--no-zscore", "--tags", "a",
                "--tags", "b", "--size-mb", "3", "--extra", '{"n": 1}', "--dry-run")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert got["dry_run"] and got["settings"] == {"path": "p", "colour": "green", "lambda": 0.2, "zscore": False,
                   "tags": ["a", "b"], "size": 3 * 1024**2, "extra": {"n": 1}}  # fmt: skip
    assert _invoke(app, "toy", "--path", "p", "--top-k", "8").exit_code == 0
    assert got == {"settings": {"path": "p", "top_k": 8}, "dry_run": False}  # a default given explicitly is given
    assert Toy.create(**got["settings"]).model_fields_set == {"path", "top_k"}


def test_help_shows_defaults_choices_and_units():
    app, _, _ = _capture(flags={"size": Flag("--size-mb", scale=1024**2, unit="MiB")})
    out = _invoke(app, "toy", "--help").output
    shown = ["--path", "<red|green>", "--top-k", "[default: 8]", "--lambda", "--zscore", "--no-zscore", "--tags"]
    shown += ["repeat", "--limit", "--size-mb", "(in MiB)", "[default: 4]", "--extra", "(JSON)"]
    for text in shown:
        assert text in out, text
    r = _invoke(app, "toy")
    assert r.exit_code == 2 and "--path" in r.output  # a field without a default is a required option


def test_a_bad_choice_is_refused_by_the_command_line_naming_the_valid_ones():
    app, got, _ = _capture()
    r = _invoke(app, "toy", "--path", "p", "--colour", "blue")
    assert r.exit_code == 2 and "'blue' is not one of 'red', 'green'" in r.output and not got


def test_own_parameters_and_skip_replace_fields():
    got = {}

    @config_options(Toy, into="settings", skip={"extra": "not on the command line"})
    def toy(settings: dict, top_k: str = typer.Option("all", "--top-k")) -> None:
        got.update(settings, top_k=top_k)

    app = _app(toy)
    assert _invoke(app, "toy", "--path", "p", "--top-k", "many").exit_code == 0
    assert got == {"path": "p", "top_k": "many"}
    assert "--extra" not in _invoke(app, "toy", "--help").output
    [exposed] = inventory(toy)
    assert exposed.own == {"top_k"} and exposed.skipped == {"extra": "not on the command line"}
    assert exposed.flags["lambda_"] == "--lambda" and set(exposed.flags) | exposed.own | set(exposed.skipped) == set(
        Toy.model_fields
    )


def test_stacked_configs_share_the_context_and_refuse_clashing_flags():
    got = {}

    @config_options(Other, into="other", flags={"path": Flag("--other-path")})
    @config_options(Toy, into="toy_settings")
    def both(toy_settings: dict, other: dict) -> None:
        got.update(toy=toy_settings, other=other)

    r = _invoke(_app(both), "both", "--path", "p", "--other-path", "q", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert got == {"toy": {"path": "p"}, "other": {"path": "q", "seed": 3}}
    assert [e.model for e in inventory(both)] == [Toy, Other]

    with pytest.raises(ValueError, match=r"Other.path's flag \['--path'\] is taken"):

        @config_options(Other, into="other")
        @config_options(Toy, into="toy_settings")
        def clash(toy_settings: dict, other: dict) -> None: ...


def test_mistakes_in_the_declaration_are_refused():
    with pytest.raises(ValueError, match=r"Toy has no field\(s\) \['nope'\]"):
        config_options(Toy, into="settings", skip={"nope": "why"})
    with pytest.raises(ValueError, match="has no parameter 'settings'"):

        @config_options(Toy, into="settings")
        def f(cfg: dict) -> None: ...


class Loss(StrictConfig):
    """A nested model, as a per-teacher setting might be."""

    name: Literal["uld", "kl"] = "uld"
    weight: float = 1.0


class Nested(StrictConfig):
    """Lists of choices and of models: repeatable flags, the models as JSON."""

    kinds: list[Literal[NAMES]] = Field(default_factory=list, description="colours")
    losses: list[Loss] = Field(default_factory=list, description="one per teacher")


def test_lists_of_choices_and_of_models():
    got = {}

    @config_options(Nested, into="settings")
    def nested(settings: dict) -> None:
        got.update(settings)

    app = _app(nested)
    assert "<list[red|green]>" in _invoke(app, "nested", "--help").output
    r = _invoke(app, "nested", "--kinds", "red", "--kinds", "green", "--losses", '{"name": "kl"}', "--losses", "{}")
    assert r.exit_code == 0, r.output
    cfg = Nested.create(**got)
    assert cfg.kinds == ["red", "green"] and [x.name for x in cfg.losses] == ["kl", "uld"]
