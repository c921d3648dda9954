"""`fusion-cache build --ray`: a distributed build on a Ray cluster, one part (and one teacher engine) per task.

The driver splits the input into ``num_shards`` parts exactly as ``--num-shards N --shard-index I`` does and runs
each part's `run_build` as a Ray task, so the result is the cache the sharded CLI writes: ``<out>/part-I-of-N/``
caches and the combined ``<out>/manifest.json`` (cache/parts.py). ``--out`` must be reachable from every node: a
shared directory or an fsspec URL. Tasks run with ``resume=True``, so a part whose worker died is continued from
its complete shards when Ray retries it on the same node (or, for a URL, wherever its staging directory lives).
Only JSON-able settings go to the tasks and only manifest JSON comes back.

Ray is an optional dependency: ``pip install 'fusion-cache[ray]'``.
"""

from __future__ import annotations

import json
import logging

from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.parts import combine_parts
from fusion_cache.capture.config import BuildConfig
from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError

log = logging.getLogger(__name__)

INSTALL_HINT = "Ray is not installed: pip install 'fusion-cache[ray]' (or pip install ray)"


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError(INSTALL_HINT) from e
    return ray


def build_part(settings: dict) -> str:
    """Run one part's build (inside a Ray task). Returns the part manifest as JSON text."""
    from fusion_cache.capture.build import run_build

    return run_build(BuildConfig.create(**settings), progress=False).to_json()


def run_build_ray(
    cfg: BuildConfig,
    *,
    address: str | None = None,
    gpus_per_part: float | None = None,
    cpus_per_part: float = 1.0,
    max_retries: int = 2,
    init_kwargs: dict | None = None,
) -> Manifest:
    """Build ``cfg`` as ``cfg.num_shards`` parts on Ray and return the combined manifest.

    Args:
        cfg: the build settings; ``num_shards`` (>= 2) is the number of parts, ``shard_index`` must be 0.
        address: the cluster to join (``ray.init(address=...)``, e.g. "auto"); None starts a local Ray, or uses
            the one already initialized in this process.
        gpus_per_part: GPUs each part's task reserves; default 1 when the cluster has GPUs, else 0.
        cpus_per_part: CPUs each part's task reserves.
        max_retries: times Ray reruns a part whose worker died (the rerun resumes it).
        init_kwargs: extra ``ray.init`` arguments for a local Ray (e.g. ``num_cpus``, ``_temp_dir``).

    Raises:
        ConfigError: fewer than 2 parts or a shard index given.
        MissingDependencyError: Ray is not installed.
    """
    if cfg.num_shards < 2:
        raise ConfigError(f"--ray: needs --num-shards >= 2 (the number of parts to run), got {cfg.num_shards}")
    if cfg.shard_index != 0:
        raise ConfigError("--ray: runs every part itself; do not pass --shard-index")
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, **(init_kwargs or {}))
    try:
        if gpus_per_part is None:
            gpus_per_part = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        task = ray.remote(num_cpus=cpus_per_part, num_gpus=gpus_per_part, max_retries=max_retries)(build_part)
        settings = cfg.model_dump()
        refs = {task.remote({**settings, "shard_index": i, "resume": True}): i for i in range(cfg.num_shards)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            part = json.loads(ray.get(done[0]))
            log.warning(
                "part %d of %d done: %d rows (%d of %d parts finished)",
                refs[done[0]],
                cfg.num_shards,
                part["stats"]["rows"],
                cfg.num_shards - len(pending),
                cfg.num_shards,
            )
    finally:
        if started:
            ray.shutdown()
    return combine_parts(cfg.out, count=cfg.num_shards)
