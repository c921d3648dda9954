"""collate: the student's answer positions and each teacher's rows, values, ids and combine weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from fusion_cache.errors import ConfigError
from fusion_cache.train.batch import PaddedCollator
from fusion_cache.train.batch import answer_text_bytes
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


# ---- the padded layout: every tensor has dim 0 = B, so accelerate's split along dim 0 keeps samples whole
def _same(a, b) -> bool:
    """Recursive equality of two collated batches (dicts, lists, None, tensors of the same dtype)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and torch.equal(a, b)


def _stream(caches, tok_dir, **kw):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    kw = {"max_length": 4096, "rank": 0, "world_size": 1, **kw}
    return DistillStream([str(c) for c in caches], tok, chat_template=True, **kw)


@pytest.mark.parametrize(
    ("which", "combine", "kw"),
    [
        ("single", "mean", {}),
        ("joined", "uncertainty", {"entropy_k": 8}),
        ("joined", "min_ce", {"answer_scores": True}),
    ],
)
def test_padded_batches_split_along_dim_0_unpad_to_collate(built_cache, multi_caches, tiny_model_dir, which,
                                                          combine, kw):  # fmt: skip
    """accelerate's own concatenate and slice (what its dispatcher does with 2 processes) on padded batches: each
    process's share unpads to exactly `collate` of its examples, with its own combine weights."""
    from accelerate.utils import concatenate
    from accelerate.utils import slice_tensors

    caches = [built_cache] if which == "single" else [multi_caches["a"], multi_caches["b"]]
    stream = _stream(caches, tiny_model_dir, **kw)
    collator = PaddedCollator.for_stream(stream, pad_id=0)
    exs = list(stream)[:8]
    halves = [exs[: len(exs) // 2], exs[len(exs) // 2 :]]  # the two batches process 0 fetches, 4 samples each
    padded = concatenate([collator(h) for h in halves], dim=0)
    assert all(v.shape[0] == len(exs) for v in padded.values())
    n = len(exs) // 2
    for proc in range(2):
        share = slice_tensors(padded, slice(proc * n, (proc + 1) * n))
        want = collate(halves[proc], 0, len(caches), combine)
        if stream.answer_scores:  # the student gate's divisor travels with the batch
            want["answer_bytes"] = torch.tensor([answer_text_bytes(stream.tokenizer, e) for e in halves[proc]],
                                                dtype=torch.float64)  # fmt: skip
        assert _same(collator.unpad(share, combine), want)
        assert [e.sample_id for e in collator.examples(share)] == [e.sample_id for e in halves[proc]]


def test_the_student_gate_runs_on_an_unpadded_batch_as_in_the_trainer(multi_caches, tiny_model_dir):
    """An HF Trainer user gates with ``loss_from_logits(..., kd_gate=True)`` on ``unpad``'s batch: the same loss and
    open shares as the trainer's batch (`collate` plus ``answer_bytes``), and without scores there is nothing to
    divide by (a clear error, not a silent ungated loss)."""
    from fusion_cache.train.losses import make_loss
    from fusion_cache.train.objective import loss_from_logits

    caches = [multi_caches["a"], multi_caches["b"]]
    stream = _stream(caches, tiny_model_dir, answer_scores=True)
    collator = PaddedCollator.for_stream(stream, pad_id=0)
    exs = list(stream)[:6]
    batch = collator.unpad(collator(exs))
    ref = collate(exs, 0, 2)
    ref["answer_bytes"] = torch.tensor([answer_text_bytes(stream.tokenizer, e) for e in exs], dtype=torch.float64)
    torch.manual_seed(0)
    vocab = max(len(stream.tokenizer), int(ref["teachers"][0]["ids"].max()) + 1)
    logits = torch.randn(batch["answer_index"].numel(), vocab, dtype=torch.float64)
    losses = [make_loss("kl"), make_loss("uld")]  # teacher b has another tokenizer and no ids here
    got = loss_from_logits(logits, batch, losses, lambda_=0.5, kd_gate=True)
    want = loss_from_logits(logits, ref, losses, lambda_=0.5, kd_gate=True)
    assert torch.equal(got.loss, want.loss) and got.gate_open == want.gate_open
    plain = PaddedCollator.for_stream(_stream(caches, tiny_model_dir), pad_id=0)
    assert plain.tokenizer is None and "answer_bytes" not in plain(exs)
    with pytest.raises(ValueError, match="answer_bytes"):
        loss_from_logits(logits, collator.unpad({k: v for k, v in collator(exs).items() if k != "answer_bytes"}),
                         losses, lambda_=0.5, kd_gate=True)  # fmt: skip


def test_padded_layout_of_another_tokenizer_and_refusals(multi_caches, tiny_model_dir):
    caches = [multi_caches["a"], multi_caches["b"]]
    collator = PaddedCollator.for_stream(_stream(caches, tiny_model_dir, targets=["values", "values"]), 0)
    assert collator.widths == (8, 6) and collator.ids == (True, False)
    exs = list(_stream(caches, tiny_model_dir))[3:7]
    assert "teacher1_ids" not in collator(exs) and collator(exs)["teacher1_values"].shape == (4, 4096, 6)
    with pytest.raises(ConfigError, match="rank 1 of 2 reads only its part"):
        PaddedCollator.for_stream(_stream(caches, tiny_model_dir, rank=1, world_size=2), 0)
    short = PaddedCollator(0, 8, collator.widths, collator.ids)
    with pytest.raises(ConfigError, match="length: 8, but sample"):
        short(exs)


ACCELERATE_WORKER = """
import json, sys
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer
from fusion_cache.train.batch import PaddedCollator, collate
from fusion_cache.train.distributed import leave_group
from fusion_cache.train.stream import DistillStream

accelerator = Accelerator(cpu=True)
tok = AutoTokenizer.from_pretrained(sys.argv[2])
stream = DistillStream(sys.argv[1], tok, chat_template=True, max_length=512, rank=0, world_size=1)
collator = PaddedCollator.for_stream(stream, tok.pad_token_id)
loader = accelerator.prepare(torch.utils.data.DataLoader(stream, batch_size=2, collate_fn=collator))
seen, same = [], True
for padded in loader:
    examples = collator.examples(padded)
    batch, ref = collator.unpad(padded), collate(examples, tok.pad_token_id, 1)
    same &= bool(torch.equal(batch["answer_index"], ref["answer_index"]))
    same &= bool(torch.equal(batch["teachers"][0]["values"], ref["teachers"][0]["values"]))
    seen.append([e.sample_id for e in examples])
out = accelerator.gather_for_metrics([[accelerator.process_index, accelerator.num_processes, same, seen]])
if accelerator.is_main_process:
    print("RESULT " + json.dumps(out))
leave_group()  # a barrier, then time for gloo's threads to free their tensors, then the group is destroyed
"""


@pytest.mark.slow
def test_accelerate_prepare_on_two_cpu_processes_dispatches_whole_samples(built_cache, tiny_model_dir, tmp_path):
    """The real accelerate: `prepare` of a DataLoader of padded batches under torchrun with 2 gloo processes; each
    process gets whole samples, the two together every sample once, and unpads them to the flat layout."""
    import json
    import os
    import subprocess
    import sys

    from fusion_cache.cache.reader import CacheReader

    script = tmp_path / "worker.py"
    script.write_text(ACCELERATE_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(built_cache), str(tiny_model_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert [p[:3] for p in parts] == [[0, 2, True], [1, 2, True]]
    seen = [sid for p in parts for batch in p[3] for sid in batch]
    every = {r.sample_id for r in CacheReader(built_cache).iter_rows()}
    # process 0 fetches 2 batches of 2 per step and each process gets 2 whole samples; the 4 rows fill one step
    assert sorted(seen) == sorted(every) and [len(b) for p in parts for b in p[3]] == [2, 2]
