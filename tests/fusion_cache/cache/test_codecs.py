"""Top-K codecs through the writer and the reader: property-based round trips of every codec and layout, every
registered codec through ShardWriter, real builds with each codec, and refusal of corrupt compact shards. The codec
modules' own tests (registry, quantization, ids, buckets) are in tests/fusion_cache/cache/codecs/."""

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

from fusion_cache.cache.codecs import CODEC_NAMES
from fusion_cache.cache.codecs import FullCodec
from fusion_cache.cache.codecs import get_codec
from fusion_cache.cache.codecs import make_codec
from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.codecs.ids import ID_ORDER_KEY
from fusion_cache.cache.codecs.ids import id_order_key
from fusion_cache.cache.codecs.ids import parse_id_order
from fusion_cache.cache.fast_decode import use_decoder
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.reader import decode_record_batch
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.schema import METADATA_KEY
from fusion_cache.cache.schema import SCHEMA_VERSION
from fusion_cache.cache.schema import shard_schema
from fusion_cache.cache.writer import ShardWriter
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
        # answer tokens: the teacher's top-1, another top-K id, or a random id (often outside the top-K)
        pick = rng.integers(0, 3, na)
        answer = np.where(pick == 0, ids[:, 0], np.where(pick == 1, ids[:, -1], rng.integers(0, vocab, na)))
        input_ids = np.concatenate([rng.integers(0, vocab, 2), answer]).astype(np.int32)
        rows.append(
            CacheRow(
                sample_id=f"{i:032x}",
                row_index=i,
                conversation="[]",
                input_ids=input_ids,
                answer_start=2,
                token_byte_start=np.arange(na + 2, dtype=np.int32),
                token_byte_end=np.arange(1, na + 3, dtype=np.int32),
                topk_ids=ids.astype(np.int32),
                topk_logprobs=vals,
                target_logprobs=lp[np.arange(na), answer].astype(np.float32),
            )
        )
    return rows


def _codec(name, bits, vocab):
    """(codec, schema version) for a test name: "full1" is full layout 1 in a version-2 shard, "full2" and "full3"
    full layouts 2 and 3 of version 3 (all still read); "full" is the layout a build writes (4)."""
    if name == "full1":
        full = make_codec("full", value_bits=bits, vocab_size=vocab)
        return FullCodec(value_bits=bits, id_bytes=full.id_bytes, zstd_level=3), 2
    if name in ("full2", "full3"):
        full = make_codec("full", value_bits=bits, vocab_size=vocab)
        return FullCodec(value_bits=bits, id_bytes=full.id_bytes, zstd_level=3, layout=int(name[-1])), 3
    return make_codec(name, value_bits=None if name == "raw" else bits, vocab_size=vocab), SCHEMA_VERSION


def _round_trip(rows, codec, k, version=SCHEMA_VERSION):
    """Write through Arrow IPC (with the codec's compression) and decode, as a reader would."""
    prov = {"schema_version": version, "k": k, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
    # the id order from the first row only: later rows' other ids take the "not in the order" path
    schema, order = shard_schema_with_order(shard_schema(prov, codec), codec, rows[:1])
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema, options=codec.ipc_options()) as w:
        w.write_batch(rows_to_batch(rows, schema, codec, k, order))
    batches = list(pa.ipc.open_stream(pa.BufferReader(sink.getvalue())))
    orders = _orders(codec.shard_entry(order), codec)  # layout 4: the order its manifest entry would hold
    return [r for b in batches for r in decode_record_batch(b, codec, k, "mem", id_orders=orders)]


