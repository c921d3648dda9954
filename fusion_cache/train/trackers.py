"""Experiment trackers: every metrics record of a run also goes to TensorBoard or W&B (``--report-to``).

    fusion-cache train ... --report-to tensorboard   # event files in <out>/tensorboard/ (tensorboard --logdir <out>)
    WANDB_MODE=offline fusion-cache train ... --report-to wandb   # <out>/wandb/offline-run-*; `wandb sync` uploads it

Both are optional extras (``pip install 'fusion-cache[tensorboard]'``, ``'fusion-cache[wandb]'``), imported only
when chosen; ``metrics.jsonl`` is written either way and stays the run's record. Only rank 0 reports. A resumed run
reports from its checkpoint's step on: TensorBoard drops the events the killed run logged after it (``purge_step``);
W&B continues the same run (its id is kept in ``<out>/wandb/run_id``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError


class Tracker(Protocol):
    """Where the metrics go besides metrics.jsonl."""

    def log(self, record: dict, step: int) -> None:
        """Report one metrics record (its numeric, finite fields) at optimizer step ``step``."""
        ...

    def close(self) -> None: ...


def _scalars(record: dict) -> dict[str, float]:
    """The record's numeric, finite fields but the step itself."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class NoTracker:
    """``--report-to none``: metrics.jsonl only."""

    def __init__(self, out: Path, config: dict, resume_step: int = 0):
        pass

    def log(self, record: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars ``train/<metric>`` in ``<out>/tensorboard/`` (``torch.utils.tensorboard``, needs ``tensorboard``)."""

    def __init__(self, out: Path, config: dict, resume_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise MissingDependencyError(
                "--report-to tensorboard needs tensorboard: pip install 'fusion-cache[tensorboard]'"
            ) from e
        self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=resume_step or None)
        if not resume_step:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, record: dict, step: int) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    """Metrics ``train/<metric>`` and the resolved config as a W&B run under ``<out>/wandb/`` (needs ``wandb``).

    The project is ``$WANDB_PROJECT`` (default ``fusion-cache``), the run's name the run directory's. W&B's own
    settings come from its environment (``WANDB_MODE=offline``, ``WANDB_ENTITY``, ``WANDB_API_KEY``, ...).
    """

    def __init__(self, out: Path, config: dict, resume_step: int = 0):
        try:
            import wandb
        except ImportError as e:
            raise MissingDependencyError("--report-to wandb needs wandb: pip install 'fusion-cache[wandb]'") from e
        out = Path(out)
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else None
        # console="off": W&B's console capture would wrap stderr and record every redraw of the progress bar
        settings = wandb.Settings(console="off", quiet=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fusion-cache"), dir=str(out),
                                  name=out.name, config=config, id=run_id, resume="allow" if run_id else None,
                                  settings=settings, reinit="create_new")  # fmt: skip
        except wandb.Error as e:  # no API key and no offline mode, the server unreachable, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"report_to: wandb could not start a run ({first}); run `wandb login`, or set WANDB_MODE=offline "
                "to keep the run local"
            ) from e
        id_file.write_text(self.run.id + "\n")

    def log(self, record: dict, step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in _scalars(record).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


# name -> tracker class (`TrainConfig.report_to` takes its choices from here)
TRACKERS: dict[str, type] = {"none": NoTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker}
TRACKER_NAMES: tuple[str, ...] = tuple(TRACKERS)


def make_tracker(name: str, out: str | Path, config: dict, *, resume_step: int = 0) -> Tracker:
    """The tracker ``name`` (a key of ``TRACKERS``) for the run in ``out``.

    Raises:
        ConfigError: unknown name.
        MissingDependencyError: the tracker's package is not installed (the message says how to install it).
    """
    from fusion_cache.config import lookup

    return lookup(TRACKERS, name, "report_to")(Path(out), config, resume_step)
