"""`run_build_ray`: a local Ray with 2 workers writes the same cache as the sharded CLI's parts."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile

import pytest

from fusion_cache.cache.reader import CacheReader
from fusion_cache.capture.build import run_build
from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.ray import run_build_ray
from fusion_cache.errors import ConfigError


def _cfg(model, data, out, **kw) -> BuildConfig:
    base = dict(teacher=str(model), data=str(data), out=str(out), engine="hf", top_k=8, shard_rows=2, dtype="float32")
    return BuildConfig.create(**{**base, **kw})


def test_ray_needs_parts(tmp_path):
    with pytest.raises(ConfigError, match="needs --num-shards >= 2"):
        run_build_ray(_cfg("t", "d", tmp_path))
    with pytest.raises(ConfigError, match="do not pass --shard-index"):
        run_build_ray(_cfg("t", "d", tmp_path, num_shards=2, shard_index=1))


def test_cli_ray_needs_parts(tmp_path, data_file):
    from typer.testing import CliRunner

    from fusion_cache.cli.main import app

    args = ["build", "--teacher", "t", "--data", str(data_file), "--out", str(tmp_path / "o"), "--ray"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--ray: needs --num-shards >= 2" in r.output


@pytest.mark.slow
def test_ray_build_equals_the_sharded_cli_build(tmp_path, monkeypatch, tiny_model_dir, data_file, hf_engine):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install 'fusion-cache[ray]'")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token
    sharded = tmp_path / "sharded"
    for i in range(2):
        run_build(_cfg(tiny_model_dir, data_file, sharded, num_shards=2, shard_index=i), engine=hf_engine)
    # Ray's socket paths must stay under ~107 characters: a short temp dir instead of pytest's long tmp_path
    ray_tmp = tempfile.mkdtemp(prefix="fc-ray-", dir="/tmp")
    try:
        m = run_build_ray(
            _cfg(tiny_model_dir, data_file, tmp_path / "ray", num_shards=2),
            init_kwargs={"num_cpus": 2, "_temp_dir": ray_tmp},
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    ref = CacheReader(sharded).manifest
    assert [p.path for p in m.parts] == ["part-00000-of-00002", "part-00001-of-00002"]
    assert m.fingerprint == ref.fingerprint and m.config_fingerprint == ref.config_fingerprint
    assert CacheReader(tmp_path / "ray").verify() == []


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