def _orders(entry: dict, codec) -> dict:
    """The id orders a shard's manifest entry (or writer record) ``entry`` gives its rows, by key."""
    if "id_order" not in entry:
        return {}
    order = parse_id_order(entry["id_order"], codec.id_bytes, "test")
    return {id_order_key(order): order}


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(2, 40),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    vocab=st.sampled_from([64, 300, 70000]),
    scale=st.sampled_from([0.0, 0.5, 4.0, 30.0]),
    name=st.sampled_from(["raw", "full", "full3", "full2", "full1", "values", "shape"]),
    bits=st.integers(2, 16),
)
def test_every_codec_round_trips(decoder, seed, k, lengths, vocab, scale, name, bits):
    rows = _rows(seed, k, lengths, vocab, scale)
    codec, version = _codec(name, bits, vocab)
    assert parse_codec(codec.to_json(), schema_version=version) == codec
    with use_decoder(decoder):
        dec = _round_trip(rows, codec, k, version)
    assert len(dec) == len(rows)
    m = (1 << bits) - 1
    for a, b in zip(rows, dec, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert b.topk_logprobs.shape == a.topk_logprobs.shape and b.topk_logprobs.dtype == np.float32
        if name == "raw":
            np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        elif name == "shape":  # the row's shape (v - v_0) / (v_0 - v_{K-1}), linear codes: error <= 1 / (2 m)
            v = a.topk_logprobs.astype(np.float64)
            span = v[:, :1] - v[:, -1:]
            want = np.where(span > 0, (v - v[:, :1]) / np.where(span > 0, span, 1), 0.0)
            assert (np.abs(b.topk_logprobs - want) <= 0.5 / m + 1e-6).all()
            assert (np.diff(b.topk_logprobs, axis=1) <= 0).all()
        else:
            v = a.topk_logprobs.astype(np.float64)
            span = v[:, :1] - v[:, -1:]
            rel = 1e-3  # max and span are stored in fp16
            # half a code step times the steepest slope of the expansion g: 2 for sqrt, 17 ln(17) / 16 for log
            slope = 17 * np.log(17) / 16 if codec.companding == "log" else 2.0
            bound = span * (slope / (2 * m) + 1.0 / m**2 + rel) + np.abs(v[:, :1]) * rel + 1e-5
            assert (np.abs(b.topk_logprobs - v) <= bound).all()
            assert (np.diff(b.topk_logprobs, axis=1) <= 1e-6).all()
        if name in ("values", "shape"):
            with pytest.raises(ShardFormatError, match="rebuild the cache with --codec full or raw"):
                b.topk_ids[:, 0]
            with pytest.raises(ShardFormatError, match="target_logprobs"):
                np.asarray(b.target_logprobs)
        else:
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
            if name == "raw":
                np.testing.assert_array_equal(a.target_logprobs, b.target_logprobs)
            elif name == "full1":  # fp16
                np.testing.assert_allclose(b.target_logprobs, a.target_logprobs, rtol=1e-3, atol=1e-6)
            else:  # the decoded value of the answer's id where it is in the top-K, else fp16
                answer = a.input_ids[a.answer_start :]
                hit = a.topk_ids == answer[:, None]
                found = hit.any(axis=1)
                idx = hit.argmax(axis=1)
                np.testing.assert_array_equal(b.target_logprobs[found], b.topk_logprobs[found, idx[found]])
                np.testing.assert_allclose(b.target_logprobs[~found], a.target_logprobs[~found], rtol=1e-3, atol=1e-6)
        if name.startswith("full"):
            want = np.clip(1 - np.exp(a.topk_logprobs.astype(np.float64)).sum(axis=1), 0, 1)
            np.testing.assert_allclose(b.tail_mass, want, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in CODEC_NAMES if not get_codec(n).has_counts])
