"""Where caches live: local paths or any fsspec URL (file://, memory://; s3://, gs://, hf:// with their backend).

Only three operations are needed: read a small file whole, stream a shard, and list/size/checksum it. Local paths
keep the fast path (memory-mapped shards); everything else goes through fsspec file objects.
"""

from __future__ import annotations

import hashlib
import os
import stat

import fsspec
import pyarrow as pa

from fusion_cache.errors import ShardFormatError


class CacheLocation:
    """A cache directory on some filesystem.

    Args:
        url: a local path or an fsspec URL such as ``memory://caches/a`` or ``s3://bucket/caches/a``.
    """

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or root
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols

    def join(self, name: str) -> str:
        return f"{self.root}/{name}"

    def child(self, name: str) -> CacheLocation:
        """The location of the subdirectory ``name`` (same filesystem; a URL keeps its protocol)."""
        return CacheLocation(f"{self.url.rstrip('/')}/{name}")

    def exists(self, name: str) -> bool:
        return self.fs.isfile(self.join(name))

    def check_regular(self, name: str) -> None:
        """Refuse ``name`` unless it is a regular file inside this directory: a local shard must not be a symbolic
        link (to a file elsewhere, or to a device whose reads never end) nor lie under one.

        Raises:
            ShardFormatError: a missing file, a link, or anything but a regular file.
        """
        if not self.local:
            if not self.fs.isfile(self.join(name)):
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
        return self.fs.cat_file(self.join(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self.join(name)))

    def sha256(self, name: str, chunk_bytes: int = 1 << 22) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.join(name), "rb") as f:
            while chunk := f.read(chunk_bytes):
                h.update(chunk)
        return h.hexdigest()

    def open_arrow(self, name: str):
        """A pyarrow input stream over the file: memory-mapped when local, an fsspec file object otherwise."""
        if self.local:
            return pa.memory_map(self.join(name), "r")
        return pa.PythonFile(self.fs.open(self.join(name), "rb"), mode="r")

    def __str__(self) -> str:
        return self.url


def upload_directory(local_dir: str, url: str) -> None:
    """Copy a finished local cache directory to ``url`` (remote filesystems have no atomic rename): shards first,
    manifest.json last, so a reader never sees a manifest whose shards are not all there."""
    import os

    loc = CacheLocation(url)
    loc.fs.makedirs(loc.root, exist_ok=True)
    names = sorted(os.listdir(local_dir))
    for name in [n for n in names if n != "manifest.json"] + ["manifest.json"]:
        loc.fs.put_file(os.path.join(local_dir, name), loc.join(name))
