"""Caches from strangers (issue 21): every hostile case is refused with a one-line FusionCacheError by every reader.

Each named test damages a real or synthetic cache the way someone who knows the format would, then reseals it:
shard sizes, sha256, per-shard counts, stats and both fingerprints recomputed with the public formulas, and the
shards' own metadata rewritten, so only the reader's content checks (fusion_cache/cache/validate.py) can refuse
it. The property-based suite at the end does the same with random mutations of a small cache of every codec.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fusion_cache.cache import fast_decode
from fusion_cache.cache.fingerprint import chain_fingerprint
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.validate import TOPK_OK
from fusion_cache.cache.validate import DecodeLimits
from fusion_cache.cache.validate import _FlatBuffer
from fusion_cache.cache.validate import topk_rows_numpy
from fusion_cache.errors import FingerprintError
from fusion_cache.errors import FusionCacheError
from fusion_cache.errors import ShardFormatError
from fusion_cache.testing import column
from fusion_cache.testing import mutate_column
from fusion_cache.testing import mutate_manifest
from fusion_cache.testing import reseal_files
from fusion_cache.testing import rewrite
from fusion_cache.testing import set_value

# ------------------------------------------------------------------------------------------------ a hostile editor


def refused(cache: Path, match: str, **kw) -> str:
    """Both `verify` and a full read refuse ``cache`` with a one-line FusionCacheError matching ``match``."""
    try:
        problems = CacheReader(cache, **kw).verify()
    except FusionCacheError as e:
        problems = [str(e)]
    assert problems, "verify accepted the cache"
    assert any(__import__("re").search(match, p) for p in problems), problems
    with pytest.raises(FusionCacheError, match=match) as info:
        list(CacheReader(cache, **kw).iter_rows())
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def raw(cache_copy) -> Path:
    """A private copy of the session's real cache (raw codec, K=8, tiny Qwen2 teacher)."""
    return cache_copy


# ------------------------------------------------------------------------------------------------ named cases


def test_an_intact_resealed_cache_still_reads(raw):
    rewrite(raw)
    assert CacheReader(raw).verify() == []


@pytest.mark.parametrize("token", [10_000_000, -7])
def test_token_ids_outside_the_vocabulary(raw, token):
    rewrite(raw, batch=lambda b, s, i: set_value(b, "input_ids", 3, token) if (s, i) == (0, 0) else b)
    msg = refused(raw, r"input_ids: token id .* outside \[0, 4096\)")
    assert "record batch 0, row 0 (sample " in msg


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (float("nan"), "topk_logprobs: answer position 0: value nan is not finite"),
        (float("-inf"), "is not finite"),
        (0.5, "top-1 log-prob 0.5 is above 0"),
    ],
)
def test_teacher_log_probs_that_are_not_log_probs(raw, value, match):
    rewrite(raw, batch=lambda b, s, i: set_value(b, "topk_logprobs", 0, value) if (s, i) == (0, 0) else b)
    refused(raw, match)


def test_nan_target_and_unsorted_and_overfull_rows(raw, tmp_path):
    for name, damage, match in (
        ("target", lambda b: set_value(b, "target_logprobs", 0, float("nan")), "target_logprobs: nan"),
        ("sorted", lambda b: set_value(b, "topk_logprobs", 3, -1e-3), "not sorted descending"),
        (
            "sum",
            lambda b: set_value(set_value(b, "topk_logprobs", 0, -0.01), "topk_logprobs", 1, -0.02),
            "sum to .* more than 1",
        ),  # fmt: skip
        (
            "repeat",
            lambda b: set_value(b, "topk_ids", 1, int(b.column("topk_ids").values[0].as_py())),
            "topk_ids: answer position 0: id .* appears twice",
        ),  # fmt: skip
        ("vocab", lambda b: set_value(b, "topk_ids", 2, 5000), r"topk_ids: .*id 5000 outside \[0, 4096\)"),
    ):
        copy = tmp_path / name
        shutil.copytree(raw, copy)
        rewrite(copy, batch=lambda b, s, i, d=damage: d(b) if (s, i) == (0, 0) else b)
        refused(copy, match)