def test_every_registered_codec_round_trips_through_writer_and_reader(name, decoder, tmp_path):
    """Each top-K codec of the registry through ShardWriter (several shards, the codec from the provenance) and
    decode_record_batch (the codec from the shard's own metadata), checked by what the codec declares it stores.
    The sampled codec stores draws, not a top-K: tests/fusion_cache/cache/codecs/test_sampled.py."""
    k, vocab = 12, 300
    rows = _rows(11, k, [5, 1, 9, 3, 7], vocab, 4.0)
    codec = make_codec(name, vocab_size=vocab)
    prov = {"schema_version": SCHEMA_VERSION, "k": k, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
    with ShardWriter(tmp_path, prov, shard_rows=2) as w:
        w.write_rows(rows)
    assert len(w.shards) == 3
    dec = []
    with use_decoder(decoder):
        for shard in w.shards:
            stream = pa.ipc.open_stream(pa.memory_map(str(tmp_path / shard["path"])))
            stored = parse_codec(json.loads(stream.schema.metadata[METADATA_KEY])["codec"])
            assert stored == codec and type(stored) is get_codec(name)
            orders = _orders(shard, stored)
            dec += [r for b in stream for r in decode_record_batch(b, stored, k, shard["path"], id_orders=orders)]
    assert [r.sample_id for r in dec] == [r.sample_id for r in rows]
    bits = getattr(codec, "value_bits", None)  # None: exact values
    for a, b in zip(rows, dec, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        v = a.topk_logprobs.astype(np.float64)
        span = v[:, :1] - v[:, -1:]
        assert b.topk_logprobs.dtype == np.float32 and b.topk_logprobs.shape == v.shape
        # half a code step times the steepest expansion slope (< 3.1), plus fp16 max and span; 0 for exact values
        tol = 0.0 if bits is None else span * (3.1 / (2 * ((1 << bits) - 1)) + 1e-3) + np.abs(v[:, :1]) * 1e-3
        if codec.has_logprobs:
            assert (np.abs(b.topk_logprobs - v) <= tol).all()
        else:  # the standardized shape
            want = np.where(span > 0, (v - v[:, :1]) / np.where(span > 0, span, 1), 0.0)
            assert (np.abs(b.topk_logprobs - want) <= 0.5 / ((1 << bits) - 1) + 1e-6).all()
        if codec.has_ids:
            np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
        else:
            with pytest.raises(ShardFormatError, match=f"topk_ids: a {name!r} cache"):
                b.topk_ids[:, 0]
        if codec.has_targets:
            # the decoded value of the answer's id where it is among the top-K, else fp16 (full); exact (raw)
            target_tol = np.maximum(tol[:, 0], np.abs(a.target_logprobs) * 1e-3) if bits else 0.0
            assert (np.abs(b.target_logprobs - a.target_logprobs) <= target_tol).all()
        else:
            with pytest.raises(ShardFormatError, match=f"target_logprobs: a {name!r} cache"):
                np.asarray(b.target_logprobs)
        if codec.has_tail_mass:
            want = np.clip(1 - np.exp(v).sum(axis=1), 0, 1)
            np.testing.assert_allclose(b.tail_mass, want, rtol=2e-3, atol=1e-6)
        else:
            assert b.tail_mass is None


def test_corrupt_value_codes_are_named():
    rows = _rows(0, 8, [5, 3], 300, 4.0)
    codec = make_codec("values", vocab_size=300)
    prov = {"schema_version": SCHEMA_VERSION, "k": 8, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
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
@pytest.fixture(scope="module", params=["full", "values", "shape"])
def codec_cache(request, tmp_path_factory, tiny_model_dir, data_file, hf_engine):
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig

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
    assert m.schema_version == SCHEMA_VERSION and m.codec["name"] == codec_cache.name
    assert reader.verify() == []
    raw = list(CacheReader(built_cache).iter_rows())
    got = list(reader.iter_rows())
    assert [r.sample_id for r in got] == [r.sample_id for r in raw]
    for a, b in zip(raw, got, strict=True):
        v = a.topk_logprobs.astype(np.float64)
        if codec_cache.name == "shape":
            v = (v - v[:, :1]) / (v[:, :1] - v[:, -1:])
        np.testing.assert_allclose(b.topk_logprobs, v, atol=0.05)
        if codec_cache.name == "full":
            np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
            np.testing.assert_allclose(b.target_logprobs, a.target_logprobs, atol=0.05)
            np.testing.assert_allclose(b.tail_mass, np.clip(1 - np.exp(v).sum(axis=1), 0, 1), atol=2e-3)
    assert m.stats.payload_bytes < load_manifest(built_cache).stats.payload_bytes


def test_compact_cache_loads_with_hf_datasets(codec_cache):
    from datasets import load_dataset

    files = sorted(str(p) for p in codec_cache.glob("shard-*.arrow"))
    ds = load_dataset("arrow", data_files=files, split="train", cache_dir=str(codec_cache.parent / "hf"))
    assert len(ds) == 4 and any(c.startswith("topk_codes") for c in ds.column_names)


def test_values_cache_streams_for_uld(codec_cache, tiny_model_dir):
    from transformers import AutoTokenizer

    from fusion_cache.train.stream import DistillStream

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ex = list(DistillStream(str(codec_cache), tok, chat_template=True, max_length=256))
    assert len(ex) == 4 and all(e.teachers[0].values.shape[1] == 8 for e in ex)
    assert all((e.teachers[0].top1 is None) == (codec_cache.name != "full") for e in ex)


def _edit(cache, fn):
    path = cache / "manifest.json"
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def _config_fp(m: dict) -> str:
    """The config fingerprint a reader recomputes from the manifest ``m`` (a rewrite must reseal it)."""
    from fusion_cache.cache.fingerprint import config_fingerprint
    from fusion_cache.cache.manifest import json_settings

    return config_fingerprint(json_settings(m))


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
        # reading checks it too: its size first (a truncation), then its sha256
        with pytest.raises(ShardFormatError, match=f"{shards[1]}: (sha256|\\d+ bytes on disk)"):
            list(CacheReader(copy).iter_rows())
        with pytest.raises(ShardFormatError, match=shards[1]):  # and without the checksum, the decoder refuses it
            list(CacheReader(copy, check_checksums=False).iter_rows()) if damage == "truncate" else _flip_codes(copy)


def _flip_codes(cache):
    """Raise the first position's first value code past 2^bits - 1 in a re-written shard (valid Arrow, bad codes)."""
    reader = CacheReader(cache, check_checksums=False)
    name = reader.manifest.shards[1].path
    batch = next(iter(reader._iter_shard(1)))
    cols = {n: batch.column(n) for n in batch.schema.names}
    name_codes = "topk_codes_g0" if "topk_codes_g0" in cols else "topk_codes"
    codes = np.asarray(cols[name_codes].values).copy()
    codes[0] = 255
    cols[name_codes] = pa.ListArray.from_arrays(cols[name_codes].offsets, pa.array(codes, pa.uint8()))
    reader.decode_batch(pa.RecordBatch.from_arrays(list(cols.values()), schema=batch.schema), name)


def test_manifest_codec_disagreeing_with_shards_is_refused(codec_cache, tmp_path):
    from fusion_cache.cache.fingerprint import chain_fingerprint

    copy = tmp_path / "c"
    shutil.copytree(codec_cache, copy)

    def other_bits(m):
        m["codec"]["value_bits"] = m["codec"]["value_bits"] - 1
        m["config_fingerprint"] = _config_fp(m)  # resealed: only the shards' own metadata disagrees now
        m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])

    _edit(copy, other_bits)
    with pytest.raises(ShardFormatError, match="codec .* in the shard but"):
        list(CacheReader(copy).iter_rows())
    _edit(
        copy, lambda m: m.update(codec={"name": "full", "value_bits": 99, "id_bytes": 2, "zstd_level": 3, "layout": 2})
    )
    with pytest.raises(ShardFormatError, match="value_bits=99"):
        CacheReader(copy)


def test_wrong_column_type_is_refused(codec_cache):
    reader = CacheReader(codec_cache)
    _, batch = next(reader.iter_batches())
    cols = {n: batch.column(n) for n in batch.schema.names}
    col = "topk_codes" if "topk_codes" in cols else "topk_span"
    cols[col] = pa.array([[1.0]] * batch.num_rows, pa.list_(pa.float64()))
    bad = pa.RecordBatch.from_pydict(cols)
    with pytest.raises(ShardFormatError, match=f"shard-q: column '{col}' is list<item: double>"):
        reader.decode_batch(bad, "shard-q")


def test_the_reader_in_the_docs_decodes_what_fusion_cache_decodes(codec_cache, monkeypatch):
    """docs/cache-format.md section 4 is a complete reader: run it on a real cache and compare."""
    _check_doc_reader(codec_cache, monkeypatch)


def _check_doc_reader(codec_cache, monkeypatch):
    """Run the reader of docs/cache-format.md section 4 on ``codec_cache`` and compare with CacheReader."""
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
    snippet = snippet.replace(
        '                    target = np.array(row["target_logprobs"], np.float32)  # [n_answer]',
        '                    target = np.array(row["target_logprobs"], np.float32)  # [n_answer]\n'
        "                got_tgt.append(target)",
    )
    snippet += "\n            got_lps.append(lps)\n"
    monkeypatch.chdir(codec_cache.parent)
    snippet = snippet.replace('"cache/', f'"{codec_cache.name}/').replace('f"cache/', f'f"{codec_cache.name}/')
    scope = {"seen": [], "got": [], "got_lps": [], "got_tgt": []}
    exec(snippet, scope)  # noqa: S102 - our own documentation
    reader = CacheReader(codec_cache)
    paths = [s.path for s in reader.manifest.shards]
    first_rows = [next(iter(reader.decode_batch(b, paths[pos.shard]))) for pos, b in reader.iter_batches()]
    assert len(scope["got_lps"]) == len(first_rows) > 0
    for want, lps in zip(first_rows, scope["got_lps"], strict=True):
        np.testing.assert_allclose(lps, want.topk_logprobs, rtol=1e-6, atol=1e-5)
    if CacheReader(codec_cache).codec.name == "full":
        for want, ids, target in zip(first_rows, scope["got"], scope["got_tgt"], strict=True):
            np.testing.assert_array_equal(ids, want.topk_ids)
            np.testing.assert_allclose(target, want.target_logprobs, rtol=1e-6, atol=1e-5)


def test_compact_declared_lengths_larger_than_data_are_refused(codec_cache):
    reader = CacheReader(codec_cache)
    _, batch = next(reader.iter_batches())
    cols = {n: batch.column(n) for n in batch.schema.names}
    cols["answer_start"] = pa.array([1] * batch.num_rows, pa.int32())  # claims more answer rows than stored
    bad = pa.RecordBatch.from_arrays(list(cols.values()), schema=batch.schema)
    with pytest.raises(ShardFormatError, match="shard-y: row 0: column '(topk_ids_b0_g0|topk_max|topk_codes)' has"):
        reader.decode_batch(bad, "shard-y")


def _rewrite_as_v1(cache, tmp_path):
    """Turn a raw v2 cache into the v1 layout an older fusion-cache wrote (same columns, version 1)."""
    from fusion_cache.cache.fingerprint import chain_fingerprint
    from fusion_cache.cache.fingerprint import file_sha256

    reader = CacheReader(cache)
    m = json.loads((cache / "manifest.json").read_text())
    m["schema_version"] = 1
    m["config_fingerprint"] = _config_fp(m)  # version 1 is one of the fields it covers
    prov = {"schema_version": 1, "k": m["k"], "codec": {"name": "raw"}, "config_fingerprint": m["config_fingerprint"]}
    for i, info in enumerate(m["shards"]):
        rows = [r for b in reader._iter_shard(i) for r in reader.decode_batch(b, info["path"])]
        with ShardWriter(tmp_path / f"w{i}", prov) as w:
            w.write_rows(rows)
        (cache / info["path"]).write_bytes((tmp_path / f"w{i}" / w.shards[0]["path"]).read_bytes())
        info.update(sha256=file_sha256(cache / info["path"]), bytes=(cache / info["path"]).stat().st_size)
    m["schema_version"] = 1
    m["stats"]["payload_bytes"] = sum(info["bytes"] for info in m["shards"])
    m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])
    (cache / "manifest.json").write_text(json.dumps(m))


