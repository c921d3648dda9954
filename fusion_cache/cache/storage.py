"""Where caches live: local paths or any fsspec URL (file://, memory://; s3://, gs://, hf:// with their backend).

Only three operations are needed: read a small file whole, stream a shard, and list/size/checksum it. Local paths
keep the fast path (memory-mapped shards); everything else goes through fsspec file objects.

Remote shards are read through a local shard cache, ``$FUSION_CACHE_HOME/shards/<sha256>`` (default
``~/.cache/fusion-cache``): each shard is downloaded and hashed once, its sha256 checked against the manifest before it
is stored under that name, and every later read (the next epoch, the next run, another cache holding the same shard)
memory-maps the local copy. Every error of a remote filesystem (offline, a missing fsspec backend, a repository or
revision not found, no permission) becomes one `fusion_cache.errors` exception whose message says what to do
(`remote_errors`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa

from fusion_cache.errors import ConfigError
from fusion_cache.errors import FusionCacheError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.errors import RemoteError
from fusion_cache.errors import ShardFormatError

# the fsspec backend (a pip package) of each remote URL scheme, for the install hint of a missing one
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp"}  # fmt: skip
# exception class names (anywhere in the MRO) of a network that cannot be reached: httpx (huggingface_hub), aiohttp
# (http, gcsfs), botocore (s3fs); matched by name so that none of those packages is imported here
NETWORK_ERRORS = frozenset({"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
                            "RemoteProtocolError", "ClientConnectorError", "ServerDisconnectedError",
                            "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"})  # fmt: skip
# a host name that does not resolve (no network, or a typo in HF_ENDPOINT): retrying only delays the error
PERMANENT_NETWORK_ERRORS = ("Name or service not known", "nodename nor servname provided")
OFFLINE_HINT = (
    "check the network (and HF_ENDPOINT), or work from a local copy: `fusion-cache pull REPO DIR` while online"
)
TOKEN_HINT = "set HF_TOKEN (or run `hf auth login`) with a token that can read it"
SHARD_CACHE_ENV = "FUSION_CACHE_HOME"  # the same variable as fusion_cache.models.convert.fusion_cache_home


def shard_cache_dir() -> Path:
    """``$FUSION_CACHE_HOME/shards`` (default ``~/.cache/fusion-cache/shards``): verified copies of remote shards, each
    named by its sha256."""
    return Path(os.environ.get(SHARD_CACHE_ENV) or "~/.cache/fusion-cache").expanduser() / "shards"


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _is_network(e: BaseException) -> bool:
    """Whether ``e`` says the network or the server could not be reached (no HTTP answer)."""
    if "OfflineModeIsEnabled" in _names(e):
        return False
    return bool(NETWORK_ERRORS & _names(e)) or isinstance(e, (ConnectionError, TimeoutError, socket.gaierror))


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` may pass on a retry: the network (not a host name that does not resolve), a timeout, HTTP
    408/429 or a 5xx answer."""
    status = _status(e)
    if status is not None:
        return status in (408, 429) or status >= 500
    return _is_network(e) and not any(w in str(e) for w in PERMANENT_NETWORK_ERRORS)


def remote_error(e: BaseException, where: str) -> FusionCacheError | None:
    """The `fusion_cache.errors` exception (one line saying what to do) for an error ``e`` of a remote filesystem or
    of the Hub at ``where`` (a URL or a repository id); None when ``e`` is not a remote error.

    Args:
        e: what fsspec, huggingface_hub, s3fs, ... raised.
        where: the URL or repository, named in the message.
    """
    if isinstance(e, FusionCacheError):
        return e
    names, status = _names(e), _status(e)
    if isinstance(e, ImportError):
        scheme = where.split("://", 1)[0] if "://" in where else "hf"
        package = BACKENDS.get(scheme) or (e.name if isinstance(getattr(e, "name", None), str) else None)
        if package is None:
            return MissingDependencyError(f"{where}: {_first_line(e)}")
        return MissingDependencyError(f"{where}: {scheme}:// needs the {package} package: pip install {package}")
    if "OfflineModeIsEnabled" in names or "LocalEntryNotFoundError" in names:
        return RemoteError(f"{where}: HF_HUB_OFFLINE is set and no local copy holds it: unset HF_HUB_OFFLINE, or "
                           "`fusion-cache pull` it while online and use that directory")  # fmt: skip
    if "HFValidationError" in names:
        return ConfigError(f"{where}: not a valid Hub repository id ({_first_line(e)}); write org/name")
    if "RevisionNotFoundError" in names:
        return RemoteError(f"{where}: revision not found: check --revision or @REV (a branch, tag or commit of it)")
    if "GatedRepoError" in names:
        return RemoteError(f"{where}: the repository is gated: accept its terms on the Hub, then {TOKEN_HINT}")
    if "RepositoryNotFoundError" in names:
        return RemoteError(f"{where}: repository not found (or private): check the id (org/name), or {TOKEN_HINT}")
    if "EntryNotFoundError" in names:
        return RemoteError(f"{where}: file not found in the repository: {_first_line(e)}")
    if status in (401, 403) or isinstance(e, PermissionError) or "NoCredentialsError" in names:
        scheme = where.split("://", 1)[0] if "://" in where else "hf"
        todo = (TOKEN_HINT.replace("read", "access") if scheme == "hf" else
                f"check the credentials of the {scheme}:// backend ({BACKENDS.get(scheme, 'fsspec')})")  # fmt: skip
        return RemoteError(f"{where}: no permission ({_first_line(e)}): {todo}")
    if status is not None and status >= 500:
        return RemoteError(f"{where}: the server answered {status}: try again later")
    if _is_network(e):
        return RemoteError(f"{where}: cannot be reached ({type(e).__name__}: {_first_line(e)}): {OFFLINE_HINT}")
    return None


