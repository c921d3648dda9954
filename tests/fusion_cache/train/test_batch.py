"""collate: the student's answer positions and each teacher's rows, values, ids and combine weights."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fusion_cache.train.batch import collate
from fusion_cache.train.stream import DistillStream


def _examples(caches, tok_dir, **kw):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    return list(DistillStream([str(c) for c in caches], tok, chat_template=True, max_length=4096, entropy_k=8, **kw))


def test_one_teacher_indexes_answer_positions(built_cache, tiny_model_dir):
    exs = _examples([built_cache], tiny_model_dir)[:3]
    b = collate(exs, pad_id=0, n_teachers=1)
    flat = b["input_ids"].reshape(-1)
    # position p predicts token p + 1: the targets are the tokens right after the indexed positions
    assert (flat[b["answer_index"] + 1] == b["answer_targets"]).all()
    (t,) = b["teachers"]
    assert t["rows"].tolist() == list(range(b["answer_targets"].numel()))  # same tokenizer: every answer row
    assert t["values"].shape == t["ids"].shape and t["ids"].dtype.is_floating_point is False
    assert float(t["loss_weights"].sum()) == pytest.approx(1.0, rel=1e-6)  # mean over positions, then batch
    assert int(b["attention_mask"].sum()) == sum(len(e.input_ids) for e in exs)
    assert b["input_ids"].shape[1] == max(len(e.input_ids) for e in exs)


@pytest.mark.parametrize("combine", ["mean", "sum", "uncertainty"])
def test_two_teachers_weights(multi_caches, tiny_model_dir, combine):
    exs = _examples([multi_caches["a"], multi_caches["b"]], tiny_model_dir)[3:7]  # 2 with both, 2 with a only
    batch = collate(exs, 0, 2, combine)
    total = sum(float(t["loss_weights"].sum()) for t in batch["teachers"])
    assert total == pytest.approx(1.5 if combine == "sum" else 1.0, rel=1e-5)  # sum: mean over samples of |S_b|
    for t in batch["teachers"]:
        assert float(t["log_weights"].sum()) == pytest.approx(1.0, rel=1e-5)  # each teacher's own mean
        assert t["rows"].max() < batch["answer_targets"].numel()
        assert (t["rows"][1:] > t["rows"][:-1]).all()  # strictly increasing: what the fused path needs
    assert "ids" in batch["teachers"][0] and "ids" not in batch["teachers"][1]  # another vocabulary: no ids


def test_a_teacher_no_sample_has_is_none(multi_caches, tiny_model_dir):
    exs = _examples([multi_caches["a"], multi_caches["b"]], tiny_model_dir)[5:8]  # rows 5-7: teacher a only
    assert collate(exs, 0, 2)["teachers"][1] is None
