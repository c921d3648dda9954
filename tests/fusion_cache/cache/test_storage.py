"""Caches at fsspec URLs: build into memory://, read, verify and inspect it there, and name a damaged shard."""

from __future__ import annotations

import fsspec
import numpy as np
from typer.testing import CliRunner

from fusion_cache.cache.reader import CacheReader
from fusion_cache.cli.main import app


def test_build_read_and_verify_at_a_memory_url(built_cache, tiny_model_dir, data_file, hf_engine):
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
