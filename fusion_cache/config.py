"""The base of every stage's settings (capture.config, train.config, merge.config): frozen and strict.

Unknown keys are refused and every error names the field and the value; ``create`` reports all problems at once.

Settings also live in YAML files whose keys are the fields (DistillKit, mergekit, torchtune): `load_config_file`
reads one, `StrictConfig.to_yaml` writes the resolved settings of a run, and `write_config_yaml` puts them in the
run's output directory as ``config.yaml``, which ``fusion-cache <command> --config <dir>/config.yaml`` replays.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from typing import TypeVar

from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import ValidationError

from fusion_cache.errors import ConfigError


class StrictConfig(BaseModel):
    """Frozen settings that refuse unknown keys; build them with ``create`` to get one ConfigError for all problems."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @classmethod
    def create(cls, **kwargs):
        """Validate ``kwargs``; every problem is reported at once in one ConfigError."""
        try:
            return cls.model_validate(kwargs)
        except ValidationError as e:
            problems = [
                f"{'.'.join(map(str, err['loc'])) or cls.__name__}: {err['msg']} (got {err.get('input')!r})"
                for err in e.errors()
            ]
            raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None

    def to_yaml(self, command: str | None = None) -> str:
        """The settings as YAML (field names as the CLI and ``--config`` spell them, in field order), with a header
        that says how to replay them when ``command`` (e.g. "train") is given."""
        import yaml

        data = self.model_dump(mode="json", by_alias=True)
        header = "# resolved settings, written by fusion-cache"
        if command:
            header += f"; replay: fusion-cache {command} --config <this file> [--flag value ...]"
        return header + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


CONFIG_FILE = "config.yaml"


def write_config_yaml(cfg: StrictConfig, directory: str | os.PathLike[str], command: str) -> Path:
    """Write ``cfg.to_yaml(command)`` to ``<directory>/config.yaml`` (atomically: a temp file renamed into place)."""
    path = Path(directory) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(cfg.to_yaml(command))
    os.replace(tmp, path)
    return path


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) settings file.

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML, or a document that is not a mapping with string keys.
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"--config {path}: expected a mapping of setting names to values, got {type(data).__name__}")
    return data


T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, field: str) -> T:
    """``registry[name]``, or a ConfigError naming the field, the value and the valid names (every registry of the
    project answers an unknown name this way)."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ConfigError(f"{field}: unknown value {name!r}; valid values: {', '.join(registry)}") from None
