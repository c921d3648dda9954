"""Durable writes: files and renames that survive a killed process or a power loss, in one place.

A rename is atomic, but on its own it is not durable. Two fsyncs make it so:

1. fsync the new file *before* the rename. Without it, after a power loss the new name can point to an empty or
   partial file: ext4 (delayed allocation) and XFS may commit the rename before the data.
2. fsync the directory *after* the rename. Without it the rename itself may be lost, and the old name (or nothing)
   comes back.

`write_atomic` does both: after it returns, ``path`` holds the old bytes or the new ones, never a mix, even after a
crash. The part records and build state of a build in progress (cache/resume.py), the shards (cache/writer.py) and
the training checkpoints (train/checkpoint.py) are written this way.

Errors: a failed fsync raises (an I/O error means the data may not be on disk, and the caller must not record it
as complete). A system that cannot sync a directory is skipped: Windows cannot open one, and some file systems
answer EINVAL or ENOTSUP. Such a system gives no stronger guarantee to have.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# errno values of an fsync the file system does not support (as opposed to one that failed)
_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def fsync_file(path: str | Path) -> None:
    """Flush an already written file's data to disk.

    Raises:
        OSError: the file cannot be opened, or the flush failed.
    """
    # opened for writing: Windows flushes only through a handle with write access (FlushFileBuffers)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: str | Path) -> None:
    """Make the renames, creations and deletions inside ``directory`` durable.

    Skipped where directories cannot be synced: Windows cannot open one, and some file systems refuse the call.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        OSError: the sync failed (an I/O error).
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # Windows: a directory cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably and atomically: temp file, fsync, rename, fsync of the directory.

    The temp file ``<name>.<pid>.tmp`` sits next to ``path``. It is named per process, so two processes writing
    the same path cannot mix their bytes: the last rename wins whole. The ``.tmp`` ending lets sweepers recognize
    it (cache/resume.py `load_completed_parts`). On an error the temp file is removed and ``path`` is unchanged.

    Args:
        path: the file to write; its directory must exist.
        data: the complete new content.

    Raises:
        OSError: the write, a sync or the rename failed (``path`` then still holds its old content, if any).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