def test_byte_offsets_strings_sample_ids_row_order_and_lengths(raw, tmp_path):
    def bad_utf8(b):
        arr = pa.array([b"\xff\xfe" + c.encode() for c in b.column("conversation").to_pylist()], pa.binary())
        return column(b, "conversation", arr.view(pa.string()))

    def other_sample(b):
        ids = b.column("sample_id").to_pylist()
        return column(b, "sample_id", pa.array(["f" * 32] + ids[1:], pa.string()))

    def row_back(b):
        idx = b.column("row_index").to_numpy().copy()
        idx[-1] = idx[0]
        return column(b, "row_index", pa.array(idx, pa.int64()))

    cases = {
        "offsets": (lambda b: set_value(b, "token_byte_start", 2, 10**6), "token_byte_start/token_byte_end"),
        "past text": (
            lambda b: set_value(b, "token_byte_end", len(b.column("token_byte_end").values) - 1, 2**30),
            "past the rendered text",
        ),  # fmt: skip
        "utf8": (bad_utf8, "conversation: not valid UTF-8"),
        "sample id": (other_sample, "sample_id: 'fff.*' is not the hash of the row's conversation"),
        "row order": (row_back, "row_index: .* rows must be in input order, each once"),
    }
    for name, (damage, match) in cases.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(raw, copy)
        rewrite(copy, batch=lambda b, s, i, d=damage: d(b) if (s, i) == (0, 0) else b)
        refused(copy, match)
    copy = tmp_path / "max-length"
    shutil.copytree(raw, copy)
    rewrite(copy, manifest=lambda m: m.update(max_length=8))
    refused(copy, "more than max_length=8|every row has 1 to max_length=8")


@pytest.mark.parametrize(
    ("offsets", "data", "match"),
    [
        ([0, 3, 2**30], b"abcdef", "string offsets are out of order or point past its data"),  # found by the fuzz
        ([0, 4, 2], b"abcdef", "string offsets are out of order"),
        ([0, 2, 4], b"ab\xff\xfe", r"row 1: conversation: not valid UTF-8 \(invalid start byte at byte 0\)"),
    ],
)
def test_corrupt_string_columns_are_refused_without_decoding_them(offsets, data, match):
    """Offsets past the data would have Arrow build a 1 GiB string (a C++ length_error: the process aborts), so a
    column that fails Arrow's validation is read through its raw buffers."""
    from fusion_cache.cache.validate import Where
    from fusion_cache.cache.validate import check_strings

    raw_offsets = np.array([0, 1, len(data)], np.int32)  # valid when the array is made (pyarrow checks then) ...
    bad = pa.StringArray.from_buffers(2, pa.py_buffer(raw_offsets), pa.py_buffer(data))
    ok = pa.array(["a", "b"], pa.string())
    batch = pa.RecordBatch.from_arrays([ok, bad], names=["sample_id", "conversation"])
    raw_offsets[:] = offsets  # ... and damaged after, as a resealed byte flip in a shard damages them
    with pytest.raises(ShardFormatError, match=match):
        check_strings(batch, Where("shard-0.arrow", 0))


