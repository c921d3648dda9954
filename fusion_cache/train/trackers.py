"""Experiment trackers: every metrics record of a run also goes to TensorBoard (``--report-to``).

    fusion-cache train ... --report-to tensorboard   # event files in <out>/tensorboard/ (tensorboard --logdir <out>)

TensorBoard is an optional extra (``pip install 'fusion-cache[tensorboard]'``), imported only when chosen;
``metrics.jsonl`` is written either way and stays the run's record. Only rank 0 reports. A resumed run reports from
its checkpoint's step on: TensorBoard drops the events the killed run logged after it (``purge_step``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

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


# name -> tracker class (`TrainConfig.report_to` takes its choices from here)
TRACKERS: dict[str, type] = {"none": NoTracker, "tensorboard": TensorBoardTracker}
TRACKER_NAMES: tuple[str, ...] = tuple(TRACKERS)


def make_tracker(name: str, out: str | Path, config: dict, *, resume_step: int = 0) -> Tracker:
    """The tracker ``name`` (a key of ``TRACKERS``) for the run in ``out``.

    Raises:
        ConfigError: unknown name.
        MissingDependencyError: the tracker's package is not installed (the message says how to install it).
    """
    from fusion_cache.config import lookup

    return lookup(TRACKERS, name, "report_to")(Path(out), config, resume_step)
