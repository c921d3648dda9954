"""Training checkpoints for exact resume: written atomically, read back without unpickling anything.

A checkpoint is the directory ``<run>/checkpoints/step-00000010/``::

    model.safetensors     the student's weights (tied tensors stored once; their aliases in the metadata)
    optimizer.pt          torch.save of the optimizer's state dict (tensors and numbers only)
    scheduler.pt          torch.save of the LR scheduler's state dict
    trainer_state.json    step, answer tokens, elapsed seconds, world size and the run's settings
    rank-00000.json       per rank: the stream position (`stream.StreamIterator.state_dict`) and the RNG states
                          of python, numpy and torch

It is written into ``.step-00000010.tmp-<pid>/`` next to it, every file fsynced, then renamed: a process killed at
any moment leaves either the complete checkpoint or none (temporary directories are ignored and swept). The
``.pt`` files are loaded with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers, so a checkpoint from elsewhere cannot run code; everything else is safetensors or JSON.
"""

from __future__ import annotations

import json
import os
import pickle  # only for its exception type: nothing is unpickled outside torch.load(weights_only=True)
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusion_cache.cache.durable import fsync_dir
from fusion_cache.cache.durable import fsync_file
from fusion_cache.cache.durable import write_atomic
from fusion_cache.errors import ConfigError

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_ALIASES_KEY = "fusion_cache.aliases"
# Settings that may change between a run and its resume without changing what the run computes.
RESUMABLE_CHANGES = frozenset(
    {"resume", "checkpoint_every", "keep_checkpoints", "log_every", "save", "out", "overwrite", "report_to"}
)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """The global RNG states of python, numpy and torch (CPU, and every CUDA device when present), as JSON."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------- weights
def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors; tensors sharing storage (tied embeddings) are stored once."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={_ALIASES_KEY: json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read `save_weights` output back into a full state dict (aliases point at the same tensor)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


# ---------------------------------------------------------------------------------------------- save / load
@dataclass
class Checkpoint:
    """A checkpoint read back from disk (see the module docstring for the files)."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    trainer: dict
    ranks: list[dict]

    @property
    def step(self) -> int:
        return int(self.trainer["step"])


def save_checkpoint(
    run_dir: Path,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict,
    scheduler: dict,
    trainer: dict,
    ranks: list[dict],
    keep: int | None = None,
) -> Path:
    """Write a checkpoint for ``trainer["step"]`` atomically; then keep only the newest ``keep`` (None: all).

    Args:
        run_dir: the run directory; the checkpoint goes under ``run_dir/checkpoints/``.
        model: the full model state dict (rank 0's view; FSDP callers gather it first).
        optimizer: the optimizer's state dict (full, for FSDP).
        scheduler: the LR scheduler's state dict.
        trainer: JSON: at least ``step``.
        ranks: JSON per rank, in rank order (stream position and RNG states).
        keep: how many checkpoints to keep, newest first.

    Returns:
        The checkpoint directory.
    """
    final = step_dir(run_dir, int(trainer["step"]))
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporary(run_dir)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_weights(model, tmp / "model.safetensors")
        fsync_file(tmp / "model.safetensors")
        # torch.save writes tensors and plain containers; load_checkpoint reads them back with weights_only=True
        torch.save(optimizer, tmp / "optimizer.pt")
        fsync_file(tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        fsync_file(tmp / "scheduler.pt")
        for r, state in enumerate(ranks):
            write_atomic(tmp / f"rank-{r:05d}.json", json.dumps(state).encode())
        write_atomic(tmp / "trainer_state.json", (json.dumps(trainer, indent=2) + "\n").encode())
        fsync_dir(tmp)
        if final.exists():  # only when a run is re-saved at a step it already had: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def sweep_temporary(run_dir: Path) -> None:
    """Remove half-written checkpoint directories left by a killed process."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".step-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint directory; the ``.pt`` files with ``weights_only=True`` (nothing untrusted is unpickled)."""
    path = Path(path)
    try:
        trainer = json.loads((path / "trainer_state.json").read_text())
        ranks = [json.loads((path / f"rank-{r:05d}.json").read_text()) for r in range(int(trainer["world_size"]))]
        return Checkpoint(
            path=path,
            model=load_weights(path / "model.safetensors"),
            optimizer=torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
            scheduler=torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"),
            trainer=trainer,
            ranks=ranks,
        )
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as e:
        # weights_only refusing a global (a pickle that would run code) lands here too
        raise ConfigError(f"{path}: not a readable checkpoint: {e}") from e


def check_same_settings(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume when a setting that changes the computation differs from the checkpoint's run."""
    diff = sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if diff:
        lines = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff)
        raise ConfigError(f"{path}: the run was started with other settings ({lines}); resume with the same ones")
