"""Top-K codecs: how a shard stores the teacher's top-K block (docs/cache-format.md section 1.2 is the spec).

One module per codec, each one `Codec` class owning its Arrow columns, encode and decode (codecs/base.py), chosen at
build time and recorded in the manifest and every shard's schema metadata:

- ``full`` (full.py): ids as per-shard ranks in grouped byte planes, quantized values, tail mass, the target
  log-probs outside the top-K; zstd. Layouts 1 to 3 of earlier versions are still read.
- ``values`` (values.py): the sorted values only (ULD needs nothing else), quantized; zstd.
- ``shape`` (shape.py): the sorted values' standardized shape only (the z-scored ULD loss only).
- ``raw`` (raw.py): fp32 log-probs + int32 ids + fp32 target log-probs, uncompressed; the exact reference.
- ``sampled`` (sampled.py): a sampled (RS-KD) capture: N draws per position as distinct ids, counts and fp16
  log-probs; zstd. What ``build --sampling rs`` writes, and the only codec it writes.

Shared: value quantization (quantize.py), ids and their per-shard order (ids.py), full layout 2's id buckets
(buckets.py). Adding a codec: one module with one `Codec` subclass, and one entry in ``CODECS`` below.

The registry here is the one list of codec names: the build settings (capture/config.py), the CLI help
(`codec_help`) and manifest parsing (`parse_codec`) read it; each loss checks the capabilities it needs
(`require_logprobs`, fusion_cache/train/losses.py).
"""

from __future__ import annotations

from fusion_cache.cache.codecs.base import Codec
from fusion_cache.cache.codecs.full import FullCodec
from fusion_cache.cache.codecs.raw import RawCodec
from fusion_cache.cache.codecs.sampled import SampledCodec
from fusion_cache.cache.codecs.shape import ShapeCodec
from fusion_cache.cache.codecs.values import ValuesCodec
from fusion_cache.config import lookup
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError

__all__ = [
    "CODECS",
    "CODEC_NAMES",
    "LATEST_SCHEMA_VERSION",
    "Codec",
    "FullCodec",
    "RawCodec",
    "SampledCodec",
    "ShapeCodec",
    "ValuesCodec",
    "codec_help",
    "get_codec",
    "make_codec",
    "parse_codec",
    "require_logprobs",
    "value_bits_help",
]

CODECS: dict[str, type[Codec]] = {c.name: c for c in (FullCodec, ValuesCodec, ShapeCodec, RawCodec, SampledCodec)}
CODEC_NAMES = tuple(CODECS)  # ("full", "values", "shape", "raw", "sampled")
LATEST_SCHEMA_VERSION = 4  # fusion_cache/cache/schema.py re-exports it as SCHEMA_VERSION


def get_codec(name: str) -> type[Codec]:
    """The codec class registered under ``name``; raises ConfigError naming the valid names."""
    return lookup(CODECS, name, "codec")


def codec_help() -> str:
    """One line naming every codec with its description (the CLI's --codec help)."""
    return ", ".join(f"{name} ({c.description})" for name, c in CODECS.items())


def value_bits_help() -> str:
    """Which codecs take --value-bits, with their defaults: ``full/values/shape codecs (default 6/8/8)``."""
    quantized = [c for c in CODECS.values() if c.default_value_bits is not None]
    names = "/".join(c.name for c in quantized)
    return f"{names} codecs (default {'/'.join(str(c.default_value_bits) for c in quantized)})"


def make_codec(
    name: str,
    *,
    value_bits: int | None = None,
    vocab_size: int | None = None,
    zstd_level: int | None = None,
    samples: int | None = None,
    seed: int | None = None,
) -> Codec:
    """The codec a build writes, from its options (``--codec``, ``--value-bits``; ``--samples`` and ``--seed`` of a
    sampled capture, which only the codecs with ``has_counts`` store); raises ConfigError on bad values."""
    cls = get_codec(name)
    if cls.has_counts:
        codec = cls.from_options(
            value_bits=value_bits, zstd_level=zstd_level, vocab_size=vocab_size, samples=samples, seed=seed
        )
    elif samples is not None:
        raise ConfigError(f"codec {name!r} stores a top-K, not {samples} sampled tokens; use --codec sampled")
    else:
        codec = cls.from_options(value_bits=value_bits, zstd_level=zstd_level, vocab_size=vocab_size)
    try:  # the ranges a reader accepts
        return parse_codec(codec.to_json())
    except ShardFormatError as e:
        raise ConfigError(str(e)) from None


def parse_codec(raw: object, where: str = "codec", schema_version: int = LATEST_SCHEMA_VERSION) -> Codec:
    """Validate a codec dict from a manifest or schema metadata (untrusted) against its schema version.

    Raises ShardFormatError naming ``where`` and the value: an unknown name or parameter, a parameter out of range,
    or a codec (or parameter) that the schema version does not have.
    """
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{where}: must be an object like {{'name': 'raw'}}, got {raw!r}")
    name = raw.get("name")
    if name not in CODECS:
        raise ShardFormatError(f"{where}: codec {name!r} is unknown; this version reads {list(CODEC_NAMES)}")
    if schema_version not in range(1, LATEST_SCHEMA_VERSION + 1):
        raise ShardFormatError(f"{where}: schema_version {schema_version!r} is unknown")
    cls = CODECS[name]
    if schema_version < cls.since_version:
        has = sorted(n for n, c in CODECS.items() if c.since_version <= schema_version)
        raise ShardFormatError(f"{where}: schema_version {schema_version} has no codec {name!r} (it has {has})")
    allowed = cls.param_names(schema_version)
    extra = set(raw) - allowed
    missing = allowed - set(raw)
    if extra or missing:
        raise ShardFormatError(
            f"{where}: codec {name!r} in schema_version {schema_version} takes exactly {sorted(allowed)}; "
            f"unknown {sorted(extra)}, missing {sorted(missing)}"
        )

    def read(key: str, lo: int, hi: int) -> int:
        v = raw[key]
        if type(v) is not int or not lo <= v <= hi:
            raise ShardFormatError(f"{where}: codec {name!r} {key}={v!r} must be an integer in [{lo}, {hi}]")
        return v

    return cls.from_params(read, schema_version)


def require_logprobs(codec: Codec, what: str) -> None:
    """Refuse a use of the values that needs true log-probabilities (``what``) on a cache that has none (``shape``)."""
    if not codec.has_logprobs:
        rebuild = [name for name, c in CODECS.items() if c.has_logprobs]
        raise ConfigError(
            f"{what} needs the teacher's true log-probabilities, but a {codec.name!r} cache stores only the "
            "standardized shape of each row's sorted values (enough for the z-scored ULD loss only); use the "
            f"default z-scored ULD loss, or rebuild the cache with --codec {', '.join(rebuild[:-1])} or {rebuild[-1]}"
        )