def test_manifest_fields_outside_the_chain_are_recomputed(raw, tmp_path):
    """stats.rows of 10^15 (a learning rate of ~1e-14) or 0, an edited tokenizer hash, a shard listed twice, and
    per-shard counts that disagree with the shards: each refused when the cache is opened or as it streams."""

    def edit(name, fn, match, error=ShardFormatError, reseal=True):
        copy = tmp_path / name
        shutil.copytree(raw, copy)
        path = copy / "manifest.json"
        m = json.loads(path.read_text())
        fn(m)
        if reseal:
            m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])
        path.write_text(json.dumps(m))
        with pytest.raises(error, match=match):
            CacheReader(copy)

    edit("rows-huge", lambda m: m["stats"].update(rows=10**15), r"stats.rows=1000000000000000, but the shards")
    edit("rows-zero", lambda m: m["stats"].update(rows=0), r"stats.rows=0, but the shards listed hold 4")
    edit("tokenizer", lambda m: m["teacher"].update(tokenizer_hash="e" * 64), "config_fingerprint .* does not match",
         FingerprintError)  # fmt: skip
    edit("vocab", lambda m: m["teacher"].update(vocab_size=10**9), "config_fingerprint .* does not match",
         FingerprintError)  # fmt: skip
    edit("twice", lambda m: m["shards"].append(dict(m["shards"][0])) or m["stats"].update(
        rows=m["stats"]["rows"] + m["shards"][0]["rows"]), "listed twice|shards listed hold")  # fmt: skip
    # counts that agree with each other but not with the shards: found while streaming
    copy = tmp_path / "counts"
    shutil.copytree(raw, copy)

    def shift(m):
        m["shards"][0]["answer_tokens"] += 1
        m["shards"][1]["answer_tokens"] -= 1

    rewrite(copy, manifest=shift, counts=False)
    refused(copy, r"answer tokens, the manifest says")


def test_a_shard_listed_twice_with_everything_resealed(raw, tmp_path):
    copy = tmp_path / "twice"
    shutil.copytree(raw, copy)
    rewrite(copy, manifest=lambda m: m["shards"].append(dict(m["shards"][0])))
    with pytest.raises(ShardFormatError, match="listed twice"):
        CacheReader(copy)
    # the same rows under another name: row_index goes back
    m = json.loads((raw / "manifest.json").read_text())
    first = m["shards"][0]["path"]
    shutil.copy(raw / first, raw / "shard-00009-of-00009.arrow")
    m["shards"].append(dict(m["shards"][0], path="shard-00009-of-00009.arrow"))
    (raw / "manifest.json").write_text(json.dumps(m))
    rewrite(raw)
    refused(raw, "row_index: .* rows must be in input order, each once")


def test_a_shard_that_is_a_symlink_out_of_the_cache_is_refused(raw, tmp_path):
    name = json.loads((raw / "manifest.json").read_text())["shards"][0]["path"]
    outside = tmp_path / "elsewhere.arrow"
    shutil.move(raw / name, outside)
    os.symlink(outside, raw / name)
    refused(raw, "is a symbolic link")


def _bomb(cache: Path, size: int) -> None:
    """Replace the first record batch's conversations by ``size`` bytes of one letter (zstd: a few hundred bytes)."""

    def fill(b, s, i):
        if (s, i) != (0, 0):
            return b
        convs = ["a" * size] + b.column("conversation").to_pylist()[1:]
        ids = [hashlib.blake2b(c.encode(), digest_size=16).hexdigest() for c in convs]  # consistent, but huge
        return column(column(b, "conversation", pa.array(convs, pa.string())), "sample_id", pa.array(ids, pa.string()))

    rewrite(cache, batch=fill)


@pytest.fixture
def sampled(synthetic_caches, tmp_path) -> Path:
    """A private copy of the synthetic sampled cache (N=8 draws per position, vocabulary 300)."""
    cache = tmp_path / "sampled"
    shutil.copytree(synthetic_caches["sampled"], cache)
    return cache


def test_an_intact_sampled_cache_reads(sampled):
    rewrite(sampled)
    assert CacheReader(sampled).verify() == []
    for row in CacheReader(sampled).iter_rows():
        assert (row.sample_counts.astype(int).sum(1) == 8).all()


