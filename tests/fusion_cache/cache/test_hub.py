"""push/pull against a local stand-in of the Hub (fusion_cache/cache/hub_standin.py) through the real huggingface_hub
client: one commit, resumable uploads, retries, verified pulls, hf:// reads through the shard cache, one-line errors.
Nothing here reaches the live Hub."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest

from fusion_cache.cache.hub import Backoff
from fusion_cache.cache.hub import cache_files
from fusion_cache.cache.hub import parse_repo
from fusion_cache.cache.hub import pull_cache
from fusion_cache.cache.hub import push_cache
from fusion_cache.cache.hub_standin import StandinHub
from fusion_cache.cache.hub_standin import point_huggingface_hub_at
from fusion_cache.cache.reader import CacheReader
from fusion_cache.errors import ConfigError
from fusion_cache.errors import RemoteError
from fusion_cache.errors import ShardFormatError

TOKEN = "writer-token"
FAST = Backoff(attempts=3, base=0.0)  # retries without waiting


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh stand-in Hub that this process's huggingface_hub talks to, with a writer token in HF_TOKEN and the
    shard cache in a temporary $FUSION_CACHE_HOME."""
    with StandinHub(tokens={TOKEN}) as server:
        point_huggingface_hub_at(server.url, monkeypatch.setattr)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("FUSION_CACHE_HOME", str(tmp_path / "fc-home"))
        yield server


def test_parse_repo():
    assert parse_repo("team/tiny") == ("team/tiny", None)
    assert parse_repo("team/tiny@v1") == ("team/tiny", "v1")
    assert parse_repo("hf://datasets/team/tiny@v1") == ("team/tiny", "v1")
    for bad in ("tiny", "a/b/c", "s3://bucket/x", "/x"):
        with pytest.raises(ConfigError, match="org/name"):
            parse_repo(bad)


def test_cache_files_put_the_shards_first_and_the_manifest_last(built_cache):
    files = cache_files(built_cache)
    assert files[0].startswith("shard-") and files[-1] == "manifest.json" and files[-2] == "README.md"
    assert "config.yaml" in files and not any(f.startswith(".") or f.endswith(".lock") for f in files)


def test_push_pull_verify_and_train_a_student_of_another_tokenizer(hub, built_cache, tmp_path):
    from fusion_cache.testing import make_tiny_model
    from fusion_cache.train.config import TrainConfig
    from fusion_cache.train.trainer import run_train

    pushed = push_cache(built_cache, "team/tiny", backoff=FAST)
    assert pushed.committed and pushed.files == len(cache_files(built_cache))
    assert hub.count("POST", "/commit/") == 1  # the whole cache in one commit
    held = hub.head("datasets/team/tiny")
    assert set(held) == set(cache_files(built_cache))
    assert all(held[p].lfs_oid for p in held if p.endswith(".arrow"))  # shards went through LFS

    pulled = pull_cache("team/tiny", tmp_path / "pulled", backoff=FAST)
    assert pulled.downloaded and pulled.manifest.fingerprint == CacheReader(built_cache).manifest.fingerprint
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == sorted(p.name for p in built_cache.iterdir())
    assert not (tmp_path / "pulled.incomplete").exists()
    assert CacheReader(tmp_path / "pulled").verify() == []

    other = make_tiny_model(tmp_path / "llama", arch="llama", vocab_size=1024)  # another tokenizer: ULD aligns
    cfg = TrainConfig.create(student=str(other), shards=[str(tmp_path / "pulled")], out=str(tmp_path / "run"),
                             batch_size=2, lr=3e-3, max_steps=2, save=False)  # fmt: skip
    res = run_train(cfg, progress=False)
    assert res.summary["steps"] == 2 and np.isfinite(res.summary["final"]["kd"])

    again = pull_cache("team/tiny", tmp_path / "pulled", backoff=FAST)  # the same cache: nothing downloaded
    assert not again.downloaded


