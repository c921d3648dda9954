"""Top-K codecs: property-based round trips, real builds with each codec, and refusal of corrupt compact shards."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from fusion_cache.cache.codecs import make_codec
from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.reader import decode_record_batch
from fusion_cache.cache.schema import shard_schema
from fusion_cache.cache.writer import CacheRow
from fusion_cache.cache.writer import rows_to_batch
from fusion_cache.cache.writer import shard_schema_with_order
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError


def _rows(seed: int, k: int, lengths: list[int], vocab: int, scale: float) -> list[CacheRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for i, na in enumerate(lengths):
        logits = rng.normal(0, scale, (na, vocab)).astype(np.float64)
        lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
        vals = np.take_along_axis(lp, ids, axis=1).astype(np.float32)
        rows.append(
            CacheRow(
                sample_id=f"{i:032x}",
                row_index=i,
                conversation="[]",
                input_ids=rng.integers(0, vocab, na + 2).astype(np.int32),
                answer_start=2,
                token_byte_start=np.arange(na + 2, dtype=np.int32),
                token_byte_end=np.arange(1, na + 3, dtype=np.int32),
                topk_ids=ids.astype(np.int32),
                topk_logprobs=vals,
                target_logprobs=vals[:, 0].copy(),
            )
        )
    return rows


def _round_trip(rows, codec, k):
    """Write through Arrow IPC (with the codec's compression) and decode, as a reader would."""
    prov = {"schema_version": 2, "k": k, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
    # the id order from the first row only: later rows' other ids take the "not in the order" path
    schema, order = shard_schema_with_order(shard_schema(prov, codec), codec, rows[:1])
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema, options=codec.ipc_options()) as w:
        w.write_batch(rows_to_batch(rows, schema, codec, k, order))
    batches = list(pa.ipc.open_stream(pa.BufferReader(sink.getvalue())))
    return [r for b in batches for r in decode_record_batch(b, codec, k, "mem")]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(2, 40),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    vocab=st.sampled_from([64, 300, 70000]),
    scale=st.sampled_from([0.0, 0.5, 4.0, 30.0]),
    name=st.sampled_from(["raw", "full", "values"]),
    bits=st.integers(2, 16),
)
def test_every_codec_round_trips(seed, k, lengths, vocab, scale, name, bits):
    rows = _rows(seed, k, lengths, vocab, scale)
    codec = make_codec(name, value_bits=None if name == "raw" else bits, vocab_size=vocab)
    dec = _round_trip(rows, codec, k)
    assert len(dec) == len(rows)
    m = (1 << bits) - 1
    for a, b in zip(rows, dec, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert b.topk_logprobs.shape == a.topk_logprobs.shape and b.topk_logprobs.dtype == np.float32
        if name == "raw":
            np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        else:
            v = a.topk_logprobs.astype(np.float64)
            span = v[:, :1] - v[:, -1:]
            rel = 1e-3  # max and span are stored in fp16
            bound = span * (1.0 / m + 1.0 / m**2 + rel) + np.abs(v[:, :1]) * rel + 1e-5
            assert (np.abs(b.topk_logprobs - v) <= bound).all()
            assert (np.diff(b.topk_logprobs, axis=1) <= 1e-6).all()
        if name == "values":
            with pytest.raises(ShardFormatError, match="rebuild the cache with --codec full or raw"):
                b.topk_ids[:, 0]
            with pytest.raises(ShardFormatError, match="target_logprobs"):
                np.asarray(b.target_logprobs)
        else:
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
            if name == "raw":
                np.testing.assert_array_equal(a.target_logprobs, b.target_logprobs)
            else:  # fp16
                np.testing.assert_allclose(b.target_logprobs, a.target_logprobs, rtol=1e-3, atol=1e-6)
        if name == "full":
            want = np.clip(1 - np.exp(a.topk_logprobs.astype(np.float64)).sum(axis=1), 0, 1)
            np.testing.assert_allclose(b.tail_mass, want, rtol=2e-3, atol=1e-6)


def test_codec_parameters_are_validated():
    with pytest.raises(ConfigError, match="unknown codec"):
        make_codec("zip9")
    with pytest.raises(ConfigError, match="value_bits=40"):
        make_codec("full", value_bits=40, vocab_size=100)
    with pytest.raises(ConfigError, match="raw codec"):
        make_codec("raw", value_bits=8)
    assert make_codec("full", vocab_size=49152).id_bytes == 2
    assert make_codec("full", vocab_size=151936).id_bytes == 3
    for bad in (
        {"name": "full", "value_bits": 7},
        {"name": "values", "value_bits": 8, "zstd_level": 3, "x": 1},
        {"name": "values", "value_bits": "8", "zstd_level": 3},
        ["raw"],
    ):
        with pytest.raises(ShardFormatError):
            parse_codec(bad)


def test_corrupt_value_codes_are_named():
    rows = _rows(0, 8, [5, 3], 300, 4.0)
    codec = make_codec("values", vocab_size=300)
    prov = {"schema_version": 2, "k": 8, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
    schema = shard_schema(prov, codec)
    batch = rows_to_batch(rows, schema, codec, 8)
    cols = {n: batch.column(n) for n in schema.names}
    codes = np.asarray(cols["topk_codes"].values).copy()
    codes[:] = 255  # the deltas now sum far past 2^bits - 1
    cols["topk_codes"] = pa.ListArray.from_arrays(cols["topk_codes"].offsets, pa.array(codes, pa.uint8()))
    bad = pa.RecordBatch.from_arrays(list(cols.values()), schema=schema)
    with pytest.raises(ShardFormatError, match="shard-z: answer position 0: corrupt value codes"):
        decode_record_batch(bad, codec, 8, "shard-z")


# ---------------------------------------------------------------- real builds with each compact codec
@pytest.fixture(scope="module", params=["full", "values"])
def codec_cache(request, tmp_path_factory, tiny_model_dir, data_file, hf_engine):
    from fusion_cache.build import run_build
    from fusion_cache.config import BuildConfig

    out = tmp_path_factory.mktemp("codec-caches") / request.param
    cfg = BuildConfig.create(
        teacher=str(tiny_model_dir),
        data=str(data_file),
        out=str(out),
        top_k=8,
        engine="hf",
        shard_rows=2,
        codec=request.param,
    )
    run_build(cfg, engine=hf_engine, progress=False)
    return out


def test_compact_build_matches_raw(codec_cache, built_cache):
    reader = CacheReader(codec_cache)
    m = reader.manifest
    assert m.schema_version == 2 and m.codec["name"] == codec_cache.name
    assert reader.verify() == []
    raw = list(CacheReader(built_cache).iter_rows())
    got = list(reader.iter_rows())
    assert [r.sample_id for r in got] == [r.sample_id for r in raw]
    for a, b in zip(raw, got, strict=True):
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=0.05)
        if codec_cache.name == "full":
            np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
    assert m.stats.payload_bytes < load_manifest(built_cache).stats.payload_bytes


def test_compact_cache_loads_with_hf_datasets(codec_cache):
    from datasets import load_dataset

    files = sorted(str(p) for p in codec_cache.glob("shard-*.arrow"))
    ds = load_dataset("arrow", data_files=files, split="train", cache_dir=str(codec_cache.parent / "hf"))
    assert len(ds) == 4 and "topk_codes" in ds.column_names


def test_values_cache_streams_for_uld(codec_cache, tiny_model_dir):
    from transformers import AutoTokenizer

    from fusion_cache.stream import CacheStream

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ex = list(CacheStream(str(codec_cache), tok, chat_template=True, max_length=256))
    assert len(ex) == 4 and all(e.teacher_values.shape[1] == 8 for e in ex)
    assert all((e.teacher_top1 is None) == (codec_cache.name == "values") for e in ex)


def _edit(cache, fn):
    path = cache / "manifest.json"
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def test_compact_corruptions_are_named(codec_cache, tmp_path):
    shards = sorted(p.name for p in codec_cache.glob("shard-*.arrow"))
    for damage in ("flip", "truncate"):
        copy = tmp_path / damage
        shutil.copytree(codec_cache, copy)
        path = copy / shards[1]
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x10
        else:
            data = data[: len(data) // 2]
        path.write_bytes(bytes(data))
        problems = CacheReader(copy).verify()
        assert problems and all(shards[1] in p for p in problems)
        with pytest.raises(ShardFormatError, match=f"{shards[1]}: sha256"):  # reading checks it too
            list(CacheReader(copy).iter_rows())
        with pytest.raises(ShardFormatError, match=shards[1]):  # and without the checksum, the decoder refuses it
            list(CacheReader(copy, check_checksums=False).iter_rows()) if damage == "truncate" else _flip_codes(copy)


def _flip_codes(cache):
    """Raise the first position's first value code past 2^bits - 1 in a re-written shard (valid Arrow, bad codes)."""
    reader = CacheReader(cache, check_checksums=False)
    name = reader.manifest.shards[1].path
    batch = next(iter(reader._iter_shard(1)))
    cols = {n: batch.column(n) for n in batch.schema.names}
    codes = np.asarray(cols["topk_codes"].values).copy()
    codes[0] = 255
    cols["topk_codes"] = pa.ListArray.from_arrays(cols["topk_codes"].offsets, pa.array(codes, pa.uint8()))
    reader.decode_batch(pa.RecordBatch.from_arrays(list(cols.values()), schema=batch.schema), name)


def test_manifest_codec_disagreeing_with_shards_is_refused(codec_cache, tmp_path):
    from fusion_cache.cache.fingerprint import chain_fingerprint

    copy = tmp_path / "c"
    shutil.copytree(codec_cache, copy)

    def other_bits(m):
        m["codec"]["value_bits"] = m["codec"]["value_bits"] - 1
        m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])

    _edit(copy, other_bits)
    with pytest.raises(ShardFormatError, match="codec .* in the shard but"):
        list(CacheReader(copy).iter_rows())
    _edit(copy, lambda m: m.update(codec={"name": "full", "value_bits": 99, "id_bytes": 2, "zstd_level": 3}))
    with pytest.raises(ShardFormatError, match="value_bits=99"):
        CacheReader(copy)


