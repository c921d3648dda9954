"""`run_build --resume`: a build killed at any point continues to exactly the cache an uninterrupted build writes.

The crash windows of the writing protocol (cache/writer.py) are recreated on disk after an interrupted build: a
half-written temp part, a complete part without its record, a torn record, a corrupt part, a kill while parts are
renamed, a kill after the manifest was written. One test kills a real `fusion-cache build` process with SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fusion_cache.cache.reader import CacheReader
from fusion_cache.capture.build import run_build
from fusion_cache.capture.config import BuildConfig
from fusion_cache.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
N_ROWS = 24


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory, write_jsonl) -> Path:
    """24 short rows of varied lengths (one with an empty answer): 8 shards of 3 rows."""
    rows = [{"prompt": f"Q{i}: {i}+{3 * i}?", "response": f"{4 * i}. " + "word " * (i % 5 + 1)} for i in range(N_ROWS)]
    rows[5]["response"] = ""
    return write_jsonl(tmp_path_factory.mktemp("resume-data") / "rows.jsonl", rows)


def _cfg(model, data, out, **kw) -> BuildConfig:
    settings = dict(
        teacher=str(model), data=str(data), out=str(out), engine="hf", top_k=8, shard_rows=3, batch_tokens=64
    )
    return BuildConfig.create(**{**settings, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, many_rows, hf_engine) -> Path:
    """The uninterrupted build every resumed build must reproduce."""
    out = tmp_path_factory.mktemp("resume-ref") / "cache"
    run_build(_cfg(tiny_model_dir, many_rows, out), engine=hf_engine, progress=False)
    return out


class _DiesAfter:
    """The real engine, killed (an exception) at its ``n``-th call: leaves what a crash mid-build leaves."""

    def __init__(self, engine, n: int):
        self.engine, self.n, self.name, self.dtype = engine, n, engine.name, engine.dtype

    def capture(self, requests, k):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("killed")
        return self.engine.capture(requests, k)


@pytest.fixture(scope="module")
def interrupted_work(tmp_path_factory, tiny_model_dir, many_rows, hf_engine) -> Path:
    """The ``<out>.incomplete`` a build leaves when it dies at its 5th engine call (tests copy it)."""
    out = tmp_path_factory.mktemp("resume-killed") / "cache"
    with pytest.raises(KeyboardInterrupt):
        run_build(_cfg(tiny_model_dir, many_rows, out), engine=_DiesAfter(hf_engine, 4), progress=False)
    work = out.with_name("cache.incomplete")
    assert not out.exists() and len(list(work.glob("part-*.json"))) >= 2
    return work


@pytest.fixture
def interrupted(tmp_path, interrupted_work) -> tuple[Path, Path]:
    """(out, work): a private copy of the interrupted build (the settings it records hold no paths)."""
    work = tmp_path / "cache.incomplete"
    shutil.copytree(interrupted_work, work)
    return tmp_path / "cache", work


def assert_same_cache(a: Path, b: Path) -> None:
    """Same manifest fingerprint, same shards, and row by row the same content (nothing lost or duplicated)."""
    ra, rb = CacheReader(a), CacheReader(b)
    assert ra.verify() == [] and rb.verify() == []
    assert [(s.path, s.rows, s.sha256) for s in ra.manifest.shards] == [
        (s.path, s.rows, s.sha256) for s in rb.manifest.shards
    ]
    assert ra.manifest.fingerprint == rb.manifest.fingerprint
    assert ra.manifest.stats.model_dump(exclude={"wall_seconds"}) == rb.manifest.stats.model_dump(
        exclude={"wall_seconds"}
    )
    rows_a, rows_b = list(ra.iter_rows()), list(rb.iter_rows())
    assert [r.row_index for r in rows_a] == [r.row_index for r in rows_b]
    assert len({r.sample_id for r in rows_a}) == len(rows_a)
    for x, y in zip(rows_a, rows_b, strict=True):
        assert np.array_equal(x.topk_ids, y.topk_ids) and np.array_equal(x.topk_logprobs, y.topk_logprobs)
    assert not Path(str(b) + ".incomplete").exists()


def _torn_tmp(work: Path) -> None:  # SIGKILL while a part was being written
    (work / "part-00099.arrow.tmp").write_bytes(b"ARROW1\x00half")


def _no_record(work: Path) -> None:  # killed between the part's rename and its record
    max(work.glob("part-*.json")).unlink()


def _torn_record(work: Path) -> None:  # a record cut short (written without the atomic rename)
    max(work.glob("part-*.json")).write_text('{"index": ')


def _corrupt_part(work: Path) -> None:  # a bit flip in a complete part: it and every later part are rewritten
    path = max(work.glob("part-*.arrow"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _gap(work: Path) -> None:  # a record missing in the middle: the parts after the gap are not trusted
    sorted(work.glob("part-*.json"))[-2].unlink()


def _renaming(work: Path) -> None:  # killed while finalize renamed the parts to their shard names
    os.replace(work / "part-00000.arrow", work / "shard-00000-of-00008.arrow")


@pytest.mark.parametrize("damage", [None, _torn_tmp, _no_record, _torn_record, _corrupt_part, _gap, _renaming])
def test_resume_after_a_crash_writes_the_uninterrupted_cache(
    interrupted, tiny_model_dir, many_rows, hf_engine, reference, damage
):
    out, work = interrupted
    if damage is not None:
        damage(work)
    run_build(_cfg(tiny_model_dir, many_rows, out, resume=True), engine=hf_engine, progress=False)
    assert_same_cache(reference, out)


def test_resume_captures_only_the_rows_not_in_complete_parts(interrupted, tiny_model_dir, many_rows, hf_engine):
    out, work = interrupted
    kept = sum(json.loads(p.read_text())["rows"] for p in work.glob("part-*.json"))
    seen = []

    class Recording(_DiesAfter):
        def capture(self, requests, k):
            seen.extend(requests)
            return self.engine.capture(requests, k)

    m = run_build(_cfg(tiny_model_dir, many_rows, out, resume=True), engine=Recording(hf_engine, 0), progress=False)
    # every row after the complete parts once; at most one engine batch before them again (it straddles the cut)
    assert kept >= 6 and m.stats.rows - kept <= len(seen) < m.stats.rows


def test_resume_after_the_manifest_was_written(interrupted, tiny_model_dir, many_rows, hf_engine, reference):
    """Killed after the manifest went into <out>.incomplete but before the rename: resume publishes it as is."""
    out, work = interrupted
    state = (work / "build-state.json").read_bytes()
    shutil.rmtree(work)
    shutil.copytree(reference, work)
    (work / "build-state.json").write_bytes(state)

    class Unused:
        name, dtype = hf_engine.name, hf_engine.dtype

        def capture(self, *a):
            raise AssertionError("nothing is left to capture")

    run_build(_cfg(tiny_model_dir, many_rows, out, resume=True), engine=Unused(), progress=False)
    assert_same_cache(reference, out)
    # killed after the state file was deleted too (just before the rename): still published as is
    shutil.copytree(reference, work)
    shutil.rmtree(out)
    run_build(_cfg(tiny_model_dir, many_rows, out, resume=True), engine=Unused(), progress=False)
    assert_same_cache(reference, out)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"top_k": 4}, "k: 8 then, 4 now"),
        ({"shard_rows": 5}, "shard_rows: 3 then, 5 now"),
        ({"max_length": 64}, "max_length: 2048 then, 64 now"),
        ({"codec": "full"}, "codec.name: 'raw' then, 'full'"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_field(
    interrupted, tiny_model_dir, many_rows, hf_engine, change, field
):
    out, work = interrupted
    before = sorted(p.name for p in work.iterdir())
    with pytest.raises(ConfigError, match=f"--resume: .* different settings .*{field}"):
        run_build(_cfg(tiny_model_dir, many_rows, out, resume=True, **change), engine=hf_engine, progress=False)
    assert sorted(p.name for p in work.iterdir()) == before  # nothing was touched


def test_resume_with_other_data_is_refused(interrupted, tmp_path, tiny_model_dir, hf_engine, write_jsonl):
    out, _ = interrupted
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "response": "r"}] * N_ROWS)
    with pytest.raises(ConfigError, match="dataset_hash: '[0-9a-f]{64}' then, '[0-9a-f]{64}' now"):
        run_build(_cfg(tiny_model_dir, other, out, resume=True), engine=hf_engine, progress=False)


def test_interrupted_build_needs_resume_or_overwrite(interrupted, tiny_model_dir, many_rows, hf_engine, reference):
    out, work = interrupted
    with pytest.raises(ConfigError, match=r"interrupted build with \d+ complete shard\(s\); pass --resume"):
        run_build(_cfg(tiny_model_dir, many_rows, out), engine=hf_engine, progress=False)
    assert any(work.glob("part-*.json"))
    run_build(_cfg(tiny_model_dir, many_rows, out, overwrite=True), engine=hf_engine, progress=False)
    assert_same_cache(reference, out)


def test_resume_without_an_interrupted_build_just_builds(tmp_path, tiny_model_dir, many_rows, hf_engine, reference):
    out = tmp_path / "cache"
    run_build(_cfg(tiny_model_dir, many_rows, out, resume=True), engine=hf_engine, progress=False)
    assert_same_cache(reference, out)


def test_resume_of_a_build_to_an_fsspec_url(tmp_path, monkeypatch, tiny_model_dir, many_rows, hf_engine, reference):
    """A build to a URL is staged locally in a directory fixed by the URL, so --resume finds it there."""
    import fsspec

    monkeypatch.setenv("FUSION_CACHE_HOME", str(tmp_path / "home"))
    url = "memory://fusion-cache-test-resume/cache"
    try:
        with pytest.raises(KeyboardInterrupt):
            run_build(_cfg(tiny_model_dir, many_rows, url), engine=_DiesAfter(hf_engine, 4), progress=False)
        with pytest.raises(ConfigError, match="pass --resume to continue it"):
            run_build(_cfg(tiny_model_dir, many_rows, url), engine=hf_engine, progress=False)
        m = run_build(_cfg(tiny_model_dir, many_rows, url, resume=True), engine=hf_engine, progress=False)
        assert m.fingerprint == CacheReader(reference).manifest.fingerprint
        assert CacheReader(url).verify() == []
    finally:
        fsspec.filesystem("memory").rm("/fusion-cache-test-resume", recursive=True)


@pytest.mark.slow
@pytest.mark.vllm
def test_resumed_vllm_build_has_the_uninterrupted_fingerprint(tmp_path, tiny_model_dir, many_rows, vllm_engine):
    ref = run_build(_cfg(tiny_model_dir, many_rows, tmp_path / "ref", engine="vllm"), engine=vllm_engine)
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        run_build(_cfg(tiny_model_dir, many_rows, out, engine="vllm"), engine=_DiesAfter(vllm_engine, 4))
    run_build(_cfg(tiny_model_dir, many_rows, out, engine="vllm", resume=True), engine=vllm_engine, progress=False)
    assert CacheReader(out).manifest.fingerprint == ref.fingerprint
    assert_same_cache(tmp_path / "ref", out)


@pytest.mark.slow
def test_sigkilled_build_process_resumes_to_the_same_cache(tmp_path, tiny_model_dir, many_rows, reference):
    """A real `fusion-cache build` process is killed with SIGKILL once it has written some shards; `--resume`
    then finishes the cache with the same rows and fingerprint as an uninterrupted build."""
    out = tmp_path / "cache"
    work = tmp_path / "cache.incomplete"
    args = [sys.executable, "-m", "fusion_cache", "build", "--teacher", tiny_model_dir, "--data", many_rows]
    args += ["--out", out, "--engine", "hf", "--dtype", "float32", "--top-k", 8, "--shard-rows", 3]
    args += ["--batch-tokens", 64]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([str(a) for a in args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(list(work.glob("part-*.json"))) < 3:  # mid-way: some shards complete, more to come
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the build wrote no shard in 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the build finished before it could be killed"
    resumed = subprocess.run(
        [str(a) for a in [*args, "--resume"]], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stderr and "fingerprint" in resumed.stdout
    assert_same_cache(reference, out)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _SampledDiesAfter(_DiesAfter):
    def capture(self, requests, k, samples=None):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("killed")
        return self.engine.capture(requests, k, samples)


def test_a_resumed_sampled_build_draws_what_an_uninterrupted_one_draws(tmp_path, tiny_model_dir, many_rows, hf_engine):
    sampled = {"top_k": None, "sampling": "rs", "samples": 5, "seed": 11}
    top_k_only = ("top_k", "codec")  # a sampled build's K and codec follow from --sampling rs
    settings = {k: v for k, v in _cfg(tiny_model_dir, many_rows, tmp_path).model_dump().items() if k not in top_k_only}
    ref, out = tmp_path / "ref", tmp_path / "cache"
    run_build(BuildConfig.create(**{**settings, **sampled, "out": str(ref)}), engine=hf_engine, progress=False)
    cfg = BuildConfig.create(**{**settings, **sampled, "out": str(out)})
    with pytest.raises(KeyboardInterrupt):
        run_build(cfg, engine=_SampledDiesAfter(hf_engine, 4), progress=False)
    assert len(list(out.with_name("cache.incomplete").glob("part-*.json"))) >= 2
    resumed = BuildConfig.create(**{**cfg.model_dump(), "resume": True})
    run_build(resumed, engine=hf_engine, progress=False)
    assert_same_cache(ref, out)
    for x, y in zip(CacheReader(ref).iter_rows(), CacheReader(out).iter_rows(), strict=True):
        assert np.array_equal(x.sample_counts, y.sample_counts)
