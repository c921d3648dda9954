"""Caches at fsspec URLs: build into memory://, read, verify and inspect it there, and name a damaged shard; remote
shards read through the local shard cache once; remote errors are one line."""

from __future__ import annotations

import importlib.util
import socket

import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.storage import CacheLocation
from fusion_cache.cache.storage import is_transient
from fusion_cache.cache.storage import remote_error
from fusion_cache.cli.main import app
from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.errors import ShardFormatError


def test_build_read_and_verify_at_a_memory_url(
    built_cache, tiny_model_dir, data_file, hf_engine, tmp_path, monkeypatch
):
    monkeypatch.setenv("FUSION_CACHE_HOME", str(tmp_path / "home"))
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig

    url = "memory://caches/tiny-full"
    cfg = BuildConfig.create(
        teacher=str(tiny_model_dir), data=str(data_file), out=url, top_k=8, engine="hf", shard_rows=2, codec="full"
    )
    m = run_build(cfg, engine=hf_engine, progress=False)
    fs = fsspec.filesystem("memory")
    assert (
        sorted(p.rsplit("/", 1)[1] for p in fs.ls("/caches/tiny-full", detail=False))[-1]
        == "shard-00001-of-00002.arrow"
    )
    reader = CacheReader(url)
    assert reader.manifest.fingerprint == m.fingerprint and reader.verify() == []
    local = list(CacheReader(built_cache).iter_rows())
    for a, b in zip(local, reader.iter_rows(), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    # the same build again is a no-op
    assert run_build(cfg, engine=hf_engine, progress=False).fingerprint == m.fingerprint
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", url])
    assert (
        res.exit_code == 0
        and "8 / full" in res.output
        and "value_bits=6" in res.output
        and "tokenizer hash" in res.output
    )
    res = runner.invoke(app, ["verify", url])
    assert res.exit_code == 0 and "OK" in res.output
    # damage one shard in place: verify names it, exit code 1
    shard = "/caches/tiny-full/shard-00000-of-00002.arrow"
    data = bytearray(fs.cat_file(shard))
    data[100] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    res = runner.invoke(app, ["verify", url])
    assert res.exit_code == 1 and "shard-00000-of-00002.arrow" in res.output
    fs.rm("/caches", recursive=True)


def _memory_copy(directory, url: str) -> fsspec.AbstractFileSystem:
    fs = fsspec.filesystem("memory")
    for f in sorted(directory.iterdir()):
        fs.pipe_file(url.removeprefix("memory://") + "/" + f.name, f.read_bytes())
    return fs


def test_remote_shards_are_fetched_and_hashed_once_then_read_locally(built_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_HOME", str(tmp_path / "home"))
    url = "memory://caches/once"
    fs = _memory_copy(built_cache, url)
    opened = []
    real_open = fs.open
    monkeypatch.setattr(fs, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    manifest = CacheReader(url).manifest
    for _ in range(3):  # three epochs
        assert len(list(CacheReader(url).iter_rows())) == manifest.stats.rows
    assert sorted(opened) == sorted(f"/caches/once/{s.path}" for s in manifest.shards)  # each shard read once
    assert sorted(p.name for p in (tmp_path / "home" / "shards").iterdir()) == sorted(s.sha256 for s in manifest.shards)
    # the remote shard is replaced by other bytes: reads keep the verified copy, verify reads the URL and names it
    shard = f"/caches/once/{manifest.shards[0].path}"
    fs.pipe_file(shard, fs.cat_file(shard)[:-1] + b"x")
    assert len(list(CacheReader(url).iter_rows())) == manifest.stats.rows
    problems = CacheReader(url).verify()
    assert len(problems) == 1 and problems[0].startswith(f"{manifest.shards[0].path}: sha256")
    assert not list((tmp_path / "home" / "shards").glob("*.tmp"))
    fs.rm("/caches/once", recursive=True)


def test_a_damaged_remote_shard_is_never_stored(built_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_HOME", str(tmp_path / "home"))
    url = "memory://caches/damaged"
    fs = _memory_copy(built_cache, url)
    name = CacheReader(url).manifest.shards[0].path
    data = bytearray(fs.cat_file(f"/caches/damaged/{name}"))
    data[50] ^= 1
    fs.pipe_file(f"/caches/damaged/{name}", bytes(data))
    with pytest.raises(ShardFormatError, match=f"{name}: sha256 .* corrupt or was replaced"):
        list(CacheReader(url).iter_rows())
    assert not (tmp_path / "home" / "shards").exists() or not any((tmp_path / "home" / "shards").iterdir())
    fs.rm("/caches/damaged", recursive=True)


def test_unknown_schemes_and_missing_backends_are_one_line():
    with pytest.raises(ConfigError, match=r"^zzz://x/c: unknown URL scheme zzz://"):
        CacheLocation("zzz://x/c")
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(MissingDependencyError, match=r"^s3://b/c: s3:// needs the s3fs package: pip install s3fs$"):
            CacheLocation("s3://b/c")


def test_which_errors_are_transient():
    assert is_transient(ConnectionRefusedError()) and is_transient(TimeoutError())
    assert not is_transient(ValueError("bad")) and not is_transient(FileNotFoundError("x"))
    unresolved = socket.gaierror(-2, "Name or service not known")  # no network, or a typo: retrying only waits
    assert not is_transient(unresolved) and "cannot be reached" in str(remote_error(unresolved, "hf://datasets/a/b"))
    assert remote_error(ValueError("bad"), "memory://x") is None
    assert "no permission" in str(remote_error(PermissionError("denied"), "s3://b/c"))
