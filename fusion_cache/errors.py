"""Exceptions fusion-cache raises for user mistakes and bad artifacts.

Every message names the field (file, line, column, shard) and the offending value, so a user can fix the input
without reading a traceback. User mistakes are `ValueError` subclasses; `assert` is only for internal invariants.
"""

from __future__ import annotations


class FusionCacheError(Exception):
    """Base class of every error fusion-cache raises on purpose."""


class ConfigError(FusionCacheError, ValueError):
    """A setting is invalid (an unknown teacher, K < 1, an output dir that holds another cache, ...)."""


class DataError(FusionCacheError, ValueError):
    """An input row is malformed. The message names the file, the line (1-based) and the field."""

    def __init__(self, source: str, line: int | None, message: str):
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.line = line


class ShardFormatError(FusionCacheError, ValueError):
    """A cache shard or manifest is unreadable, of an unknown schema version, or inconsistent with its manifest."""


class FingerprintError(FusionCacheError, ValueError):
    """A fingerprint does not match what the data or the settings hash to."""


class SignatureError(FusionCacheError, ValueError):
    """A cache required to be signed carries no valid signature of a trusted key over its fingerprint."""


class MissingDependencyError(FusionCacheError, ImportError):
    """An optional dependency (vLLM, Triton, a teacher package) is not installed; the message says how to get it."""


class RemoteError(FusionCacheError, ValueError):
    """A remote cache or Hub repository cannot be reached or used: offline, not found, no permission, an unknown
    revision, a server error. The message names the URL or repository and says what to do."""


class NonFiniteLossError(FusionCacheError, FloatingPointError):
    """A training step's loss or gradient norm is NaN or infinite; the message names the step and its samples' rows."""
