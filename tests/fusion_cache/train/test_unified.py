"""Unified fusion: several caches (one with another tokenizer) joined, aligned, combined, and trained on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer

from fusion_cache.cache.reader import CacheReader
from fusion_cache.errors import ConfigError
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.objective import forward_losses
from fusion_cache.train.stream import CacheStream
from fusion_cache.train.stream import collate
from fusion_cache.train.trainer import run_train
from fusion_cache.train.unified import UnifiedStream
from fusion_cache.train.unified import collate_unified
from fusion_cache.train.unified import unified_losses


@pytest.fixture(scope="module")
def student(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tok


def _stream(caches, tok, **kw):
    return UnifiedStream([str(c) for c in caches], tok, chat_template=True, max_length=4096, k=8, **kw)


def test_two_copies_of_one_teacher_reduce_to_single_teacher_kd(tmp_path, multi_caches, student):
    model, tok = student
    a = multi_caches["a"]
    twin = shutil.copytree(a, tmp_path / "twin")
    single = list(CacheStream(str(a), tok, chat_template=True, max_length=4096))[:4]
    uni = list(_stream([a, twin], tok))[:4]
    assert [e.sample_id for e in uni] == [e.sample_id for e in single]
    ref = forward_losses(model, collate(single, 0), lambda_=0.5, k=8)
    for combine, scale in (("mean", 1.0), ("sum", 2.0), ("uncertainty", 1.0)):
        o = unified_losses(model, collate_unified(uni, 0, 2, combine), lambda_=0.5, k=8)
        torch.testing.assert_close(o.ce, ref.ce)
        torch.testing.assert_close(o.uld, scale * ref.uld.detach())
        assert o.teacher_uld == pytest.approx([float(ref.uld.detach())] * 2)
        assert (o.top1_hits, o.top1_total) == (2 * ref.top1_hits, 2 * ref.top1_total)
        torch.testing.assert_close(o.loss, 0.5 * ref.ce + 0.5 * scale * ref.uld)


def test_cross_tokenizer_teacher_and_missing_samples(multi_caches, student):
    _, tok = student
    a, b = multi_caches["a"], multi_caches["b"]
    stream = _stream([a, b], tok)
    assert stream.same_tokenizer == [True, False] and stream.names == ["tiny-qwen2", "tiny-llama"]
    exs = list(stream)
    assert len(exs) == 8
    assert [e.teachers[1] is not None for e in exs] == [True] * 5 + [False] * 3  # rows 5-7: teacher a only
    b_rows = {r.sample_id: r for r in CacheReader(b).iter_rows()}
    for e in exs[:5]:
        t = e.teachers[1]
        assert t.top1 is None and t.values.shape[1] == 6 and t.entropy.shape == (len(t.student_rows),)
        # the values are the cache's rows that the byte alignment picked (row 0 pairs with row 0)
        row = b_rows[e.sample_id]
        assert t.student_rows[0] == 0 and np.array_equal(t.values[0], row.topk_logprobs[0])
        assert len(t.student_rows) < len(e.input_ids) - e.answer_start  # different granularity: some dropped
    counts = stream.counts()
    assert counts["join"] == {
        "samples": 8,
        "complete": 5,
        "missing": {"tiny-qwen2": 0, "tiny-llama": 3},
        "duplicates": 0,
    }
    al = counts["align"]["tiny-llama"]
    assert al["samples"] == 5 and al["aligned"] > 0 and al["dropped_student"] > 0 and al["samples_without_pairs"] == 0
    assert counts["align"]["tiny-qwen2"]["dropped_student"] == 0  # same tokenizer: every row
    index = list(_stream([a, b], tok, align_mode="index"))
    for e in index[:5]:
        t = e.teachers[1]
        assert t.student_rows.tolist() == list(range(len(t.student_rows)))


@pytest.mark.parametrize("combine", ["mean", "sum", "uncertainty"])
def test_collate_weights_and_backward(multi_caches, student, combine):
    model, tok = student
    exs = list(_stream([multi_caches["a"], multi_caches["b"]], tok))[3:7]  # 2 samples with both, 2 with a only
    batch = collate_unified(exs, 0, 2, combine)
    total = sum(float(t["loss_weights"].sum()) for t in batch["teachers"])
    assert total == pytest.approx(1.5 if combine == "sum" else 1.0, rel=1e-5)  # sum: mean over samples of |S_b|
    for t in batch["teachers"]:
        assert float(t["log_weights"].sum()) == pytest.approx(1.0, rel=1e-5)  # each teacher's own mean
        assert t["rows"].max() < batch["answer_targets"].numel()
    flat = batch["input_ids"].reshape(-1)
    assert (flat[batch["answer_index"] + 1] == batch["answer_targets"]).all()
    model.zero_grad()
    o = unified_losses(model, batch, lambda_=0.3, k=8)
    o.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(v is not None and 0 <= v <= 2 for v in o.teacher_uld)
    torch.testing.assert_close(o.loss.detach(), 0.7 * o.ce.detach() + 0.3 * o.uld)


@pytest.mark.slow
def test_run_train_unified_logs_each_teacher(tmp_path, multi_caches, tiny_model_dir):
    cfg = TrainConfig.create(
        student=str(tiny_model_dir), shards=[str(multi_caches["a"]), str(multi_caches["b"])], out=str(tmp_path),
        mode="unified", combine="uncertainty", batch_size=2, max_steps=3, top_k=6, lr=1e-3, save=False,
    )  # fmt: skip
    res = run_train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["uld_tiny-qwen2"] is not None and r["loss"] > 0 for r in lines)
    assert any(r["uld_tiny-llama"] is not None for r in lines)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["teachers"] == ["tiny-qwen2", "tiny-llama"] == res.summary["teachers"]
    assert summary["fusion"]["join"]["missing"]["tiny-llama"] >= 1 and summary["fusion"]["align_mode"] == "bytes"


def _ids_and_values(examples) -> list[tuple]:
    return [
        (e.sample_id, e.input_ids.tolist(), [None if t is None else t.values.tobytes() for t in e.teachers])
        for e in examples
    ]


def test_the_joined_stream_resumes_exactly_at_every_example(multi_caches, student):
    _, tok = student
    caches = [multi_caches["a"], multi_caches["b"]]
    opts = dict(shuffle_buffer=3, seed=5, epochs=2)
    full = list(_stream(caches, tok, **opts))
    assert len(full) == 16 and len({e.sample_id for e in full}) == 8
    ref_counts = _stream(caches, tok, **opts)
    list(ref_counts)
    for cut in range(len(full) + 1):
        it = _stream(caches, tok, **opts).iterator()
        head = [next(it) for _ in range(cut)]
        state = json.loads(json.dumps(it.state_dict()))  # what a checkpoint stores
        resumed = _stream(caches, tok, **opts)
        tail = list(resumed.iterator(state))
        assert _ids_and_values(head + tail) == _ids_and_values(full), cut
        assert resumed.counts() == ref_counts.counts()  # replayed: the counts are the uninterrupted run's
    state = _stream(caches, tok, **opts).iterator().state_dict()
    with pytest.raises(ConfigError, match="fingerprints"):
        _stream(caches[::-1], tok, **opts).iterator(state)
    with pytest.raises(ConfigError, match="rank 0 of 1, loaded by rank 1 of 2"):
        _stream(caches, tok, rank=1, world_size=2, **opts).iterator(state)
    with pytest.raises(ConfigError, match="past the end"):
        _stream(caches, tok, **opts).iterator({**state, "yielded": 17})


def test_ranks_split_the_joined_samples(multi_caches, student):
    _, tok = student
    caches = [multi_caches["a"], multi_caches["b"]]
    ranks = [[e.sample_id for e in _stream(caches, tok, rank=r, world_size=2)] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(e.sample_id for e in _stream(caches, tok))
    assert abs(len(ranks[0]) - len(ranks[1])) <= 1
    with pytest.raises(ConfigError, match="rank: must be in"):
        _stream(caches, tok, rank=2, world_size=2)


@pytest.mark.slow
def test_a_unified_run_resumes_to_the_same_losses_and_weights(tmp_path, multi_caches, tiny_model_dir):
    from safetensors.torch import load_file

    from fusion_cache.train.checkpoint import list_checkpoints

    def cfg(out, **kw):
        return TrainConfig.create(
            student=str(tiny_model_dir), shards=[str(multi_caches["a"]), str(multi_caches["b"])], out=str(out),
            mode="unified", combine="uncertainty", batch_size=2, max_steps=5, top_k=6, lr=1e-3, shuffle_buffer=3,
            checkpoint_every=2, keep_checkpoints=None, device="cpu", **kw,
        )  # fmt: skip

    def curve(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]

    ref = tmp_path / "ref"
    run_train(cfg(ref), progress=False)
    assert [s for s, _ in list_checkpoints(ref)] == [2, 4]
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    shutil.rmtree(list_checkpoints(run)[-1][1])  # died after the checkpoint at step 2 (steps 3-5 are replayed)
    shutil.rmtree(run / "model")
    res = run_train(cfg(run, resume=True), progress=False)
    assert curve(run) == curve(ref)
    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res.summary["fusion"] == json.loads((ref / "summary.json").read_text())["fusion"]


def test_config_rules_for_several_caches(tmp_path):
    base = dict(student="s", out=str(tmp_path))
    with pytest.raises(ConfigError, match="use mode 'unified'"):
        TrainConfig.create(shards=["a", "b"], **base)
    with pytest.raises(ConfigError, match="given twice"):
        TrainConfig.create(shards=["a", "a"], mode="unified", **base)
    with pytest.raises(ConfigError, match="align 'bytes'"):
        TrainConfig.create(shards=["a"], align="bytes", **base)
    with pytest.raises(ConfigError, match="combine"):
        TrainConfig.create(shards=["a", "b"], mode="unified", combine="max", **base)
    cfg = TrainConfig.create(shards=["a", "b"], mode="unified", **base)
    assert (cfg.combine, cfg.align) == ("mean", "bytes")
