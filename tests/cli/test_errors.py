"""The error boundary: an error from outside the project (fsspec, the hub, the trainer) is one line and a hint, exit
2, the traceback only with -v (before or after the command); the project's own errors stay one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fusion_cache.cli.errors import hint_for
from fusion_cache.cli.logs import configure_logging
from fusion_cache.cli.main import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _quiet_again():
    yield
    configure_logging(verbose=False)  # -v in one test must not leak into the next


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_an_unknown_url_scheme_is_one_line():
    r = _run("inspect", "--cache", "zzz://bucket/cache")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [
        "error: zzz://bucket/cache: unknown URL scheme zzz://; give a local directory or an fsspec URL (s3://, gs://, "
        "hf://...)"
    ]


@pytest.mark.parametrize("where", ["before", "after"])
def test_v_shows_the_traceback_before_or_after_the_command(where):
    args = ["inspect", "--cache", "zzz://bucket/cache"]
    r = _run(*(["-v", *args] if where == "before" else [*args, "-v"]))
    assert r.exit_code == 2 and "Traceback (most recent call last)" in r.output
    assert "error: zzz://bucket/cache: unknown URL scheme zzz://" in r.output


def test_own_errors_are_one_line_without_a_hint(tmp_path):
    r = _run("inspect", "--cache", tmp_path / "nothing-here")
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (OSError("Repository Not Found for url: https://huggingface.co/api/models/no/such"), "check the model name"),
        (OSError("We couldn't connect to 'https://huggingface.co'"), "hub is unreachable"),
        (ImportError("Install s3fs to access S3"), "s3fs for s3://"),
        (RuntimeError("CUDA error: out of memory"), "lower --batch-size"),
        (ImportError("No module named 'peft'"), "install the missing package"),
    ],
)
def test_hints_name_what_to_check(error, hint):
    assert hint in hint_for(error)


def test_a_bug_says_so():
    assert hint_for(ZeroDivisionError("division by zero")) is None


def test_version():
    r = _run("--version")
    assert r.exit_code == 0 and r.output.startswith("fusion-cache ")