@pytest.mark.parametrize(
    ("name", "index", "value", "match"),
    [
        ("sample_counts", 0, 0, r"sample_counts': the counts of answer position 0 do not add up to N=8"),
        ("sample_counts", 0, 9, r"do not add up to N=8 \(each must be in \[1, 8\]\)"),
        ("sample_ids_b1", 0, 200, r"topk_ids: answer position 0: an id is outside \[0, 300\)"),
        ("sample_logprobs", 0, 0.5, "topk_logprobs: answer position 0: a log-prob is not finite or is above 0"),
        ("sample_logprobs", 0, float("nan"), "a log-prob is not finite"),
        ("target_logprobs", 0, float("inf"), "target_logprobs: answer position 0: inf is not a finite log-prob"),
    ],
)
def test_sampled_columns_are_checked(sampled, name, index, value, match):
    """Counts bounded and summing to N, ids below the vocabulary, finite log-probs at most 0 (issue 18)."""
    rewrite(sampled, batch=lambda b, s, i: set_value(b, name, index, value) if (s, i) == (0, 0) else b)
    refused(sampled, match)


def test_decompression_bombs_are_refused_from_their_headers(synthetic_caches, tmp_path):
    cache = tmp_path / "bomb"
    shutil.copytree(synthetic_caches["full"], cache)
    _bomb(cache, 200 << 20)  # 200 MiB of text from a few hundred bytes
    assert (cache / json.loads((cache / "manifest.json").read_text())["shards"][0]["path"]).stat().st_size < 1 << 20
    msg = refused(cache, "would decode to 2097.*decompression bomb")
    assert "record batch 0" in msg
    # a small batch within the allowance is fine
    ok = tmp_path / "ok"
    shutil.copytree(synthetic_caches["full"], ok)
    _bomb(ok, 1 << 20)
    assert CacheReader(ok).verify() == []
    assert CacheReader(ok, limits=DecodeLimits(allowance=1 << 16)).verify()  # and refused under a tighter limit


def test_a_buffer_declaring_a_terabyte_is_refused_at_once(synthetic_caches, tmp_path, reseal):
    cache = tmp_path / "tib"
    shutil.copytree(synthetic_caches["full"], cache)
    m = json.loads((cache / "manifest.json").read_text())
    f = cache / m["shards"][0]["path"]
    data = bytearray(f.read_bytes())
    pos, n = 0, 0
    while n < 2:  # the schema message, then the first record batch
        assert struct.unpack_from("<I", data, pos)[0] == 0xFFFFFFFF
        meta_len = struct.unpack_from("<i", data, pos + 4)[0]
        fb = _FlatBuffer(bytes(data[pos + 8 : pos + 8 + meta_len]), "test")
        msg = fb.root()
        at = fb.field(msg, 3)  # Message.bodyLength; absent (0) in the schema message
        body_len = fb._unpack("<q", at) if at else 0
        if n == 1:
            buffers = fb.structs(fb.field(fb.deref(fb.field(msg, 2)), 2), 16)
            off, _ = max(buffers, key=lambda x: x[1])
            data[pos + 8 + meta_len + off : pos + 8 + meta_len + off + 8] = struct.pack("<q", 1 << 40)
        pos += 8 + meta_len + body_len
        n += 1
    f.write_bytes(bytes(data))
    reseal(cache)
    refused(cache, r"would decode to 1099511\d{6} bytes")  # 1 TiB plus the batch's other buffers


def test_bombs_stay_within_a_memory_bound(synthetic_caches, tmp_path):
    """`fusion-cache verify` of a 200 MiB bomb in a process limited to 2 GiB of address space: refused in one line,
    well below the limit (it never decompresses the batch)."""
    cache = tmp_path / "bomb"
    shutil.copytree(synthetic_caches["full"], cache)
    _bomb(cache, 200 << 20)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))\n"
        "from fusion_cache.cli.main import app\n"
        f"sys.argv = ['fusion-cache', 'verify', {str(cache)!r}]\n"
        "try:\n    app()\nexcept SystemExit as e:\n"
        "    hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM:')][0].split()[1]\n"
        "    print('maxrss_kb', hwm, file=sys.stderr)\n    raise\n"
    )
    # VmHWM: the peak of the child's own memory map, which exec starts afresh (ru_maxrss carries the peak of the
    # pytest process across fork + exec)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("BAD")]
    assert len(lines) == 1 and "decompression bomb" in lines[0] and "Traceback" not in r.stderr
    maxrss = int(r.stderr.rsplit("maxrss_kb", 1)[1].split()[0])
    assert maxrss < 600 << 10, maxrss  # KiB: the 200 MiB were never allocated


