"""Publish a cache as a Hugging Face Hub dataset repo and fetch one back: `push_cache` and `pull_cache`.

fusion-cache push ./cache/smollm2 team/smollm2-topk [--revision v1] [--private]
fusion-cache pull team/smollm2-topk ./caches/smollm2 [--revision v1]

Push makes ONE commit holding the whole cache: shards first, then the other files, the dataset card (README.md) and
manifest.json last, so the repo at any commit is a whole cache or none. The large files are uploaded before the commit
(`HfApi.preupload_lfs_files`) by content address (Git LFS, or Xet where hf_xet is installed): a rerun after an
interruption hashes the files again but uploads only what the Hub does not hold yet, and a cache already there
makes no commit. `upload_large_folder` resumes too, but commits in pieces, so a reader could meet half a cache.

Pull pins the revision to its commit, downloads into ``<dir>.incomplete/`` (a rerun skips the files already there),
then checks the manifest's fingerprints and every shard's size, sha256 and content (`CacheReader.verify`); only a
cache that verifies is renamed to ``<dir>``, anything else is deleted and refused.

Every call that may meet a flaky network is retried with exponential backoff (`with_retries`); every error a user can
meet (offline, huggingface_hub missing, repository or revision not found, no permission) is one line
(`fusion_cache.cache.storage.remote_error`). huggingface_hub is imported only here, lazily.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fusion_cache.cache.manifest import MANIFEST_NAME
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.storage import is_transient
from fusion_cache.cache.storage import remote_error
from fusion_cache.errors import ConfigError
from fusion_cache.errors import FingerprintError
from fusion_cache.errors import FusionCacheError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.errors import ShardFormatError

log = logging.getLogger(__name__)
T = TypeVar("T")

REPO_TYPE = "dataset"  # a cache is data: the Hub's dataset viewer, card and `datasets` tooling apply
CARD_NAME = "README.md"
# files a cache directory may hold that are not part of it: resume records, locks, the download tool's metadata
SKIPPED_SUFFIXES = (".tmp", ".lock", ".incomplete")


@dataclass(frozen=True)
class Backoff:
    """Retries of a transient failure: ``attempts`` tries, waiting ``base`` * 2**i seconds (at most ``cap``, with
    jitter) between them."""

    attempts: int = 5
    base: float = 2.0
    cap: float = 60.0


def _hub():
    """The huggingface_hub module, or a MissingDependencyError that says how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise MissingDependencyError(
            "push/pull and hf:// caches need huggingface_hub: pip install huggingface_hub"
        ) from None
    return huggingface_hub


def parse_repo(repo: str) -> tuple[str, str | None]:
    """``org/name``, ``org/name@rev`` or ``hf://datasets/org/name[@rev]`` as (repo id, revision or None).

    Raises:
        ConfigError: anything else, naming the value.
    """
    text = repo.removeprefix("hf://").removeprefix("datasets/").strip("/")
    name, _, revision = text.partition("@")
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or "://" in repo.removeprefix("hf://"):
        raise ConfigError(f"repo {repo!r}: give a Hub dataset repo as org/name (or org/name@revision)")
    return name, revision or None


def parse_hf_url(url: str) -> tuple[str, str | None, str]:
    """``hf://datasets/org/name[@rev][/folder]`` as (repo id, revision or None, folder in the repo).

    Raises:
        ConfigError: not an hf:// URL of a dataset repo.
    """
    rest = url.removeprefix("hf://")
    if not url.startswith("hf://datasets/") or len(rest.split("/")) < 3:
        raise ConfigError(f"{url}: a cache on the Hub is a dataset repo: hf://datasets/org/name[@revision][/folder]")
    _, org, name, *folder = rest.split("/")
    name, _, revision = name.partition("@")
    return f"{org}/{name}", revision or None, "/".join(folder)


