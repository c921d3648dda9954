"""The Hub stand-in speaks what huggingface_hub expects: commits of regular and LFS files, listings, paths-info,
downloads (whole and ranged), branches, and the Hub's answers for private repos and missing rights."""

from __future__ import annotations

import pytest

from fusion_cache.cache.hub_standin import StandinHub
from fusion_cache.cache.hub_standin import git_blob_sha1
from fusion_cache.cache.hub_standin import point_huggingface_hub_at

TOKEN = "writer"


@pytest.fixture
def api(monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    with StandinHub(tokens={TOKEN}) as hub:
        point_huggingface_hub_at(hub.url, monkeypatch.setattr)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield hub, HfApi(token=TOKEN)


def test_commit_list_and_download(api, tmp_path):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub import HfApi
    from huggingface_hub import HfFileSystem
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.errors import RepositoryNotFoundError

    hub, client = api
    big = bytes(range(256)) * 100  # 25.6 kB: LFS
    client.create_repo("org/data", repo_type="dataset", private=True)
    ops = [CommitOperationAdd("a/big.bin", big), CommitOperationAdd("small.txt", b"hello")]
    client.create_commit("org/data", operations=ops, commit_message="two files", repo_type="dataset")
    held = hub.head("datasets/org/data")
    assert held["a/big.bin"].lfs_oid and hub.file_bytes(held["a/big.bin"]) == big
    assert held["small.txt"].oid == git_blob_sha1(b"hello") and held["small.txt"].lfs_oid is None
    assert sorted(client.list_repo_files("org/data", repo_type="dataset")) == ["a/big.bin", "small.txt"]
    [info] = client.get_paths_info("org/data", ["a/big.bin"], repo_type="dataset")
    assert info.size == len(big) and info.lfs.sha256 == held["a/big.bin"].lfs_oid
    path = hf_hub_download("org/data", "a/big.bin", repo_type="dataset", token=TOKEN, local_dir=tmp_path / "dl")
    assert open(path, "rb").read() == big
    fs = HfFileSystem(token=TOKEN)
    with fs.open("datasets/org/data/a/big.bin", "rb", block_size=1024) as f:  # ranged reads
        f.seek(5000)
        assert f.read(300) == big[5000:5300]
    client.create_branch("org/data", branch="v1", repo_type="dataset")
    assert (
        client.repo_info("org/data", repo_type="dataset", revision="v1").sha
        == client.repo_info("org/data", repo_type="dataset").sha
    )
    with pytest.raises(RepositoryNotFoundError):  # private: invisible without the token
        HfApi(token=False).repo_info("org/data", repo_type="dataset")
    hub.repos["datasets/org/data"].private = False
    with pytest.raises(HfHubHTTPError) as e:  # readable, not writable
        HfApi(token="reader").create_commit(
            "org/data", operations=[CommitOperationAdd("x.txt", b"x")], commit_message="no", repo_type="dataset"
        )
    assert e.value.response.status_code == 403


def test_failures_can_be_injected(api):
    from huggingface_hub.errors import HfHubHTTPError

    hub, client = api
    hub.fail[("POST", "/api/repos/create")] = 1
    with pytest.raises(HfHubHTTPError) as e:
        client.create_repo("org/flaky", repo_type="dataset")
    assert e.value.response.status_code == 503
    client.create_repo("org/flaky", repo_type="dataset")  # the next request passes
    assert "datasets/org/flaky" in hub.repos
