"""`write_atomic`, `fsync_file`, `fsync_dir`: the order of the syncs, and what an error leaves behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fusion_cache.cache import durable
from fusion_cache.cache.durable import fsync_dir
from fusion_cache.cache.durable import fsync_file
from fusion_cache.cache.durable import write_atomic


def test_write_atomic_replaces_the_content_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_the_temp_file(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "text, not bytes")  # the write itself fails, after the temp file was created
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_temp_file_is_named_per_process_and_ends_in_tmp(tmp_path):
    # the rename of one process can never carry another's bytes, and sweepers of `*.tmp` recognize it
    (tmp_path / f"a.json.{os.getpid() + 1}.tmp").write_bytes(b"another process, half written")
    write_atomic(tmp_path / "a.json", b"mine")
    assert (tmp_path / "a.json").read_bytes() == b"mine"
    assert (tmp_path / f"a.json.{os.getpid() + 1}.tmp").read_bytes() == b"another process, half written"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc/self/fd (Linux)")
def test_write_atomic_syncs_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """The real calls run; each is recorded with the file it touched, to check the order of the guarantees."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    path = tmp_path / "record.json"
    write_atomic(path, b"{}")
    tmp_name = str(path.with_name(f"record.json.{os.getpid()}.tmp"))
    assert events == [("fsync", tmp_name), ("rename", str(path)), ("fsync", str(tmp_path))]


def test_fsync_file_and_dir_run_on_real_paths(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    fsync_file(tmp_path / "f")
    fsync_dir(tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot open a directory: fsync_dir skips it there")
def test_fsync_dir_of_a_missing_directory_raises(tmp_path):
    # an error is never swallowed: only a file system that cannot sync a directory at all is skipped
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
