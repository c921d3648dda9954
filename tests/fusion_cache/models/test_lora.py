"""LoRA students on the tiny model: training moves the adapters only, the saved model is the student with them
merged in (or the adapter alone, which eval, load and merge read), and a resumed LoRA run equals the uninterrupted
one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fusion_cache.errors import ConfigError
from fusion_cache.merge.config import MergeConfig
from fusion_cache.merge.run import run_merge
from fusion_cache.models.load import load_student
from fusion_cache.models.lora import LoraSettings
from fusion_cache.models.lora import add_lora
from fusion_cache.models.lora import is_adapter_dir
from fusion_cache.train.checkpoint import list_checkpoints
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.trainer import run_train

pytest.importorskip("peft")


def _cfg(student, cache, out, **kw) -> TrainConfig:
    base = dict(student=str(student), cache=[str(cache)], out=str(out), batch_size=2, lr=1e-2, max_steps=4,
                shuffle_buffer=3, device="cpu", lora_r=4, top_k=4)  # fmt: skip
    return TrainConfig.create(**{**base, **kw})


def test_a_lora_run_trains_the_adapters_and_saves_the_merged_student(tmp_path, tiny_model_dir, built_cache):
    res = run_train(_cfg(tiny_model_dir, built_cache, tmp_path / "run"), progress=False)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["lora"] == {"r": 4, "merged": True}
    merged = load_file(str(tmp_path / "run/model/model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert merged.keys() == base.keys()  # a plain checkpoint of the student's class: no lora_ weights
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen
    changed = [k for k in base if "proj" in k and not torch.equal(merged[k], base[k])]
    assert changed  # the adapted linear layers moved
    assert res.summary["steps"] == 4


def test_an_unmerged_adapter_loads_evaluates_and_merges(tmp_path, tiny_model_dir, built_cache):
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        run_train(_cfg(tiny_model_dir, built_cache, run, merge_adapter=False, seed=seed), progress=False)
        assert is_adapter_dir(run / "model") and (run / "model/adapter_model.safetensors").exists()
        runs.append(run)
    model, tok, _ = load_student(str(runs[0] / "model"))
    assert type(model).__name__ == "Qwen2ForCausalLM" and tok.vocab_size > 0
    summary = run_merge(MergeConfig.create(base=str(tiny_model_dir), models=[str(r) for r in runs], method="ta",
                                           out=str(tmp_path / "merged")), progress=False)  # fmt: skip
    assert summary["models"] == [str(r) for r in runs] and (tmp_path / "merged/config.json").exists()


def test_a_resumed_lora_run_equals_the_uninterrupted_one(tmp_path, tiny_model_dir, built_cache):
    ref = tmp_path / "ref"
    run_train(_cfg(tiny_model_dir, built_cache, ref, checkpoint_every=2, keep_checkpoints=None), progress=False)
    run = tmp_path / "cut"
    shutil.copytree(ref, run)
    for step, path in list_checkpoints(run):
        if step > 2:
            shutil.rmtree(path)
    shutil.rmtree(run / "model")
    run_train(_cfg(tiny_model_dir, built_cache, run, checkpoint_every=2, keep_checkpoints=None, resume=True),
              progress=False)  # fmt: skip

    def curve(d):
        return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}
                for x in (d / "metrics.jsonl").read_text().splitlines()]  # fmt: skip

    assert curve(run) == curve(ref)
    a, b = load_file(str(ref / "model/model.safetensors")), load_file(str(run / "model/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_target_the_model_lacks_is_refused(tiny_model_dir):
    model, _, _ = load_student(str(tiny_model_dir))
    with pytest.raises(ConfigError, match="lora_targets"):
        add_lora(model, LoraSettings(r=2, targets=("no_such_proj",)))
    with pytest.raises(ValueError, match="fsdp"):
        TrainConfig.create(student="s", cache=["c"], out="o", lora_r=4, fsdp=True)
