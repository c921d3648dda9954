"""The records of an interrupted build: its settings (and the error that names what differs), its complete parts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion_cache.cache.fingerprint import file_sha256
from fusion_cache.cache.resume import check_build_state
from fusion_cache.cache.resume import clear_resume_records
from fusion_cache.cache.resume import load_completed_parts
from fusion_cache.cache.resume import open_work_dir
from fusion_cache.cache.resume import part_name
from fusion_cache.cache.resume import read_build_state
from fusion_cache.cache.resume import state_differences
from fusion_cache.cache.resume import write_build_state
from fusion_cache.cache.resume import write_part_record
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


# ---------------------------------------------------------------------------------------------------------------
# part records (the crash windows of a real build: capture/test_build_resume.py)


def _complete_part(work: Path, index: int, data: bytes, rows: int = 2) -> None:
    """A part as ShardWriter leaves it: the file renamed into place, then its record."""
    path = work / f"{part_name(index)}.arrow"
    path.write_bytes(data)
    record = {"index": index, "file": path.name, "rows": rows, "answer_tokens": 5, "bytes": len(data)}
    write_part_record(work, {**record, "sha256": file_sha256(path)})


def test_parts_are_kept_in_order_up_to_the_first_bad_one(tmp_path):
    for i in range(4):
        _complete_part(tmp_path, i, f"part {i}".encode())
    (tmp_path / "part-00001.arrow").write_bytes(b"part X")  # same size, other bytes
    (tmp_path / "part-00004.arrow.tmp").write_bytes(b"half written")
    write_build_state(tmp_path, STATE)
    parts = load_completed_parts(tmp_path)
    assert [p["index"] for p in parts] == [0] and parts[0]["file"] == "part-00000.arrow"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build-state.json", "part-00000.arrow", "part-00000.json"]


def test_a_gap_or_a_torn_record_ends_the_complete_parts(tmp_path):
    for i in range(3):
        _complete_part(tmp_path, i, f"part {i}".encode())
    (tmp_path / "part-00002.json").unlink()
    (tmp_path / "part-00001.json").write_text('{"index": ')
    assert [p["index"] for p in load_completed_parts(tmp_path)] == [0]


def test_a_part_already_renamed_to_its_shard_name_is_found_and_named_back(tmp_path):
    _complete_part(tmp_path, 0, b"part 0")
    (tmp_path / "part-00000.arrow").rename(tmp_path / "shard-00000-of-00001.arrow")
    assert [p["file"] for p in load_completed_parts(tmp_path)] == ["part-00000.arrow"]
    assert (tmp_path / "part-00000.arrow").read_bytes() == b"part 0"


def test_open_work_dir_starts_resumes_or_refuses(tmp_path):
    work = tmp_path / "cache.incomplete"
    assert open_work_dir(work, STATE, resume=False, overwrite=False) == ([], None)
    assert read_build_state(work) == STATE
    _complete_part(work, 0, b"part 0")
    with pytest.raises(ConfigError, match=r"interrupted build with 1 complete shard\(s\); pass --resume"):
        open_work_dir(work, STATE, resume=False, overwrite=False)
    parts, finished = open_work_dir(work, STATE, resume=True, overwrite=False)
    assert [p["index"] for p in parts] == [0] and finished is None
    with pytest.raises(ConfigError, match=r"different settings \(k: 8 then, 4 now\)"):
        open_work_dir(work, {**STATE, "k": 4}, resume=True, overwrite=False)
    assert open_work_dir(work, STATE, resume=False, overwrite=True) == ([], None)
    assert sorted(p.name for p in work.iterdir()) == ["build-state.json"]


def test_clear_resume_records_leaves_only_the_cache(tmp_path):
    _complete_part(tmp_path, 0, b"part 0")
    write_build_state(tmp_path, STATE)
    clear_resume_records(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.arrow"]


def test_a_resumed_full_layout4_build_keeps_each_parts_id_order(tmp_path, synthetic_caches):
    """The id order of a full layout 4 part lives in its record until the manifest takes it: a resumed writer's
    shards equal an uninterrupted one's, id orders included."""
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.cache.writer import ShardWriter

    reader = CacheReader(synthetic_caches["full"])
    rows = list(reader.iter_rows())
    m = reader.manifest
    prov = {"schema_version": m.schema_version, "k": m.k, "codec": m.codec, "config_fingerprint": "0" * 64}
    with ShardWriter(tmp_path / "whole", prov, shard_rows=2) as w:
        w.write_rows(rows)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt), ShardWriter(work, prov, shard_rows=2) as killed:
        killed.write_rows(rows[:5])  # parts 0 and 1 complete, part 2 open
        raise KeyboardInterrupt
    completed = load_completed_parts(work)
    assert [p["rows"] for p in completed] == [2, 2] and all("id_order" in p for p in completed)
    with ShardWriter(work, prov, shard_rows=2, completed=completed) as resumed:
        resumed.write_rows(rows[4:])
    assert len(w.shards) == 3 and resumed.shards == w.shards and all("id_order" in s for s in resumed.shards)
    without = [{k: v for k, v in p.items() if k != "id_order"} for p in completed]
    with pytest.raises(ValueError, match="part record 'part-00000.arrow' lacks \\['id_order'\\], which codec full"):
        ShardWriter(tmp_path / "other", prov, completed=without)
