"""`plan_output`: where a build goes, what an existing ``--out`` may hold, and the staging dir of an fsspec URL."""

from __future__ import annotations

import os
import shutil

import pytest

from fusion_cache.cache.manifest import load_manifest
from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.output import build_lock
from fusion_cache.capture.output import lock_path
from fusion_cache.capture.output import plan_output
from fusion_cache.errors import ConfigError


def _cfg(out, **kw) -> BuildConfig:
    return BuildConfig.create(teacher="t", data="d", out=str(out), **kw)


def test_a_new_directory_is_written_beside_it_then_published(tmp_path):
    plan = plan_output(_cfg(tmp_path / "c"), "f" * 64, None)
    assert plan.out == tmp_path / "c" and plan.work == tmp_path / "c.incomplete" and plan.existing is None


def test_this_same_build_is_found_and_anything_else_refused(built_cache, tmp_path):
    fp = load_manifest(built_cache).config_fingerprint
    assert plan_output(_cfg(built_cache), fp, None).existing.config_fingerprint == fp
    with pytest.raises(ConfigError, match="holds a different cache; pass --overwrite"):
        plan_output(_cfg(built_cache), "e" * 64, None)
    assert plan_output(_cfg(built_cache, overwrite=True), "e" * 64, None).existing is None


def test_an_unreadable_cache_or_a_file_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text("{")
    with pytest.raises(ConfigError, match="holds an unreadable cache; pass --overwrite"):
        plan_output(_cfg(tmp_path / "c"), "f" * 64, None)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        plan_output(_cfg(tmp_path / "f", overwrite=True), "f" * 64, None)


def test_a_part_goes_into_its_directory_never_beside_another_cache(built_cache, tmp_path):
    part = {"index": 1, "count": 2, "row_start": 2, "row_end": 5}
    plan = plan_output(_cfg(tmp_path / "c", num_shards=2, shard_index=1), "f" * 64, part)
    assert plan.url == str(tmp_path / "c" / "part-00001-of-00002")
    shutil.copytree(built_cache, tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"holds another cache \(not the parts of this build\)"):
        plan_output(_cfg(tmp_path / "plain", num_shards=2, shard_index=1), "f" * 64, part)


def test_an_fsspec_url_is_staged_in_a_directory_fixed_by_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_HOME", str(tmp_path / "home"))
    a = plan_output(_cfg("memory://fc-test-output/a"), "f" * 64, None)
    again = plan_output(_cfg("memory://fc-test-output/a"), "f" * 64, None)
    b = plan_output(_cfg("memory://fc-test-output/b"), "f" * 64, None)
    assert a.out == again.out != b.out and a.out.is_relative_to(tmp_path / "home" / "staging")
    assert not a.location.local and a.existing is None


def test_a_second_build_into_the_same_place_is_refused_naming_the_holder(tmp_path):
    work = tmp_path / "c.incomplete"
    with build_lock(work) as path:
        assert f"pid {os.getpid()} on " in path.read_text()
        # a second open file description: flock excludes it as it would another process
        with pytest.raises(ConfigError, match=rf"--out c: another build into the same place is running \(pid "
                           rf"{os.getpid()} on .* since .*; lock {path}\)"):  # fmt: skip
            with build_lock(work):
                pass
    assert not lock_path(work).exists()  # released and removed
    with build_lock(work):  # and taken again
        pass


def test_a_build_holds_the_lock_while_it_runs(tmp_path):
    """Another process's build: the lock is the kernel's, so a holder killed with -9 leaves none behind."""
    import subprocess
    import sys

    work = tmp_path / "c.incomplete"
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom fusion_cache.capture.output import build_lock\n"
        f"with build_lock(Path({str(work)!r})):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"another build into the same place is running \(pid {proc.pid} "):
            with build_lock(work):
                pass
    finally:
        proc.kill()
        proc.wait()
    with build_lock(work):  # the dead holder's lock is gone with it
        pass
