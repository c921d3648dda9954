"""`resolve_teacher`: the teacher's tokenizer, engine and dtype, and the longest sequence its engine scores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.teacher import engine_length_limit
from fusion_cache.capture.teacher import resolve_teacher


def test_the_longest_sequence_is_set_by_the_teachers_positions_and_the_engine(tiny_model_dir, hf_engine):
    # the tiny teacher has 2048 positions: HF scores 2048 tokens; vLLM must generate one token after the prompt and
    # refuses max_model_len > 2048, so it takes 2047; a started vLLM engine also caps at its own max_model_len - 1
    assert engine_length_limit(str(tiny_model_dir), "hf", hf_engine) == 2048
    assert engine_length_limit(str(tiny_model_dir), "vllm", None) == 2047

    class Started:
        max_model_len = 1024

    assert engine_length_limit(str(tiny_model_dir), "vllm", Started()) == 1023


def test_a_given_engine_decides_the_engine_name_and_dtype(tiny_model_dir, hf_engine):
    cfg = BuildConfig.create(teacher=str(tiny_model_dir), data="d", out="o", engine="vllm", dtype="bfloat16")
    given = resolve_teacher(cfg, hf_engine)
    assert (given.engine, given.dtype, given.length_limit) == ("hf", hf_engine.dtype, 2048)
    alone = resolve_teacher(cfg, None)
    assert (alone.engine, alone.dtype, alone.length_limit) == ("vllm", "bfloat16", 2047)
    assert alone.tokenizer is given.tokenizer  # loaded once per process
    assert alone.model.revision.startswith("local-")


# Run in a fresh interpreter: transformers and huggingface_hub read HF_HUB_CACHE and HF_HUB_OFFLINE at import.
_LOAD_AT_REVISION = """
import json, sys
from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.engines import make_engine
from fusion_cache.capture.teacher import resolve_teacher
cfg = BuildConfig.create(teacher=sys.argv[1], data="d", out="o", engine="hf")
t = resolve_teacher(cfg, None)
engine = make_engine("hf", t.model.path, dtype="float32", revision=t.model.load_revision)
print(json.dumps([t.model.revision, t.length_limit, engine.model.config.max_position_embeddings]))
"""


def test_the_recorded_revision_is_the_one_loaded(tmp_path, tiny_model_dir):
    """A stand-in for the Hub: a hub cache layout (refs/<branch> -> snapshots/<sha>) of two commits of one repo
    that differ in their positions, read offline by the real loaders. Not tested against the live Hub: resolving
    a branch that is not in the local cache (the revision is then recorded and passed on as given)."""
    repo = tmp_path / "hub" / "models--org--tiny"
    shas = {"main": "1" * 40, "v1": "2" * 40}
    for ref, positions in (("main", 2048), ("v1", 512)):
        snap = repo / "snapshots" / shas[ref]
        shutil.copytree(tiny_model_dir, snap)
        config = json.loads((snap / "config.json").read_text())
        (snap / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(shas[ref])
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def load(teacher: str) -> list:
        r = subprocess.run([sys.executable, "-c", _LOAD_AT_REVISION, teacher], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    # the commit a branch names is recorded, and the tokenizer, the config and the engine load that commit
    assert load("org/tiny@v1") == [shas["v1"], 512, 512]
    assert load("org/tiny") == [shas["main"], 2048, 2048]
    assert load(f"org/tiny@{shas['v1']}") == [shas["v1"], 512, 512]
    # a snapshot directory given as a local path records its commit
    from fusion_cache.models.presets import resolve_model

    assert resolve_model(str(repo / "snapshots" / shas["v1"])).revision == shas["v1"]
