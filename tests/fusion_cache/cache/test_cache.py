"""Cache v1: round trip, fingerprints, and refusal of damaged or foreign caches (errors name the shard)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from fusion_cache.cache.fingerprint import chain_fingerprint
from fusion_cache.cache.fingerprint import config_fingerprint
from fusion_cache.cache.fingerprint import validate_fingerprint
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.reader import BatchPosition
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.schema import COLUMNS
from fusion_cache.cache.writer import ShardWriter
from fusion_cache.errors import FingerprintError
from fusion_cache.errors import ShardFormatError


def _row(i: int, n: int, start: int, k: int, rng) -> CacheRow:
    na = n - start
    return CacheRow(
        sample_id=f"{i:032x}",
        row_index=i,
        conversation=json.dumps([{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]),
        input_ids=rng.integers(0, 1000, n).astype(np.int32),
        answer_start=start,
        token_byte_start=np.arange(n, dtype=np.int32),
        token_byte_end=np.arange(1, n + 1, dtype=np.int32),
        topk_ids=rng.integers(0, 1000, (na, k)).astype(np.int32),
        topk_logprobs=-np.sort(rng.random((na, k)).astype(np.float32), axis=1),
        target_logprobs=-rng.random(na).astype(np.float32),
    )


def test_writer_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    rows = [_row(i, n, s, 4, rng) for i, (n, s) in enumerate([(10, 3), (5, 1), (30, 29), (7, 2), (12, 6)])]
    prov = {"schema_version": 1, "k": 4, "config_fingerprint": "0" * 64}
    with ShardWriter(tmp_path, prov, shard_rows=2) as w:
        w.write_rows(rows[:3])
        w.write_rows(rows[3:])
    assert [s["rows"] for s in w.shards] == [2, 2, 1]  # a batch is split across shards at shard_rows
    assert [s["path"] for s in w.shards] == [f"shard-0000{i}-of-00003.arrow" for i in range(3)]
    assert not list(tmp_path.glob("*.tmp"))
    # read back through plain pyarrow, as another team would
    with pa.memory_map(str(tmp_path / w.shards[0]["path"])) as src:
        table = pa.ipc.open_stream(src).read_all()
    assert table.schema.names == list(COLUMNS)
    assert table.column("input_ids").to_pylist()[1] == rows[1].input_ids.tolist()
    got = np.array(table.column("topk_logprobs").to_pylist()[0], dtype=np.float32).reshape(-1, 4)
    np.testing.assert_array_equal(got, rows[0].topk_logprobs)


def test_reader_round_trip_of_a_real_build(built_cache, data_file):
    reader = CacheReader(built_cache)
    m = reader.manifest
    assert m.stats.rows == 4 and m.stats.skipped["empty_response"] == 1
    assert len(m.shards) == 2 and sum(s.rows for s in m.shards) == 4
    rows = list(reader.iter_rows())
    assert [r.row_index for r in rows] == [0, 1, 3, 4]
    for r in rows:
        n_ans = len(r.input_ids) - r.answer_start
        assert r.topk_ids.shape == r.topk_logprobs.shape == (n_ans, 8)
        assert r.target_logprobs.shape == (n_ans,)
        assert (np.diff(r.topk_logprobs, axis=1) <= 0).all()
        # the actual next token's log-prob is never above the top-1
        assert (r.target_logprobs <= r.topk_logprobs[:, 0] + 1e-6).all()
    assert sum(len(r.target_logprobs) for r in rows) == m.stats.answer_tokens
    assert reader.verify() == []


def test_resume_position_skips_what_was_read(built_cache):
    reader = CacheReader(built_cache)
    batches = list(reader.iter_batches())
    later = list(reader.iter_batches(start=BatchPosition(1, 0)))
    assert len(later) == len([p for p, _ in batches if p.shard >= 1])


def test_loads_with_hf_datasets(built_cache):
    from datasets import load_dataset

    files = sorted(str(p) for p in built_cache.glob("shard-*.arrow"))
    ds = load_dataset("arrow", data_files=files, split="train", cache_dir=str(built_cache.parent / "hf"))
    assert len(ds) == 4
    assert set(COLUMNS) <= set(ds.column_names)


def test_fingerprint_is_deterministic_and_sensitive():
    base = {"k": 64, "teacher": {"name": "t", "revision": "r"}, "dataset_hash": "d" * 64}
    assert config_fingerprint(base) == config_fingerprint(dict(reversed(list(base.items()))))
    for change in ({"k": 32}, {"teacher": {"name": "t", "revision": "r2"}}, {"dataset_hash": "e" * 64}):
        assert config_fingerprint({**base, **change}) != config_fingerprint(base)
    shards = [{"path": "shard-00000-of-00001.arrow", "rows": 3, "sha256": "a" * 64}]
    fp = config_fingerprint(base)
    assert chain_fingerprint(fp, shards) == chain_fingerprint(fp, [dict(s) for s in shards])
    assert chain_fingerprint(fp, shards) != chain_fingerprint(fp, [{**shards[0], "sha256": "b" * 64}])
    with pytest.raises(FingerprintError):
        validate_fingerprint("xyz")
    with pytest.raises(FingerprintError):
        config_fingerprint({"bad": float("nan")})


def test_rebuild_gives_the_same_fingerprint(built_cache, tmp_path, tiny_model_dir, data_file, hf_engine):
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig

    cfg = BuildConfig.create(
        teacher=str(tiny_model_dir),
        data=str(data_file),
        out=str(tmp_path / "again"),
        top_k=8,
        engine="hf",
        shard_rows=2,
    )
    again = run_build(cfg, engine=hf_engine, progress=False)
    assert again.fingerprint == load_manifest(built_cache).fingerprint


def _edit_manifest(cache, fn):
    path = cache / "manifest.json"
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def test_edited_manifest_fails_the_fingerprint(cache_copy):
    _edit_manifest(cache_copy, lambda m: m["shards"][0].update(rows=99))
    with pytest.raises(FingerprintError, match="does not match"):
        CacheReader(cache_copy)


@pytest.mark.parametrize("bad_path", ["../evil.arrow", "/etc/passwd.arrow", "sub/shard.arrow", "shard.bin"])
def test_shard_paths_outside_the_cache_are_refused(cache_copy, bad_path):
    _edit_manifest(cache_copy, lambda m: m["shards"][0].update(path=bad_path))
    with pytest.raises(ShardFormatError, match="plain file name|must end with .arrow"):
        load_manifest(cache_copy)


def test_unknown_schema_version_and_codec_refused(cache_copy):
    _edit_manifest(cache_copy, lambda m: m.update(schema_version=99))
    with pytest.raises(ShardFormatError, match="schema_version 99"):
        load_manifest(cache_copy)
    _edit_manifest(cache_copy, lambda m: m.update(schema_version=1, codec={"name": "zip9"}))
    with pytest.raises(ShardFormatError, match="codec 'zip9'"):
        load_manifest(cache_copy)


def test_not_a_cache(tmp_path):
    with pytest.raises(ShardFormatError, match="not a fusion-cache directory"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardFormatError, match="unreadable manifest"):
        load_manifest(tmp_path)


def test_verify_names_a_bit_flipped_shard(cache_copy):
    shard = sorted(cache_copy.glob("shard-*.arrow"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = CacheReader(cache_copy).verify()
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]


def test_truncated_shard_is_named(cache_copy):
    shard = sorted(cache_copy.glob("shard-*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:-200])
    problems = CacheReader(cache_copy).verify()
    assert any(shard.name in p for p in problems)
    with pytest.raises(ShardFormatError, match=shard.name):
        list(CacheReader(cache_copy).iter_rows())


def test_missing_shard_is_named(cache_copy):
    shard = sorted(cache_copy.glob("shard-*.arrow"))[0]
    shard.unlink()
    assert any(shard.name in p and "missing" in p for p in CacheReader(cache_copy).verify())
    with pytest.raises(ShardFormatError, match="missing"):
        list(CacheReader(cache_copy).iter_rows())


def test_shard_with_other_k_is_refused(cache_copy, tmp_path, reseal):
    reader = CacheReader(cache_copy)
    rows = list(reader.iter_rows())
    prov = {"schema_version": 1, "k": 4, "config_fingerprint": reader.manifest.config_fingerprint}
    for r in rows:
        r.topk_ids, r.topk_logprobs = r.topk_ids[:, :4], r.topk_logprobs[:, :4]
    with ShardWriter(tmp_path / "w", prov) as w:
        w.write_rows(rows[:2])
    target = cache_copy / reader.manifest.shards[0].path
    target.write_bytes((tmp_path / "w" / w.shards[0]["path"]).read_bytes())
    with pytest.raises(ShardFormatError, match="bytes on disk"):  # a replaced shard fails its size first
        list(CacheReader(cache_copy).iter_rows())
    reseal(cache_copy, checksums=False)
    with pytest.raises(ShardFormatError, match="sha256"):  # then its checksum
        list(CacheReader(cache_copy).iter_rows())
    with pytest.raises(ShardFormatError, match="K=4 in the shard but K=8"):  # and its K even without it
        list(CacheReader(cache_copy, check_checksums=False).iter_rows())


def test_declared_lengths_larger_than_data_are_refused(cache_copy):
    reader = CacheReader(cache_copy)
    _, batch = next(reader.iter_batches())
    cols = {name: batch.column(name) for name in batch.schema.names}
    cols["answer_start"] = pa.array([1] * batch.num_rows, pa.int32())  # claims more answer rows than stored
    bad = pa.RecordBatch.from_arrays(list(cols.values()), schema=batch.schema)
    with pytest.raises(ShardFormatError, match="row 0: column 'token_byte_start'|row 0: column 'topk_ids'"):
        reader.decode_batch(bad, "shard-x")