# ------------------------------------------------------------------------------------------------ compiled = numpy


@pytest.mark.skipif(fast_decode.kernels() is None, reason="no numba")
def test_compiled_and_numpy_top_k_checks_agree():
    from hypothesis import given
    from hypothesis import settings
    from hypothesis import strategies as st

    from fusion_cache.cache.validate import with_lse

    kern = fast_decode.kernels()["topk_rows"]

    @settings(max_examples=300, deadline=None)
    @given(st.integers(1, 9), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
    def check(k, n, exact, logprobs, seed):
        rng = np.random.default_rng(seed)
        values = -np.sort(rng.exponential(3, (n, k)), axis=1).astype(np.float32)
        values -= np.log(np.exp(values.astype(np.float64)).sum(1, keepdims=True)).astype(np.float32) * rng.integers(
            0, 2
        )
        ids = np.stack([rng.permutation(40)[:k] for _ in range(n)]).astype(np.int32)
        for _ in range(rng.integers(0, 3)):  # damage
            t, j = rng.integers(0, n), rng.integers(0, k)
            kind = rng.integers(0, 5)
            if kind == 0:
                values[t, j] = rng.choice([np.nan, np.inf, -np.inf, 0.7])
            elif kind == 1 and exact:
                values[t, j] = values[t, 0] + 1
            elif kind == 2:
                ids[t, j] = rng.choice([-1, 40, 10**6])
            elif kind == 3 and k > 1:
                ids[t, j] = ids[t, (j + 1) % k]
            elif kind == 4:
                values[t] = -1e-4
        if not exact:  # quantized codecs decode finite, sorted values between finite ends
            values[:, 1:-1] = np.where(np.isfinite(values[:, 1:-1]), values[:, 1:-1], -50.0)
            values[:, 1:-1] = np.minimum(np.sort(values[:, 1:-1], axis=1)[:, ::-1], values[:, :1])
        want = topk_rows_numpy(values, ids, 40, exact, logprobs, 1e-3, 0.05 if not exact else 0.0)
        tols = np.array([1e-3, 0.05 if not exact else 0.0, 1e-4])
        words = fast_decode.id_bitset(40)
        got = tuple(int(x) for x in kern(values, ids, True, 40, words, exact, logprobs, tols))
        if logprobs:  # the caller merges the vectorised logsumexp check (check_topk)
            got = with_lse(values, got, exact, 1e-3, 0.05 if not exact else 0.0)
        assert tuple(int(x) for x in got) == tuple(int(x) for x in want), (values, ids)
        assert not words.any()  # left zeroed for the next call
        assert (want[1] == TOPK_OK) == (want[0] == -1)

    check()


# ------------------------------------------------------------------------------------------------ property-based

FUZZ_ENV = "FUSION_CACHE_HOSTILE_FUZZ"


def test_random_mutations_are_accepted_sanely_or_refused_in_one_line(tmp_path):
    """The property-based suite, run in a subprocess whose data segment is limited to 3 GiB (so memory beyond a
    bound is a failure, not a swapped machine) with a wall-clock limit (a hang is a failure)."""
    env = {**os.environ, FUZZ_ENV: str(tmp_path)}
    limit = "import resource; resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))"
    cmd = [sys.executable, "-c", f"{limit}; import pytest, sys; sys.exit(pytest.main(sys.argv[1:]))", __file__,
           "-q", "-p", "no:cacheprovider", "-k", "fuzz_inner", "--import-mode=importlib"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[3])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@pytest.mark.skipif(FUZZ_ENV not in os.environ, reason="run by test_random_mutations_... in a limited subprocess")
@pytest.mark.parametrize("codec", ["raw", "full", "values", "shape", "sampled"])
def test_fuzz_inner(codec, synthetic_caches):
    from hypothesis import HealthCheck
    from hypothesis import given
    from hypothesis import settings
    from hypothesis import strategies as st

    base = synthetic_caches[codec]
    work = Path(os.environ[FUZZ_ENV]) / codec
    shard_names = sorted(p.name for p in base.glob("shard-*.arrow"))

    @settings(max_examples=60, deadline=10_000, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.sampled_from(["bytes", "truncate", "column", "manifest"]), st.integers(0, 2**32 - 1))
    def fuzz(kind, seed):
        rng = np.random.default_rng(seed)
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work)
        shard = work / shard_names[rng.integers(0, len(shard_names))]
        if kind == "bytes":
            data = bytearray(shard.read_bytes())
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(0, len(data))] = rng.integers(0, 256)
            shard.write_bytes(bytes(data))
            reseal_files(work)
        elif kind == "truncate":
            data = shard.read_bytes()
            shard.write_bytes(data[: rng.integers(0, len(data))] + bytes(rng.integers(0, 256, rng.integers(0, 64))))
            reseal_files(work)
        elif kind == "column":
            rewrite(work, batch=lambda b, s, i: mutate_column(b, rng), counts=bool(rng.integers(0, 2)))
        else:
            rewrite(work, manifest=lambda m: mutate_manifest(m, rng))
        _check_invariant(work)

    fuzz()


