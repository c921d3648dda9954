"""Pairwise fusion (InfiFusion_p): one fine-tuned pivot per teacher cache, then one merge of them all.

    train_pairwise(["cache/a", "cache/b"], "runs", student="./pivot", max_steps=100)  # runs/a, runs/b
    fuse_pairwise(["cache/a", "cache/b"], "fused", train={"student": "./pivot"}, merge={"method": "ties"})

Every run starts from the same pivot with the same recipe (settings and seed); only the cache differs.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from fusion_cache.errors import ConfigError

log = logging.getLogger(__name__)

# How several teacher caches train a student: one run against every cache (`train.trainer`, S >= 1 teachers), the
# same refusing more than one cache, or this module's recipe (one run per cache, then a merge).
PAIRWISE = "pairwise"
TRAIN_MODES = ("unified", "single", PAIRWISE)


def run_names(shards: list[str]) -> list[str]:
    """One run directory name per cache: the cache directory's name, which must be unique."""
    names = [Path(s).resolve().name for s in shards]
    seen: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        if name in seen:
            raise ConfigError(
                f"shards: {seen[name]!r} and {shard!r} would both train into run directory {name!r}; "
                "give the caches different directory names"
            )
        seen[name] = shard
    return names


def train_pairwise(shards: list[str], out: str | Path, *, progress: bool = True, **train_settings) -> list[Path]:
    """Train one pivot per cache, sequentially, each into ``<out>/<cache-name>/`` (its model in ``.../model``).

    Args:
        shards: cache directories, one per teacher (at least 2).
        out: parent of the run directories.
        **train_settings: `TrainConfig` fields other than ``shards`` and ``out`` (``student`` is required;
            ``kd_loss`` may name one loss per cache).

    Returns:
        The run directories, in the order of ``shards``.
    """
    from fusion_cache.train.config import TrainConfig
    from fusion_cache.train.trainer import run_train

    if len(shards) < 2:
        raise ConfigError(f"pairwise mode needs at least 2 caches, got {len(shards)}")
    names = run_names(shards)
    # one loss per cache, when given so (`--kd-loss kl --kd-loss uld`), else the same loss for every run
    losses = train_settings.pop("kd_loss", None)
    losses = [losses] if isinstance(losses, str) else losses
    if losses is not None and len(losses) not in (1, len(shards)):
        raise ConfigError(f"kd_loss: give one loss or one per cache ({len(shards)}), got {len(losses)}: {losses}")
    per_run = [None] * len(shards) if losses is None else (losses * len(shards) if len(losses) == 1 else losses)
    # Validate every run's settings before the first (long) one starts.
    cfgs = [
        TrainConfig.create(
            shards=[str(s)], out=str(Path(out) / n), **train_settings, **({"kd_loss": [kd]} if kd else {})
        )
        for s, n, kd in zip(shards, names, per_run, strict=True)
    ]
    runs = []
    for i, cfg in enumerate(cfgs):
        log.info("pairwise run %d/%d: %s -> %s", i + 1, len(cfgs), cfg.shards[0], cfg.out)
        result = run_train(cfg, progress=progress)
        del result  # the next run loads its own copy of the pivot
        gc.collect()
        runs.append(Path(cfg.out))
    return runs


def fuse_pairwise(
    shards: list[str], out: str | Path, *, train: dict, merge: dict, progress: bool = True
) -> tuple[list[Path], dict]:
    """Train one pivot per cache into ``<out>/runs/<cache-name>`` and merge them into ``<out>/merged``.

    Args:
        train: `TrainConfig` fields (``student`` required; ``save`` must stay True).
        merge: `MergeConfig` fields other than ``base``, ``models`` and ``out`` (``method`` and its options).

    Returns:
        (run directories, the merge summary).
    """
    from fusion_cache.merge.config import MergeConfig
    from fusion_cache.merge.run import run_merge

    out = Path(out)
    # Validate the merge settings before hours of training.
    probe = MergeConfig.create(base=train["student"], models=["?", "?"], out=str(out / "merged"), **merge)
    runs = train_pairwise(shards, out / "runs", progress=progress, **train)
    cfg = MergeConfig.create(**{**probe.model_dump(), "models": [str(r) for r in runs]})
    return runs, run_merge(cfg, progress=progress)
