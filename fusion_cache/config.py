"""The base of every stage's settings (capture.config, train.config, merge.config): frozen and strict.

Unknown keys are refused and every error names the field and the value; ``create`` reports all problems at once.
"""

from __future__ import annotations

from collections.abc import Mapping
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


T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, field: str) -> T:
    """``registry[name]``, or a ConfigError naming the field, the value and the valid names (every registry of the
    project answers an unknown name this way)."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ConfigError(f"{field}: unknown value {name!r}; valid values: {', '.join(registry)}") from None