def test_wrong_column_type_is_refused(codec_cache):
    reader = CacheReader(codec_cache)
    _, batch = next(reader.iter_batches())
    cols = {n: batch.column(n) for n in batch.schema.names}
    cols["topk_span"] = pa.array([[1.0]] * batch.num_rows, pa.list_(pa.float64()))
    bad = pa.RecordBatch.from_pydict(cols)
    with pytest.raises(ShardFormatError, match="shard-q: column 'topk_span' is list<item: double>"):
        reader.decode_batch(bad, "shard-q")


def test_the_reader_in_the_docs_decodes_what_fusion_cache_decodes(codec_cache, monkeypatch):
    """docs/cache-format.md section 4 is a complete reader: run it on a real cache and compare."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "cache-format.md").read_text()
    snippet = doc.split("## 4. Reading it without fusion-cache")[1].split("```python\n")[1].split("```")[0]
    snippet = snippet.replace(
        "row = batch.slice(0, 1).to_pylist()[0]", "row = batch.slice(0, 1).to_pylist()[0]; seen.append(row)"
    )
    snippet = snippet.replace(
        '                tail = np.array(row["tail_mass"], np.float32)  # [n_answer]',
        '                tail = np.array(row["tail_mass"], np.float32)  # [n_answer]\n                got.append(ids)',
    )
    snippet += "\n            got_lps.append(lps)\n"
    monkeypatch.chdir(codec_cache.parent)
    snippet = snippet.replace('"cache/', f'"{codec_cache.name}/').replace('f"cache/', f'f"{codec_cache.name}/')
    scope = {"seen": [], "got": [], "got_lps": []}
    exec(snippet, scope)  # noqa: S102 - our own documentation
    reader = CacheReader(codec_cache)
    first_rows = [next(iter(reader.decode_batch(b, "x"))) for _, b in reader.iter_batches()]
    assert len(scope["got_lps"]) == len(first_rows) > 0
    for want, lps in zip(first_rows, scope["got_lps"], strict=True):
        np.testing.assert_allclose(lps, want.topk_logprobs, rtol=1e-6, atol=1e-5)
    if codec_cache.name == "full":
        for want, ids in zip(first_rows, scope["got"], strict=True):
            np.testing.assert_array_equal(ids, want.topk_ids)


def test_compact_declared_lengths_larger_than_data_are_refused(codec_cache):
    reader = CacheReader(codec_cache)
    _, batch = next(reader.iter_batches())
    cols = {n: batch.column(n) for n in batch.schema.names}
    cols["answer_start"] = pa.array([1] * batch.num_rows, pa.int32())  # claims more answer rows than stored
    bad = pa.RecordBatch.from_arrays(list(cols.values()), schema=batch.schema)
    with pytest.raises(ShardFormatError, match="shard-y: row 0: column '(topk_ids_b0|topk_max)' has"):
        reader.decode_batch(bad, "shard-y")


def _rewrite_as_v1(cache, tmp_path):
    """Turn a raw v2 cache into the v1 layout an older fusion-cache wrote (same columns, version 1)."""
    from fusion_cache.cache.fingerprint import chain_fingerprint
    from fusion_cache.cache.fingerprint import file_sha256
    from fusion_cache.cache.writer import ShardWriter

    reader = CacheReader(cache)
    m = json.loads((cache / "manifest.json").read_text())
    prov = {"schema_version": 1, "k": m["k"], "codec": {"name": "raw"}, "config_fingerprint": m["config_fingerprint"]}
    for i, info in enumerate(m["shards"]):
        rows = [r for b in reader._iter_shard(i) for r in reader.decode_batch(b, info["path"])]
        with ShardWriter(tmp_path / f"w{i}", prov) as w:
            w.write_rows(rows)
        (cache / info["path"]).write_bytes((tmp_path / f"w{i}" / w.shards[0]["path"]).read_bytes())
        info.update(sha256=file_sha256(cache / info["path"]), bytes=(cache / info["path"]).stat().st_size)
    m["schema_version"] = 1
    m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])
    (cache / "manifest.json").write_text(json.dumps(m))


def test_v1_caches_are_still_read_and_v1_with_a_compact_codec_is_refused(cache_copy, tmp_path):
    _rewrite_as_v1(cache_copy, tmp_path)
    reader = CacheReader(cache_copy)
    assert reader.manifest.schema_version == 1 and reader.verify() == []
    assert len(list(reader.iter_rows())) == 4
    _edit(cache_copy, lambda m: m.update(codec={"name": "values", "value_bits": 8, "zstd_level": 3}))
    with pytest.raises(ShardFormatError, match="schema_version 1 has only the raw codec"):
        load_manifest(cache_copy)


def test_missing_or_corrupt_id_order_is_refused():
    from fusion_cache.cache.codecs import ID_ORDER_KEY

    rows = _rows(1, 8, [4, 3], 300, 4.0)
    codec = make_codec("full", vocab_size=300)
    prov = {"schema_version": 2, "k": 8, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
    schema, order = shard_schema_with_order(shard_schema(prov, codec), codec, rows)
    batch = rows_to_batch(rows, schema, codec, 8, order)
    meta = dict(schema.metadata)
    bad_metas = {
        "is missing": {k: v for k, v in meta.items() if k != ID_ORDER_KEY},
        "is corrupt": {**meta, ID_ORDER_KEY: b'{"runs": [1], "count": 1, "zstd_b64": "!!"}'},
        "out of range or repeated": {
            **meta,
            ID_ORDER_KEY: json.dumps(json.loads(meta[ID_ORDER_KEY]) | {"runs": [1] * len(order)}).encode(),
        },
    }
    for why, md in bad_metas.items():
        with pytest.raises(ShardFormatError, match=f"shard-o: .*{why}"):
            decode_record_batch(batch.replace_schema_metadata(md), codec, 8, "shard-o")