def test_v1_caches_are_still_read_and_v1_with_a_compact_codec_is_refused(cache_copy, tmp_path):
    _rewrite_as_v1(cache_copy, tmp_path)
    reader = CacheReader(cache_copy)
    assert reader.manifest.schema_version == 1 and reader.verify() == []
    assert len(list(reader.iter_rows())) == 4
    _edit(cache_copy, lambda m: m.update(codec={"name": "values", "value_bits": 8, "zstd_level": 3}))
    with pytest.raises(ShardFormatError, match="schema_version 1 has no codec 'values'"):
        load_manifest(cache_copy)


def test_missing_or_corrupt_id_order_is_refused():
    """Layouts 1-3: the order in the schema metadata."""
    rows = _rows(1, 8, [4, 3], 300, 4.0)
    codec = FullCodec(value_bits=6, id_bytes=2, zstd_level=3, layout=3)
    prov = {"schema_version": 3, "k": 8, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
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


def _layout4_batch(seed, lengths):
    rows = _rows(seed, 8, lengths, 300, 4.0)
    codec = make_codec("full", vocab_size=300)
    prov = {"schema_version": SCHEMA_VERSION, "k": 8, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
    schema, order = shard_schema_with_order(shard_schema(prov, codec), codec, rows[:1])
    return rows, rows_to_batch(rows, schema, codec, 8, order), codec, order


def test_layout4_rows_name_their_id_order_and_decode_only_through_it():
    rows, batch, codec, order = _layout4_batch(1, [4, 3])
    assert codec.layout == 4 and ID_ORDER_KEY not in (batch.schema.metadata or {})  # nothing in the schema metadata
    assert batch.column("topk_id_order").to_pylist() == [id_order_key(order)] * 2
    orders = _orders(codec.shard_entry(order), codec)
    for a, b in zip(rows, decode_record_batch(batch, codec, 8, "shard-4", id_orders=orders), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    other = np.arange(300)[::-1].copy()
    for orders in ({}, {id_order_key(other): other}):  # no order, or another shard's (an edited manifest's)
        with pytest.raises(ShardFormatError, match="shard-4: row 0: column 'topk_id_order' names id order '[0-9a-f]"):
            decode_record_batch(batch, codec, 8, "shard-4", id_orders=orders)


def test_layout4_rows_of_several_shards_decode_each_through_its_own_order(decoder):
    """A dataset's rows (shuffled, from several shards) in one batch: each row's ids through the order it names."""
    rows_a, batch_a, codec, order_a = _layout4_batch(1, [4, 3])
    rows_b, batch_b, _, order_b = _layout4_batch(2, [5, 2])
    assert id_order_key(order_a) != id_order_key(order_b)
    mixed = pa.Table.from_batches([batch_a, batch_b]).take([2, 0, 3, 1]).combine_chunks().to_batches()[0]
    orders = {**_orders(codec.shard_entry(order_a), codec), **_orders(codec.shard_entry(order_b), codec)}
    with use_decoder(decoder):
        got = decode_record_batch(mixed, codec, 8, "mixed", id_orders=orders)
    for a, b in zip([rows_b[0], rows_a[0], rows_b[1], rows_a[1]], got, strict=True):
        assert a.sample_id == b.sample_id
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)


def test_training_on_a_shape_cache_refuses_modes_that_need_log_probs(codec_cache, tiny_model_dir, tmp_path):
    from fusion_cache.train.config import TrainConfig
    from fusion_cache.train.trainer import run_train

    if codec_cache.name != "shape":
        pytest.skip("only a shape cache lacks true log-probs")
    cfg = TrainConfig.create(student=str(tiny_model_dir), shards=[str(codec_cache)], out=str(tmp_path), zscore=False)
    with pytest.raises(
        ConfigError, match="train --no-zscore needs the teacher's true log-probabilities, but a 'shape'"
    ):
        run_train(cfg, progress=False)


def _layout2_batch(layout=2):
    rows = _rows(3, 8, [5, 4], 300, 4.0)
    codec = FullCodec(value_bits=6, id_bytes=2, zstd_level=3, layout=layout)
    prov = {"schema_version": SCHEMA_VERSION, "k": 8, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
    schema, order = shard_schema_with_order(shard_schema(prov, codec), codec, rows[:1])
    return rows_to_batch(rows, schema, codec, 8, order), codec, schema


def _replace(batch, schema, name, flat, offsets=None):
    cols = {n: batch.column(n) for n in schema.names}
    offsets = cols[name].offsets if offsets is None else pa.array(offsets, pa.int32())
    cols[name] = pa.ListArray.from_arrays(offsets, pa.array(flat, cols[name].type.value_type))
    return pa.RecordBatch.from_arrays(list(cols.values()), schema=schema)


def test_corrupt_full_layout2_columns_are_named():
    batch, codec, schema = _layout2_batch()
    decode_record_batch(batch, codec, 8, "shard-b")  # intact
    buckets = np.asarray(batch.column("topk_id_buckets_g0").values).copy()
    buckets[1] = 250  # no such bucket for 2-byte ids
    with pytest.raises(ShardFormatError, match="shard-b: id symbol .*bucket 250 does not exist"):
        decode_record_batch(_replace(batch, schema, "topk_id_buckets_g0", buckets), codec, 8, "shard-b")
    off = batch.column("topk_id_offsets")
    short = np.asarray(off.values)[:-1]
    ends = np.asarray(off.offsets).copy()
    ends[-1] -= 1  # the last row's offset bytes lose one byte
    with pytest.raises(ShardFormatError, match="shard-b: row 1: column 'topk_id_offsets' has .* bytes, the id buckets"):
        decode_record_batch(_replace(batch, schema, "topk_id_offsets", short, ends), codec, 8, "shard-b")
    miss = batch.column("target_logprobs_missing")
    extra = np.concatenate([np.asarray(miss.values), np.zeros(1, np.float16)])
    ends = np.asarray(miss.offsets).copy()
    ends[-1] += 1  # one more stored target than answer tokens outside the top-K
    with pytest.raises(ShardFormatError, match="shard-b: row 1: column 'target_logprobs_missing' has"):
        decode_record_batch(_replace(batch, schema, "target_logprobs_missing", extra, ends), codec, 8, "shard-b")


def _rewrite_as_v2_full(cache, tmp_path, codec=None, version=2):
    """Turn a raw v3 cache into the v2 full layout-1 cache an older fusion-cache wrote (or into ``codec`` of
    schema ``version``)."""
    from fusion_cache.cache.fingerprint import chain_fingerprint
    from fusion_cache.cache.fingerprint import file_sha256

    reader = CacheReader(cache)
    m = json.loads((cache / "manifest.json").read_text())
    codec = codec or {"name": "full", "value_bits": 6, "id_bytes": 2, "zstd_level": 3}
    m.update(schema_version=version, codec=codec)
    m["config_fingerprint"] = _config_fp(m)  # the codec and version are fields it covers
    prov = {"schema_version": version, "k": m["k"], "codec": codec, "config_fingerprint": m["config_fingerprint"]}
    for i, info in enumerate(m["shards"]):
        rows = [r for b in reader._iter_shard(i) for r in reader.decode_batch(b, info["path"])]
        with ShardWriter(tmp_path / f"w{i}", prov) as w:
            w.write_rows(rows)
        (cache / info["path"]).write_bytes((tmp_path / f"w{i}" / w.shards[0]["path"]).read_bytes())
        info.update(sha256=file_sha256(cache / info["path"]), bytes=(cache / info["path"]).stat().st_size)
    m.update(schema_version=version, codec=codec)
    m["stats"]["payload_bytes"] = sum(info["bytes"] for info in m["shards"])
    m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])
    (cache / "manifest.json").write_text(json.dumps(m))


def test_v2_full_layout1_caches_are_still_read(cache_copy, built_cache, tmp_path, monkeypatch):
    _rewrite_as_v2_full(cache_copy, tmp_path)
    _check_doc_reader(cache_copy, monkeypatch)  # the reader in the docs reads layout 1 too
    reader = CacheReader(cache_copy)
    assert reader.manifest.schema_version == 2 and reader.codec.layout is None and reader.verify() == []
    assert "topk_ids_b0" in reader.columns
    for a, b in zip(CacheReader(built_cache).iter_rows(), reader.iter_rows(), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=0.05)
    _edit(cache_copy, lambda m: m["codec"].update(layout=2))  # version 2 has no layout 2
    with pytest.raises(ShardFormatError, match="unknown \\['layout'\\]"):
        load_manifest(cache_copy)


def test_v3_full_layout2_caches_are_still_read(cache_copy, built_cache, tmp_path, monkeypatch):
    layout2 = {"name": "full", "value_bits": 6, "id_bytes": 2, "zstd_level": 3, "layout": 2}
    _rewrite_as_v2_full(cache_copy, tmp_path, layout2, version=3)
    _check_doc_reader(cache_copy, monkeypatch)  # the reader in the docs reads layout 2 too
    reader = CacheReader(cache_copy)
    assert reader.codec.layout == 2 and reader.verify() == [] and "topk_id_offsets" in reader.columns
    for a, b in zip(CacheReader(built_cache).iter_rows(), reader.iter_rows(), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=0.05)
        np.testing.assert_allclose(b.target_logprobs, a.target_logprobs, atol=0.05)


def test_v3_full_layout3_caches_are_still_read(cache_copy, built_cache, tmp_path, monkeypatch):
    """The previous version's default: the id order in each shard's schema metadata, none in the manifest."""
    from datasets import load_dataset

    from fusion_cache.hf import decode_dataset
    from fusion_cache.hf import load_cache

    layout3 = {"name": "full", "value_bits": 6, "id_bytes": 2, "zstd_level": 16, "layout": 3}
    _rewrite_as_v2_full(cache_copy, tmp_path, layout3, version=3)
    m = json.loads((cache_copy / "manifest.json").read_text())
    assert m["schema_version"] == 3 and all("id_order" not in s for s in m["shards"])
    _check_doc_reader(cache_copy, monkeypatch)  # the reader in the docs reads layout 3 too
    reader = CacheReader(cache_copy)
    assert reader.codec.layout == 3 and reader.verify() == [] and "topk_id_order" not in reader.columns
    for a, b in zip(CacheReader(built_cache).iter_rows(), reader.iter_rows(), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, atol=0.05)
    assert len(load_cache(cache_copy)) == len(list(reader.iter_rows()))
    files = sorted(str(p) for p in cache_copy.glob("shard-*.arrow"))
    plain = load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ShardFormatError, match="schema_version 3 'full' cache keeps its id orders in the shards' sch"):
        decode_dataset(plain, cache_copy)  # datasets dropped them: load_cache reads it
    _edit(cache_copy, lambda m: m["shards"][0].update(id_order={"runs": [], "count": 0, "zstd_b64": ""}))
    with pytest.raises(ShardFormatError, match="has 'id_order', which codec .* does not have"):
        load_manifest(cache_copy)


