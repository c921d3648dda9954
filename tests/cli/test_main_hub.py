"""`fusion-cache push` / `pull` against the local Hub stand-in, `inspect hf://` through it, and the one-line errors of
remote caches (offline, a missing fsspec backend) at the command line."""

from __future__ import annotations

import importlib.util
import socket

import pytest
from typer.testing import CliRunner

from fusion_cache.cache.hub_standin import StandinHub
from fusion_cache.cache.hub_standin import point_huggingface_hub_at
from fusion_cache.cli.logs import configure_logging
from fusion_cache.cli.main import app

runner = CliRunner()
TOKEN = "writer-token"


@pytest.fixture(autouse=True)
def _quiet_again():
    yield
    configure_logging(verbose=False)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with StandinHub(tokens={TOKEN}) as server:
        point_huggingface_hub_at(server.url, monkeypatch.setattr)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("FUSION_CACHE_HOME", str(tmp_path / "fc-home"))
        yield server


def _run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


def test_push_pull_and_inspect_through_the_hub(hub, built_cache, tmp_path):
    r = _run("push", built_cache, "team/tiny", "--private", env={"HF_TOKEN": TOKEN})  # --token from the environment
    assert r.exit_code == 0, r.output
    assert "pushed" in r.output and "commit" in r.output and "fusion-cache pull team/tiny@main DIR" in r.output
    r = _run("push", built_cache, "team/tiny", "--token", TOKEN)
    assert r.exit_code == 0 and "no new commit" in r.output
    r = _run("pull", "team/tiny", tmp_path / "copy", "--token", TOKEN)
    assert r.exit_code == 0 and "verified" in r.output and (tmp_path / "copy" / "manifest.json").is_file()
    r = _run("inspect", "--cache", "hf://datasets/team/tiny", env={"HF_TOKEN": TOKEN})
    assert r.exit_code == 0 and "fingerprint" in r.output
    r = _run("verify", "--cache", "hf://datasets/team/tiny", env={"HF_TOKEN": TOKEN})
    assert r.exit_code == 0 and "OK hf://datasets/team/tiny: 2 shard(s)" in r.output


def test_hub_errors_are_one_line(hub, built_cache, tmp_path):
    r = _run("pull", "team/none", tmp_path / "x")
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: team/none@main: repository not found (or private): check the id (org/name), or set HF_TOKEN (or run "
        "`hf auth login`) with a token that can read it"
    ]
    r = _run("push", built_cache, "team/tiny", "--token", "nobody")
    lines = [line for line in r.output.strip().splitlines() if not line.startswith(("verify:", "\rverify:"))]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: team/tiny@main: no permission")
    r = _run("pull", "not-a-repo", tmp_path / "x")
    assert r.exit_code == 2 and "org/name" in r.output and len(r.output.strip().splitlines()) == 1


def test_offline_inspect_of_an_hf_url_is_one_line(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nothing listens on stands for a network that is down
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    point_huggingface_hub_at(closed, monkeypatch.setattr)
    r = _run("inspect", "--cache", "hf://datasets/team/tiny")
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output
    assert lines[0].startswith("error: hf://datasets/team/tiny: cannot be reached (ConnectError")
    assert "fusion-cache pull REPO DIR" in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_s3_without_s3fs_is_one_line():
    r = _run("inspect", "--cache", "s3://bucket/cache")
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: s3://bucket/cache: s3:// needs the s3fs package: pip install s3fs"
    ]