def _check_invariant(cache: Path) -> None:
    """Either every reader refuses the cache with a one-line FusionCacheError, or it is valid: verify finds
    nothing, a full read succeeds, and every decoded value is what the format promises."""
    try:
        reader = CacheReader(cache)
    except FusionCacheError as e:
        assert "\n" not in str(e)
        return
    problems = reader.verify()
    assert all("\n" not in p for p in problems)
    try:
        rows = list(CacheReader(cache).iter_rows())
    except FusionCacheError as e:
        assert problems, f"verify accepted what a read refuses: {e}"
        assert "\n" not in str(e)
        return
    assert not problems, f"a read accepted what verify refuses: {problems}"
    m = load_manifest(cache)
    vocab = m.teacher.vocab_size
    for r in rows:
        assert 0 <= r.input_ids.min() and r.input_ids.max() < vocab and len(r.input_ids) <= m.max_length
        if reader.codec.has_counts:  # a sampled block: the drawn slots first, padding (-1, -inf, count 0) after
            present = r.sample_counts > 0
            assert (r.sample_counts.astype(int).sum(1) == m.k).all() and present[:, 0].all()
            assert np.isfinite(r.topk_logprobs[present]).all() and (r.topk_logprobs[present] <= 1e-4).all()
            ids = r.topk_ids[present]
            assert ids.min() >= 0 and ids.max() < vocab and (r.topk_ids[~present] == -1).all()
            continue
        assert np.isfinite(r.topk_logprobs).all() and (np.diff(r.topk_logprobs, axis=1) <= 1e-6).all()
        if reader.codec.has_logprobs:
            assert (r.topk_logprobs[:, 0] <= 1e-4).all()
        if reader.codec.has_ids:
            assert r.topk_ids.min() >= 0 and r.topk_ids.max() < vocab
            assert all(len(set(row)) == len(row) for row in r.topk_ids.tolist())
        if reader.codec.has_targets:
            assert np.isfinite(r.target_logprobs).all()
    assert sum(len(r.input_ids) for r in rows) == m.stats.tokens and len(rows) == m.stats.rows