def test_shape_rows_of_equal_values_decode_to_zeros_and_bad_flat_lists_are_refused():
    codec = make_codec("shape")
    for k in (2, 5):
        rows = _rows(5, k, [3, 4], 300, 0.0)  # scale 0: every row's values are equal
        rows[1].topk_logprobs[0] = np.linspace(0, -1, k)  # one row with a shape
        dec = _round_trip(rows, codec, k)
        np.testing.assert_array_equal(dec[0].topk_logprobs, 0.0)
        np.testing.assert_allclose(dec[1].topk_logprobs[0], np.linspace(0, -1, k), atol=0.5 / 255)
        np.testing.assert_array_equal(dec[1].topk_logprobs[1:], 0.0)
    prov = {"schema_version": SCHEMA_VERSION, "k": 5, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
    schema = shard_schema(prov, codec)
    batch = rows_to_batch(rows, schema, codec, 5)
    for flat in ([[0], [7]], [[1, 1], []], [[-1], []]):  # past n_answer, not ascending, negative
        cols = {n: batch.column(n) for n in schema.names}
        cols["topk_flat"] = pa.array(flat, pa.list_(pa.int32()))
        bad = pa.RecordBatch.from_arrays(list(cols.values()), schema=schema)
        with pytest.raises(ShardFormatError, match="shard-f: row [01]: column 'topk_flat' holds"):
            decode_record_batch(bad, codec, 5, "shard-f")


def test_corrupt_full_layout3_columns_are_named():
    batch, codec, schema = _layout2_batch(layout=3)
    decode_record_batch(batch, codec, 8, "shard-p")  # intact
    plane = batch.column("topk_ids_b1_g2")
    short = np.asarray(plane.values)[:-1]
    ends = np.asarray(plane.offsets).copy()
    ends[-1] -= 1  # the last row's high bytes of group 2 lose one byte
    with pytest.raises(ShardFormatError, match="shard-p: row 1: column 'topk_ids_b1_g2' has 15 values, expected 16"):
        decode_record_batch(_replace(batch, schema, "topk_ids_b1_g2", short, ends), codec, 8, "shard-p")
    miss = batch.column("target_logprobs_missing")
    extra = np.concatenate([np.asarray(miss.values), np.zeros(1, np.float16)])
    ends = np.asarray(miss.offsets).copy()
    ends[-1] += 1
    with pytest.raises(ShardFormatError, match="shard-p: row 1: column 'target_logprobs_missing' has"):
        decode_record_batch(_replace(batch, schema, "target_logprobs_missing", extra, ends), codec, 8, "shard-p")
    cols = {n: batch.column(n) for n in schema.names}
    cols.pop("topk_ids_b0_g3")
    with pytest.raises(ShardFormatError, match="shard-p: column 'topk_ids_b0_g3' is missing"):
        decode_record_batch(pa.RecordBatch.from_pydict(cols), codec, 8, "shard-p")


def test_a_layout4_manifest_entry_without_its_id_order_is_refused(synthetic_caches, tmp_path):
    cache = tmp_path / "full"
    shutil.copytree(synthetic_caches["full"], cache)
    assert CacheReader(cache).codec.layout == 4 and CacheReader(cache).verify() == []
    _edit(cache, lambda m: m["shards"][1].pop("id_order"))
    with pytest.raises(ShardFormatError, match="shards: shard-00001-of-00002.arrow lacks 'id_order', which codec"):
        load_manifest(cache)