def test_an_interrupted_push_resumes_and_an_unchanged_one_makes_no_commit(hub, built_cache):
    hub.fail[("PUT", "/__lfs/")] = 1  # a flaky upload: retried
    hub.fail[("POST", "/api/datasets/team/tiny/commit/")] = 3  # the commit never gets through: interrupted
    with pytest.raises(RemoteError, match="server answered 503: try again later"):
        push_cache(built_cache, "team/tiny", backoff=FAST)
    shards = len([f for f in cache_files(built_cache) if f.endswith(".arrow")])
    assert len(hub.lfs) == shards and hub.head("datasets/team/tiny") == {}  # uploaded, not committed
    puts = hub.count("PUT", "/__lfs/")
    pushed = push_cache(built_cache, "team/tiny", backoff=FAST)  # the rerun uploads nothing again
    assert pushed.committed and hub.count("PUT", "/__lfs/") == puts
    assert push_cache(built_cache, "team/tiny", backoff=FAST).committed is False


def test_push_to_a_branch_and_pull_that_revision(hub, built_cache, tmp_path):
    push_cache(built_cache, "team/tiny@v1", private=True, backoff=FAST)
    assert hub.repos["datasets/team/tiny"].private and hub.head("datasets/team/tiny", "main") == {}
    assert pull_cache("team/tiny", tmp_path / "v1", revision="v1", backoff=FAST).downloaded
    with pytest.raises(ShardFormatError, match="holds no manifest.json"):
        pull_cache("team/tiny", tmp_path / "main", backoff=FAST)


def test_pull_refuses_a_cache_that_does_not_verify_and_leaves_nothing(hub, built_cache, tmp_path):
    push_cache(built_cache, "team/tiny", backoff=FAST)
    oid = next(f.lfs_oid for p, f in sorted(hub.head("datasets/team/tiny").items()) if p.endswith(".arrow"))
    data = bytearray(hub.lfs[oid])
    data[200] ^= 0xFF  # the Hub now serves a damaged shard
    hub.lfs[oid] = bytes(data)
    with pytest.raises(ShardFormatError, match=r"team/tiny@main: refused: .*shard-00000-of-\d+.arrow: sha256"):
        pull_cache("team/tiny", tmp_path / "out", backoff=FAST)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_pull_refuses_a_non_empty_directory(hub, built_cache, tmp_path):
    push_cache(built_cache, "team/tiny", backoff=FAST)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        pull_cache("team/tiny", tmp_path / "out", backoff=FAST)
    assert pull_cache("team/tiny", tmp_path / "out", overwrite=True, backoff=FAST).downloaded
    assert not (tmp_path / "out" / "notes.txt").exists()


def test_hf_urls_read_through_the_shard_cache_once(hub, built_cache, tmp_path):
    push_cache(built_cache, "team/tiny", backoff=FAST)
    url = "hf://datasets/team/tiny"
    local = list(CacheReader(built_cache).iter_rows())
    for _ in range(2):  # two epochs (or runs): the shards are fetched by the first only
        remote = list(CacheReader(url).iter_rows())
        assert [r.sample_id for r in remote] == [r.sample_id for r in local]
        np.testing.assert_array_equal(remote[0].topk_ids, local[0].topk_ids)
    shards = CacheReader(built_cache).manifest.shards
    assert hub.count("GET", "/resolve/main/shard-") == len(shards)
    cached = sorted(p.name for p in (tmp_path / "fc-home" / "shards").iterdir())
    assert cached == sorted(s.sha256 for s in shards)
    assert CacheReader(url).verify() == []  # verify reads what the URL holds now


def test_remote_errors_are_one_line_that_says_what_to_do(hub, built_cache, tmp_path, monkeypatch):
    with pytest.raises(RemoteError, match="team/none@main: repository not found .*HF_TOKEN"):
        pull_cache("team/none", tmp_path / "a", backoff=FAST)
    push_cache(built_cache, "team/tiny", private=True, backoff=FAST)
    with pytest.raises(RemoteError, match="revision not found"):
        pull_cache("team/tiny@nope", tmp_path / "a", backoff=FAST)
    monkeypatch.setenv("HF_TOKEN", "a-reader")
    with pytest.raises(RemoteError, match="repository not found"):  # private: the Hub does not say it exists
        pull_cache("team/tiny", tmp_path / "a", backoff=FAST)
    with pytest.raises(RemoteError, match="no permission"):
        push_cache(built_cache, "team/tiny", backoff=FAST)
    with socket.socket() as s:  # a port nothing listens on: the network is down
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    point_huggingface_hub_at(closed, monkeypatch.setattr)
    with pytest.raises(RemoteError, match="cannot be reached .*fusion-cache pull"):
        pull_cache("team/tiny", tmp_path / "a", backoff=FAST)
    with pytest.raises(RemoteError, match="hf://datasets/team/tiny: cannot be reached"):
        CacheReader("hf://datasets/team/tiny")


