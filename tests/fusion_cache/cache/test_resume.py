"""The recorded settings of an interrupted build and the error that names what differs."""

from __future__ import annotations

import pytest

from fusion_cache.cache.resume import check_build_state
from fusion_cache.cache.resume import state_differences
from fusion_cache.cache.resume import write_build_state
from fusion_cache.errors import ConfigError

STATE = {"k": 8, "teacher": {"name": "a", "dtype": "float32"}, "part": None, "config_fingerprint": "f" * 64}


def test_differences_are_named_by_dotted_field():
    other = {**STATE, "teacher": {"name": "a", "dtype": "bfloat16"}, "part": {"index": 1}}
    assert state_differences(STATE, other) == ["part", "part.index", "teacher.dtype"]
    assert state_differences(STATE, dict(STATE)) == []


def test_check_accepts_the_same_state_and_names_the_differing_field(tmp_path):
    write_build_state(tmp_path, STATE)
    check_build_state(tmp_path, dict(STATE))
    with pytest.raises(ConfigError, match=r"different settings \(k: 8 then, 4 now\)"):
        check_build_state(tmp_path, {**STATE, "k": 4, "config_fingerprint": "e" * 64})


def test_a_missing_or_torn_state_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no readable build-state.json"):
        check_build_state(tmp_path, STATE)
    (tmp_path / "build-state.json").write_text('{"k": ')
    with pytest.raises(ConfigError, match="pass --overwrite to discard it"):
        check_build_state(tmp_path, STATE)
