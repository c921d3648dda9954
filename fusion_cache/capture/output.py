"""Where a build's cache goes: what ``--out`` may already hold, where the cache is written, and its publication.

A build writes into ``<out>.incomplete/`` and publishes it as ``<out>`` in one rename (cache/writer.py
`publish_directory`). A build to an fsspec URL does this in a local staging directory fixed by the URL, so
``--resume`` finds it, and uploads the finished cache (shards first, manifest last). ``--out`` is refused when it
holds anything but this same build (then nothing is redone) unless ``--overwrite``; a part of a distributed build
goes into ``<out>/part-I-of-N/``, next to the other parts and their combined manifest (cache/parts.py).

Two builds into the same place at once are refused: a build holds an exclusive lock (`build_lock`: ``flock`` on
``<out>.incomplete.lock``, beside the work directory because the work directory itself is deleted by
``--overwrite`` and renamed when published) from before it checks ``--out`` until it has published; the lock file
names its holder (pid, host, start time) for the one-line refusal. The kernel releases the lock when the holder
dies, so a killed build never leaves a stale lock. For an fsspec URL the lock is on the local staging directory,
so it excludes builds on this machine only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fusion_cache.cache.fingerprint import file_sha256
from fusion_cache.cache.manifest import MANIFEST_NAME
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.parts import part_dir_name
from fusion_cache.cache.resume import clear_resume_records
from fusion_cache.cache.storage import CacheLocation
from fusion_cache.cache.storage import upload_directory
from fusion_cache.cache.writer import publish_directory
from fusion_cache.capture.config import BuildConfig
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError


@dataclass(frozen=True)
class OutputPlan:
    """Where one build (or one part of a distributed build) writes and publishes its cache.

    Attributes:
        url: where the cache is published: ``--out``, or the part's directory under it.
        location: ``url`` opened (a local directory or an fsspec URL).
        out: the local directory the cache is published to: ``url`` itself, or for an fsspec URL the staging copy
            that is uploaded once complete.
        existing: the manifest of this same build already at ``url`` (nothing to redo), else None.
    """

    url: str
    location: CacheLocation
    out: Path
    existing: Manifest | None

    @property
    def work(self) -> Path:
        """``<out>.incomplete``: where the cache is written, and what ``--resume`` continues."""
        return self.out.with_name(self.out.name + ".incomplete")


def plan_output(cfg: BuildConfig, config_fp: str, part: dict | None) -> OutputPlan:
    """Decide where the build of ``config_fp`` goes, and refuse an ``--out`` holding something else.

    Args:
        cfg: the build settings (``out``, ``overwrite``, ``num_shards``, ``shard_index``).
        config_fp: the build's config fingerprint.
        part: ``{"index", "count", "row_start", "row_end"}`` for a part of a distributed build, else None.

    Raises:
        ConfigError: ``--out`` holds another cache, or files that are no cache, and ``--overwrite`` is not set; for
            a part, ``--out`` holds a cache that is not a combination of this build's parts.
    """
    url = cfg.out
    if part is not None:
        _check_parts_root(cfg.out, config_fp)
        name = part_dir_name(cfg.shard_index, cfg.num_shards)
        url = str(Path(cfg.out) / name) if CacheLocation(cfg.out).local else f"{cfg.out.rstrip('/')}/{name}"
    location = CacheLocation(url)
    if location.local:
        out = Path(location.root)
        existing = _check_output(out, config_fp, cfg.overwrite, part)
    else:  # an fsspec URL: build in a local staging dir, upload when complete (shards first, manifest last)
        out = _staging_dir(url) / "cache"
        existing = _check_remote_output(location, config_fp, cfg.overwrite, part)
    return OutputPlan(url=url, location=location, out=out, existing=existing)


def publish(plan: OutputPlan) -> None:
    """Move the finished work directory to ``plan.out`` (replacing what `plan_output` allowed), and upload it for
    an fsspec URL."""
    clear_resume_records(plan.work)
    publish_directory(plan.work, plan.out, overwrite=True)  # _check_output already refused what must not be replaced
    if plan.location.local:
        return
    fs, root = plan.location.fs, plan.location.root
    if fs.exists(root):
        fs.rm(root, recursive=True)  # _check_remote_output allowed the replacement
    upload_directory(str(plan.out), plan.url)
    shutil.rmtree(plan.out.parent, ignore_errors=True)
    try:
        plan.out.parent.parent.rmdir()  # the staging root, when no other build is staged there
    except OSError:
        pass


def _read_manifest(where: Path | CacheLocation) -> Manifest | None:
    """The manifest at ``where``, or None when it is missing or unreadable."""
    try:
        return load_manifest(where)
    except ShardFormatError:
        return None


def _is_this_build(manifest: Manifest | None, config_fp: str, part: dict | None) -> bool:
    """Whether ``manifest`` is the cache of this build (the same ``part`` of it, if any)."""
    if manifest is None or manifest.config_fingerprint != config_fp:
        return False
    return (manifest.part.model_dump() if manifest.part is not None else None) == part


def _check_output(out: Path, config_fp: str, overwrite: bool, part: dict | None) -> Manifest | None:
    """Return the existing manifest when ``out`` already holds this exact build (the same ``part`` of it, if any);
    refuse anything else unless ``overwrite`` (then None: build and replace)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if (out / MANIFEST_NAME).exists():
        existing = _read_manifest(out)
        if _is_this_build(existing, config_fp, part):
            return existing  # the same build: nothing to redo, --overwrite or not
        if not overwrite:
            what = "a different cache" if existing is not None else "an unreadable cache"
            raise ConfigError(f"--out {out}: holds {what}; pass --overwrite to replace it")
        return None
    if any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: directory is not empty and holds no cache; choose another --out")
    return None