def test_hf_urls_name_a_missing_repo_revision_or_offline_mode(hub, built_cache, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(RemoteError, match="^hf://datasets/team/none: repository not found"):
        CacheReader("hf://datasets/team/none")
    push_cache(built_cache, "team/tiny", backoff=FAST)
    with pytest.raises(RemoteError, match="^hf://datasets/team/tiny@v9: revision not found"):
        CacheReader("hf://datasets/team/tiny@v9")
    with pytest.raises(ShardFormatError, match="no manifest.json"):  # the repo is there, the folder holds no cache
        CacheReader("hf://datasets/team/tiny/elsewhere")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    point_huggingface_hub_at(hub.url, monkeypatch.setattr)  # a fresh filesystem, which reads the offline switch
    with pytest.raises(RemoteError, match="HF_HUB_OFFLINE is set"):
        CacheReader("hf://datasets/team/tiny")


def test_train_reads_an_hf_url(hub, built_cache, tiny_model_dir, tmp_path):
    from fusion_cache.train.config import TrainConfig
    from fusion_cache.train.trainer import run_train

    push_cache(built_cache, "team/tiny", backoff=FAST)
    cfg = TrainConfig.create(student=str(tiny_model_dir), shards=["hf://datasets/team/tiny"],
                             out=str(tmp_path / "run"), batch_size=2, max_steps=2, save=False)  # fmt: skip
    assert run_train(cfg, progress=False).summary["steps"] == 2
    assert hub.count("GET", "/resolve/main/shard-") == len(CacheReader(built_cache).manifest.shards)


def test_a_build_to_an_hf_url_is_one_commit(hub, tiny_model_dir, data_file, hf_engine):
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig

    url = "hf://datasets/team/built/caches/a"
    cfg = BuildConfig.create(teacher=str(tiny_model_dir), data=str(data_file), out=url, top_k=8, engine="hf",
                             shard_rows=2)  # fmt: skip
    m = run_build(cfg, engine=hf_engine, progress=False)
    assert hub.count("POST", "/commit/") == 1
    assert "caches/a/manifest.json" in hub.head("datasets/team/built")
    reader = CacheReader(url)
    assert reader.manifest.fingerprint == m.fingerprint and reader.verify() == []
    assert run_build(cfg, engine=hf_engine, progress=False).fingerprint == m.fingerprint  # the same build: a no-op
    assert hub.count("POST", "/commit/") == 1


def test_parse_hf_url():
    from fusion_cache.cache.hub import parse_hf_url

    assert parse_hf_url("hf://datasets/team/tiny") == ("team/tiny", None, "")
    assert parse_hf_url("hf://datasets/team/tiny@v1/caches/a") == ("team/tiny", "v1", "caches/a")
    with pytest.raises(ConfigError, match="dataset repo"):
        parse_hf_url("hf://team/tiny")


def test_a_cache_that_does_not_verify_is_never_pushed(hub, cache_copy):
    shard = sorted(cache_copy.glob("shard-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match=f"not pushed, it does not verify: {shard.name}: sha256"):
        push_cache(cache_copy, "team/tiny", backoff=FAST)
    assert hub.repos == {} and hub.requests == []


def test_without_huggingface_hub_push_pull_and_hf_urls_say_how_to_install_it(monkeypatch, tmp_path, built_cache):
    from fusion_cache.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # what `import huggingface_hub` meets when absent
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "hf", raising=False)  # fsspec imports it afresh
    with pytest.raises(MissingDependencyError, match=r"need huggingface_hub: pip install huggingface_hub$"):
        pull_cache("team/tiny", tmp_path / "x", backoff=FAST)
    with pytest.raises(MissingDependencyError, match=r"need huggingface_hub: pip install huggingface_hub$"):
        push_cache(built_cache, "team/tiny", backoff=FAST)
    with pytest.raises(MissingDependencyError, match=r"^hf://datasets/a/b: hf:// needs the huggingface_hub package"):
        CacheReader("hf://datasets/a/b")