@contextlib.contextmanager
def remote_errors(where: str) -> Iterator[None]:
    """Turn what a remote filesystem or the Hub raises into one `fusion_cache.errors` line (`remote_error`)."""
    try:
        yield
    except FusionCacheError:
        raise
    except Exception as e:  # noqa: BLE001 (translated when known, re-raised as is otherwise)
        mapped = remote_error(e, where)
        if mapped is None:
            raise
        raise mapped from e


def _open_filesystem(url: str):
    """``fsspec.core.url_to_fs(url)``, its errors translated: a missing backend, an unknown scheme, offline."""
    try:
        with remote_errors(url):
            return fsspec.core.url_to_fs(url)
    except ValueError as e:
        if "Protocol not known" not in str(e) or isinstance(e, FusionCacheError):
            raise
        scheme = url.split("://", 1)[0]
        raise ConfigError(
            f"{url}: unknown URL scheme {scheme}://; give a local directory or an fsspec URL (s3://, gs://, hf://...)"
        ) from None


class CacheLocation:
    """A cache directory on some filesystem.

    Args:
        url: a local path or an fsspec URL such as ``memory://caches/a`` or ``s3://bucket/caches/a``.
    """

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, root = _open_filesystem(self.url)
        self.root = root.rstrip("/") or root
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols

    def join(self, name: str) -> str:
        return f"{self.root}/{name}"

    def child(self, name: str) -> CacheLocation:
        """The location of the subdirectory ``name`` (same filesystem; a URL keeps its protocol)."""
        return CacheLocation(f"{self.url.rstrip('/')}/{name}")

    def _remote(self):
        """A context translating remote errors (a local path keeps its own OSErrors)."""
        return contextlib.nullcontext() if self.local else remote_errors(self.url)

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a file here. Remote: a missing repository, revision or bucket, no permission or no
        network raise their one-line error (fsspec's ``isfile`` would answer False to all of them)."""
        if self.local:
            return self.fs.isfile(self.join(name))
        with remote_errors(self.url):
            try:
                return self.fs.info(self.join(name))["type"] == "file"
            except FileNotFoundError as e:
                cause = e.__cause__  # hf:// wraps "repository/revision not found" in FileNotFoundError
                if cause is not None and _names(cause) & {"RepositoryNotFoundError", "RevisionNotFoundError",
                                                          "HFValidationError"}:  # fmt: skip
                    raise cause from None
                return False

    def check_regular(self, name: str) -> None:
        """Refuse ``name`` unless it is a regular file inside this directory: a local shard must not be a symbolic
        link (to a file elsewhere, or to a device whose reads never end) nor lie under one.

        Raises:
            ShardFormatError: a missing file, a link, or anything but a regular file.
        """
        if not self.local:
            if not self.exists(name):
                raise ShardFormatError(f"{name}: shard listed in the manifest is missing")
            return
        path = self.join(name)
        try:
            st = os.lstat(path)
        except OSError:
            raise ShardFormatError(f"{name}: shard listed in the manifest is missing") from None
        if stat.S_ISLNK(st.st_mode):
            raise ShardFormatError(
                f"{name}: is a symbolic link; shards must be regular files inside the cache directory"
            )
        if not stat.S_ISREG(st.st_mode):
            raise ShardFormatError(f"{name}: is not a regular file")
        # the file itself is no link (above): a link on the way (a part directory) changes the resolved path
        if os.path.realpath(path) != os.path.join(os.path.realpath(self.root), name):
            raise ShardFormatError(f"{name}: lies outside the cache directory (through a symbolic link)")

    def read_bytes(self, name: str) -> bytes:
        with self._remote():
            return self.fs.cat_file(self.join(name))

    def size(self, name: str) -> int:
        with self._remote():
            return int(self.fs.size(self.join(name)))

    def sha256(self, name: str, chunk_bytes: int = 1 << 22) -> str:
        h = hashlib.sha256()
        with self._remote(), self.fs.open(self.join(name), "rb") as f:
            while chunk := f.read(chunk_bytes):
                h.update(chunk)
        return h.hexdigest()

    def open_arrow(self, name: str):
        """A pyarrow input stream over the file: memory-mapped when local, an fsspec file object otherwise."""
        if self.local:
            return pa.memory_map(self.join(name), "r")
        with self._remote():
            return pa.PythonFile(self.fs.open(self.join(name), "rb"), mode="r")

    def cached_copy(
        self, name: str, sha256: str, size: int, *, refresh: bool = False, chunk_bytes: int = 1 << 22
    ) -> str:
        """The local path of a verified copy of the remote file ``name``, from the shard cache (`shard_cache_dir`).

        A copy is stored under its sha256 only after the bytes downloaded hash to ``sha256``, so a present copy of the
        right size is that content: reads fetch and hash each shard once, across epochs, runs and caches.

        Args:
            name: the shard's path inside the cache.
            sha256, size: what the manifest says the shard holds.
            refresh: download and hash again even when a copy is present (``verify`` checks what the URL holds now).

        Raises:
            ShardFormatError: the file is missing, or its bytes are not the manifest's (naming both digests).
            RemoteError: the remote cannot be read (offline, no permission, ...).
        """
        assert len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256), "sha256 comes from a valid manifest"
        directory = shard_cache_dir()
        dest = directory / sha256
        if not refresh and dest.is_file() and dest.stat().st_size == size:
            return str(dest)
        self.check_regular(name)
        directory.mkdir(parents=True, exist_ok=True)
        # one temporary name per process and thread: ranks fetching the same shard never write one file together
        tmp = directory / f"{sha256}.{os.getpid()}.{threading.get_ident()}.tmp"
        h, written = hashlib.sha256(), 0
        try:
            with self._remote(), self.fs.open(self.join(name), "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(chunk_bytes):
                    h.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
            if written != size:
                raise ShardFormatError(f"{name}: {written} bytes at {self.url}, the manifest says {size}")
            digest = h.hexdigest()
            if digest != sha256:
                raise ShardFormatError(
                    f"{name}: sha256 {digest[:16]}... differs from the manifest's {sha256[:16]}...; the shard is "
                    "corrupt or was replaced"
                )
            os.replace(tmp, dest)  # atomic: a reader sees a whole verified copy or none
        finally:
            tmp.unlink(missing_ok=True)
        return str(dest)

    def __str__(self) -> str:
        return self.url


def upload_directory(local_dir: str, url: str) -> None:
    """Copy a finished local cache directory to ``url`` (remote filesystems have no atomic rename): shards first,
    manifest.json last, so a reader never sees a manifest whose shards are not all there.

    An ``hf://`` URL gets one Hub commit holding the whole cache, uploaded with retries (`fusion_cache.cache.hub`),
    not one commit per file.
    """
    loc = CacheLocation(url)
    protocols = loc.fs.protocol if isinstance(loc.fs.protocol, tuple) else (loc.fs.protocol,)
    if "hf" in protocols:
        from fusion_cache.cache.hub import parse_hf_url  # lazy: hub.py builds on this module
        from fusion_cache.cache.hub import push_cache

        repo, revision, path_in_repo = parse_hf_url(url)
        push_cache(local_dir, repo, revision=revision, path_in_repo=path_in_repo)
        loc.fs.invalidate_cache()  # the process's hf:// filesystem listed the repo before this commit
        return
    with remote_errors(url):
        loc.fs.makedirs(loc.root, exist_ok=True)
        names = sorted(os.listdir(local_dir))
        for name in [n for n in names if n != "manifest.json"] + ["manifest.json"]:
            loc.fs.put_file(os.path.join(local_dir, name), loc.join(name))