def _check_remote_output(
    location: CacheLocation, config_fp: str, overwrite: bool, part: dict | None
) -> Manifest | None:
    """_check_output for an fsspec URL: the same build is a no-op, anything else needs ``overwrite``."""
    fs, root = location.fs, location.root
    if not fs.exists(root) or not fs.ls(root):
        return None
    existing = _read_manifest(location)
    if _is_this_build(existing, config_fp, part):
        return existing
    if not overwrite:
        raise ConfigError(f"--out {location}: holds other files or another cache; pass --overwrite to replace it")
    return None


def _check_parts_root(out: str, config_fp: str) -> None:
    """A part build's ``--out`` may hold other parts and their combined manifest, never another cache."""
    loc = CacheLocation(out)
    if not loc.exists(MANIFEST_NAME):
        return
    top = _read_manifest(loc)
    if top is None or top.parts is None or top.config_fingerprint != config_fp:
        raise ConfigError(
            f"--out {out}: holds another cache (not the parts of this build); choose another --out for the parts"
        )


def _staging_dir(url: str) -> Path:
    """Where a build to an fsspec URL is written before the upload: fixed per URL, so ``--resume`` finds it."""
    from fusion_cache.models.convert import fusion_cache_home

    return fusion_cache_home() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16]


def lock_path(work: Path) -> Path:
    """``<out>.incomplete.lock``: the lock file of the build that writes ``work`` (``<out>.incomplete``)."""
    return work.with_name(work.name + ".lock")


@contextlib.contextmanager
def build_lock(work: Path) -> Iterator[Path]:
    """Hold the exclusive lock of the build writing ``work`` for the block (see the module docstring).

    Raises:
        ConfigError: another process holds it; the message names the holder.
    """
    path = lock_path(work)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"--out {work.name.removesuffix('.incomplete')}: another build into the same place is running "
                f"({holder}; lock {path}); wait for it to finish or stop it"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # (else the file was unlinked by a finishing holder between our open and our lock: retry)
            break
        os.close(fd)
    try:
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a waiter that opened it sees another inode and retries
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# what the manifest and the card may say about this machine: names and hashes, never local paths


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(value))


def public_model_label(value: str, model) -> str:
    """``value`` (a ``--teacher`` argument or a resolved model path) as a manifest records it: a local directory
    by its name (its revision, `ResolvedModel.revision`, holds its content hash), anything else as given."""
    if model.preset is not None and value == model.path:
        return model.preset.hf_id  # a packaged preset's converted directory: its weights' origin
    if _is_local_path(value):
        return Path(os.path.expanduser(value)).resolve().name
    return value


def public_dataset_source(data: str) -> str:
    """``--data`` as a manifest records it: a local file or directory by its base name (``dataset.hash`` is the
    sha256 of its rows), a Hub dataset id or URL as given."""
    if "://" not in data and _is_local_path(data):
        return Path(os.path.expanduser(data)).resolve().name
    return data


def generated_answers(data: str) -> dict:
    """The manifest's ``answers``: the settings of `fusion-cache generate` when ``data`` is its output (its
    ``<data>.meta.json`` is there and, when it records one, names this file's sha256), else the dataset's own."""
    meta_path = Path(os.path.expanduser(data) + ".meta.json") if "://" not in data else None
    if meta_path is None or not meta_path.is_file():
        return {"source": "dataset"}
    try:
        meta = json.loads(meta_path.read_text())
        sampling, model = meta["sampling"], meta["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"source": "dataset"}  # not a generate meta file
    recorded = meta.get("out_sha256")
    if recorded is not None and recorded != file_sha256(os.path.expanduser(data)):
        return {"source": "dataset"}  # the rows were edited after generate: its settings no longer describe them
    name = str(model.get("name"))
    return {
        "source": "generate",
        "model": Path(name).name if _is_local_path(name) else name,
        "revision": model.get("revision"),
        "temperature": sampling.get("temperature"),
        "top_p": sampling.get("top_p"),
        "n": sampling.get("n"),
        "seed": sampling.get("seed"),
        "max_new_tokens": sampling.get("max_tokens"),
    }
