"""The codec registry (fusion_cache/cache/codecs/__init__.py): names, parameters per schema version, the build
options, the settings and training modes it refuses. The writer/reader round trip of every registered codec is in
tests/fusion_cache/cache/test_codecs.py."""

from __future__ import annotations

import dataclasses
import re

import pytest

from fusion_cache.cache.codecs import CODEC_NAMES
from fusion_cache.cache.codecs import CODECS
from fusion_cache.cache.codecs import Codec
from fusion_cache.cache.codecs import codec_help
from fusion_cache.cache.codecs import get_codec
from fusion_cache.cache.codecs import make_codec
from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.schema import READABLE_SCHEMA_VERSIONS
from fusion_cache.capture.config import BuildConfig
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError


def test_unknown_codec_names_are_refused_naming_the_valid_ones():
    valid = re.escape(str(list(CODEC_NAMES)))
    names = re.escape(", ".join(CODEC_NAMES))
    with pytest.raises(ConfigError, match=f"codec: unknown value 'zip9'; valid values: {names}"):
        get_codec("zip9")
    with pytest.raises(ConfigError, match=f"codec: unknown value 'zip9'; valid values: {names}"):
        make_codec("zip9")
    with pytest.raises(ShardFormatError, match=f"codec 'zip9' is unknown; this version reads {valid}"):
        parse_codec({"name": "zip9"})
    # the build settings take their names from the registry: the error names the field, the value and every name
    names = ", ".join(map(repr, CODEC_NAMES[:-1])) + f" or {CODEC_NAMES[-1]!r}"  # 'full', 'values', 'shape' or 'raw'
    with pytest.raises(ConfigError, match=re.escape(f"codec: Input should be {names} (got 'zip9')")):
        BuildConfig.create(teacher="t", data="d", out="o", codec="zip9")
    assert set(BuildConfig.model_json_schema()["properties"]["codec"]["enum"]) == set(CODEC_NAMES)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_every_registered_codec_declares_itself_and_survives_its_manifest_entry(name):
    cls = get_codec(name)
    assert issubclass(cls, Codec) and cls.name == name and CODECS[name] is cls
    assert cls.description and "\n" not in cls.description and f"{name} ({cls.description})" in codec_help()
    assert cls.since_version in READABLE_SCHEMA_VERSIONS
    sampled = {"samples": 12} if cls.has_counts else {}  # a sampled capture's codec needs its N
    codec = make_codec(name, vocab_size=300, **sampled)
    assert dataclasses.is_dataclass(codec) and hash(codec) == hash(parse_codec(codec.to_json()))
    assert parse_codec(codec.to_json()) == codec and codec.to_json()["name"] == name
    assert set(codec.to_json()) == cls.param_names(max(READABLE_SCHEMA_VERSIONS))
    if cls.default_value_bits is None:  # takes no value bits
        with pytest.raises(ConfigError, match="--value-bits"):
            make_codec(name, value_bits=8, vocab_size=300, **sampled)
    else:
        assert make_codec(name, vocab_size=300).to_json()["value_bits"] == cls.default_value_bits
        assert make_codec(name, value_bits=5, vocab_size=300).to_json()["value_bits"] == 5
    for version in READABLE_SCHEMA_VERSIONS:
        if version < cls.since_version:
            with pytest.raises(ShardFormatError, match=f"schema_version {version} has no codec {name!r}"):
                parse_codec(codec.to_json(), schema_version=version)


def test_codec_parameters_are_validated():
    with pytest.raises(ConfigError, match="unknown value 'zip9'"):
        make_codec("zip9")
    with pytest.raises(ConfigError, match="value_bits=40"):
        make_codec("full", value_bits=40, vocab_size=100)
    with pytest.raises(ConfigError, match="raw codec"):
        make_codec("raw", value_bits=8)
    assert make_codec("full", vocab_size=49152).id_bytes == 2
    assert make_codec("full", vocab_size=151936).to_json() == {
        "name": "full",
        "value_bits": 6,
        "id_bytes": 3,
        "zstd_level": 16,
        "layout": 4,
    }
    with pytest.raises(ConfigError, match="at most 2\\^24 ids"):
        make_codec("full", vocab_size=1 << 25)
    full2 = {"name": "full", "value_bits": 6, "id_bytes": 2, "zstd_level": 3, "layout": 2}
    full1 = {k: v for k, v in full2.items() if k != "layout"}
    shape = {"name": "shape", "value_bits": 8, "zstd_level": 3}
    full3 = {**full2, "layout": 3}
    full4 = {**full2, "layout": 4}
    assert parse_codec(full1, schema_version=2).layout is None and parse_codec(full2, schema_version=3).layout == 2
    assert parse_codec(full3, schema_version=3).layout == 3 and parse_codec(full3, schema_version=3).companding == "log"
    assert parse_codec(full4).layout == 4 and parse_codec(full4).order_in_manifest
    assert parse_codec(full4).shard_entry_fields() == ("id_order",)
    assert not parse_codec(full3, schema_version=3).order_in_manifest
    assert parse_codec(shape).name == "shape" and not parse_codec(shape).has_logprobs
    for bad, version, why in (
        ({"name": "full", "value_bits": 7}, 3, "missing"),
        ({"name": "values", "value_bits": 8, "zstd_level": 3, "x": 1}, 3, "unknown \\['x'\\]"),
        ({"name": "values", "value_bits": "8", "zstd_level": 3}, 3, "value_bits='8'"),
        (["raw"], 3, "must be an object"),
        (full1, 3, "missing \\['layout'\\]"),  # version 3 records the layout
        (full2, 2, "unknown \\['layout'\\]"),  # version 2 had none
        ({**full2, "layout": 1}, 3, "layout=1"),
        ({**full2, "layout": 4}, 3, "layout=4"),
        ({**full2, "id_bytes": 4}, 3, "id_bytes=4"),
        ({**full3, "id_bytes": 4}, 3, "id_bytes=4"),
        (full3, 2, "unknown \\['layout'\\]"),
        (shape, 2, "schema_version 2 has no codec 'shape'"),
        (shape, 1, "schema_version 1 has no codec 'shape'"),
        ({"name": "zip9"}, 3, "unknown"),
        (full3, 4, "layout=3"),  # version 4 has layout 4 only: the id order in the manifest
        (full4, 3, "layout=4"),
        (shape, 5, "schema_version 5 is unknown"),
    ):
        with pytest.raises(ShardFormatError, match=why):
            parse_codec(bad, schema_version=version)