def with_retries(call: Callable[[], T], what: str, backoff: Backoff = Backoff(), sleep=time.sleep) -> T:
    """``call()``, retried with exponential backoff while it fails transiently (`is_transient`); any error left is
    one `fusion_cache.errors` line naming ``what`` (`remote_error`).

    Args:
        call: the operation; it must be safe to repeat (every Hub call here is).
        what: the repository or URL, for messages.
        backoff: how often and how long to retry.
        sleep: the wait (tests pass a no-op).
    """
    for attempt in range(backoff.attempts):
        try:
            return call()
        except FusionCacheError:
            raise
        except Exception as e:  # noqa: BLE001 (a transient error is retried, the others translated or re-raised)
            if attempt + 1 < backoff.attempts and is_transient(e):
                wait = min(backoff.cap, backoff.base * 2**attempt) * (0.5 + random.random() / 2)
                log.warning("%s: %s (%s); retrying in %.1f s", what, type(e).__name__, e, wait)
                sleep(wait)
                continue
            mapped = remote_error(e, what)
            if mapped is None:
                raise
            raise mapped from e
    raise AssertionError("unreachable: the last attempt returns or raises")


def cache_files(directory: Path) -> list[str]:
    """The files of a cache directory in upload order: the shards the manifest lists, every other file (part
    manifests, config.yaml, signatures.json), the card, and manifest.json last.

    Raises:
        ShardFormatError: the directory is not a cache, or a listed shard is missing.
    """
    manifest = load_manifest(directory)
    shards = [s.path for s in manifest.shards]
    others = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if not path.is_file() or any(p.startswith(".") or p.endswith(SKIPPED_SUFFIXES) for p in Path(name).parts):
            continue
        if name not in shards and name not in (MANIFEST_NAME, CARD_NAME):
            others.append(name)
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
        raise ShardFormatError(f"{directory}: shard {missing[0]} listed in the manifest is missing")
    card = [CARD_NAME] if (directory / CARD_NAME).is_file() else []
    return shards + others + card + [MANIFEST_NAME]


@dataclass(frozen=True)
class PushResult:
    repo: str
    revision: str
    commit: str
    url: str
    files: int
    committed: bool  # False: the revision held this cache already (no commit made)


def push_cache(
    cache: str | Path,
    repo: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    message: str | None = None,
    path_in_repo: str = "",
    backoff: Backoff = Backoff(),
    progress: bool = False,
) -> PushResult:
    """Publish the local cache ``cache`` to the Hub dataset repo ``repo`` in one commit (see the module docstring).

    The cache is verified first (`CacheReader.verify`): a damaged cache is never published.

    Args:
        cache: a local cache directory.
        repo: ``org/name`` (created if missing; ``org/name@rev`` names the branch).
        revision: the branch to commit to, created from main if missing; default main.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token with write access; default HF_TOKEN or the stored login.
        message: the commit message; default names the teacher, rows and fingerprint.
        path_in_repo: a folder of the repo to put the cache in (default: its root).
        backoff: retries of transient failures.
        progress: show a progress bar while the cache is verified (huggingface_hub shows the uploads').

    Raises:
        ShardFormatError: the cache does not verify.
        RemoteError, MissingDependencyError, ConfigError: see the module docstring.
    """
    from fusion_cache.cache.reader import CacheReader

    repo_id, at = parse_repo(repo)
    revision = revision or at or "main"
    directory = Path(cache)
    if not directory.is_dir():
        raise ConfigError(f"push: {cache} is not a local cache directory (pull a remote cache first)")
    files = cache_files(directory)
    problems = CacheReader(directory).verify(progress=progress)
    if problems:
        raise ShardFormatError(f"{cache}: not pushed, it does not verify: {problems[0]}")
    manifest = load_manifest(directory)
    hub = _hub()
    api = hub.HfApi(token=token)
    where = f"{repo_id}@{revision}"
    with_retries(lambda: api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True), where, backoff)
    if revision != "main":
        with_retries(lambda: api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True), where,
                     backoff)  # fmt: skip
    prefix = path_in_repo.strip("/") + "/" if path_in_repo.strip("/") else ""
    ops = [hub.CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=str(directory / name)) for name in files]
    # uploads first, retried on their own: an operation uploaded by a failed try is marked and not sent again, and
    # a new process's LFS batch request learns which objects the Hub holds already and skips them
    with_retries(lambda: api.preupload_lfs_files(repo_id, additions=ops, repo_type=REPO_TYPE, revision=revision),
                 where, backoff)  # fmt: skip
    before = with_retries(lambda: api.repo_info(repo_id, repo_type=REPO_TYPE, revision=revision).sha, where, backoff)
    text = message or (
        f"fusion-cache: {manifest.teacher.name} K={manifest.k} {manifest.codec.get('name')}, {manifest.stats.rows} "
        f"rows, fingerprint {manifest.fingerprint[:16]}"
    )
    info = with_retries(lambda: api.create_commit(repo_id, operations=ops, commit_message=text, repo_type=REPO_TYPE,
                                                  revision=revision), where, backoff)  # fmt: skip
    return PushResult(repo=repo_id, revision=revision, commit=info.oid, url=f"{api.endpoint}/datasets/{repo_id}",
                      files=len(files), committed=info.oid != before)  # fmt: skip


@dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    directory: Path
    commit: str
    downloaded: bool  # False: the directory held this cache already


def pull_cache(
    repo: str,
    out: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    backoff: Backoff = Backoff(),
) -> PullResult:
    """Download the cache in Hub dataset repo ``repo`` to the local directory ``out`` and verify it (see the module
    docstring).

    Args:
        repo: ``org/name`` or ``org/name@rev``.
        out: the local directory to create; one that holds this very cache is left as it is.
        revision: a branch, tag or commit; default main.
        token: a Hub token (private repos); default HF_TOKEN or the stored login.
        overwrite: replace an ``out`` that holds something else.
        backoff: retries of transient failures.

    Raises:
        ShardFormatError, FingerprintError: the repo's cache does not verify (nothing is left at ``out``).
        ConfigError: ``out`` holds something else and not ``overwrite``.
        RemoteError, MissingDependencyError: see the module docstring.
    """
    from fusion_cache.cache.reader import CacheReader

    repo_id, at = parse_repo(repo)
    revision = revision or at or "main"
    where = f"{repo_id}@{revision}"
    out = Path(out)
    hub = _hub()
    api = hub.HfApi(token=token)
    info = with_retries(lambda: api.repo_info(repo_id, repo_type=REPO_TYPE, revision=revision, files_metadata=True),
                        where, backoff)  # fmt: skip
    remote = {s.rfilename: s for s in info.siblings or []}
    if MANIFEST_NAME not in remote:
        raise ShardFormatError(f"{where}: holds no {MANIFEST_NAME}; it is not a fusion-cache cache")
    if not overwrite and _holds(out, remote[MANIFEST_NAME]):
        return PullResult(load_manifest(out), out, info.sha, downloaded=False)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"pull: {out} is not empty and holds another cache or other files; choose another "
                          "directory or pass --overwrite")  # fmt: skip
    work = out.with_name(out.name + ".incomplete")
    with_retries(lambda: hub.snapshot_download(repo_id, repo_type=REPO_TYPE, revision=info.sha, local_dir=work,
                                               token=token), where, backoff)  # fmt: skip
    shutil.rmtree(work / ".cache", ignore_errors=True)  # huggingface_hub's download records, not part of the cache
    try:
        manifest = load_manifest(work)  # its fingerprints: config against settings, chain against the shards
        problems = CacheReader(work).verify()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ShardFormatError(f"the cache does not verify: {problems[0]}{more}")
    except (ShardFormatError, FingerprintError) as e:
        shutil.rmtree(work, ignore_errors=True)  # nothing that looks like a cache stays behind
        raise type(e)(f"{where}: refused: {e}") from None
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return PullResult(manifest, out, info.sha, downloaded=True)


def _holds(out: Path, manifest) -> bool:
    """Whether the local ``out`` holds the manifest that the Hub lists as ``manifest`` (a `RepoSibling`): the same
    git blob id (or LFS sha256), hence the same fingerprint and shards; ``out`` was verified when it was pulled."""
    import hashlib

    path = out / MANIFEST_NAME
    if not path.is_file():
        return False
    data = path.read_bytes()
    if manifest.lfs is not None:
        return hashlib.sha256(data).hexdigest() == manifest.lfs.sha256
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == manifest.blob_id
