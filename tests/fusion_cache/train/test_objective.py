"""forward_losses for S >= 1 teachers: the chunked fused lm_head path gives the same losses, metrics and gradients
as the dense one (per-teacher losses included, on the PyTorch backend and on the Triton kernels interpreted on
CPU), and two copies of one teacher reduce to single-teacher KD."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer

from fusion_cache.train import functional
from fusion_cache.train.batch import collate
from fusion_cache.train.losses import ULD
from fusion_cache.train.losses import TopKKL
from fusion_cache.train.losses import make_loss
from fusion_cache.train.objective import forward_losses
from fusion_cache.train.stream import DistillStream


def _student(model_dir, noise=0.05):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The caches were captured from this very model, so unperturbed its ULD distances are ~1e-7: every
    # |p_o - p_s| sits at the kink of the L1, where the gradient is the sign of rounding noise and differs between
    # any two summation orders. Move the student away from the teacher so the gradient is well defined.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


def _batch(caches, tok, n, max_length=256, combine="mean", targets=None):
    maps = None
    if targets is not None:  # a map for every teacher of another tokenizer whose target needs one
        from fusion_cache.cache.reader import CacheReader
        from fusion_cache.train.vocab import teacher_tokenizer
        from fusion_cache.train.vocab import vocab_map

        maps = [vocab_map(teacher_tokenizer(CacheReader(str(c)).manifest), tok) if t != "values" else None
                for c, t in zip(caches, targets, strict=True)]  # fmt: skip
    stream = DistillStream([str(c) for c in caches], tok, chat_template=True, max_length=max_length, entropy_k=8,
                           targets=targets, maps=maps)  # fmt: skip
    return collate(list(itertools.islice(iter(stream), n)), tok.pad_token_id or 0, len(caches), combine)


def _both_paths(model, batch, loss_list, lambda_):
    results = []
    for fused in (False, True):
        model.zero_grad()
        out = forward_losses(model, batch, loss_list, lambda_=lambda_, fused_linear=fused)
        out.loss.backward()
        grads = [p.grad.clone() for p in (model.get_output_embeddings().weight, model.model.norm.weight)]
        results.append((out, grads))
    return results


def _assert_same(results, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-6):
    (dense, g_dense), (fused, g_fused) = results
    for name in ("loss", "ce", "kd"):
        torch.testing.assert_close(getattr(fused, name).detach().float(), getattr(dense, name).detach().float(),
                                   rtol=rtol, atol=atol)  # fmt: skip
    assert fused.teacher_kd == pytest.approx(dense.teacher_kd, rel=rtol, abs=atol)
    assert (fused.answer_tokens, fused.top1_hits, fused.top1_total) == (
        dense.answer_tokens, dense.top1_hits, dense.top1_total)  # fmt: skip
    for a, b in zip(g_fused, g_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=grad_atol)


@pytest.mark.parametrize(
    ("lambda_", "loss"),
    [
        (0.5, ULD(k=8)),
        (1.0, ULD(k=8)),
        (0.0, ULD(k=8)),
        (0.5, ULD(k=8, zscore=False, tail=True)),
        (0.5, TopKKL()),
        (0.5, TopKKL(kd_temperature=2.0)),
        (0.5, TopKKL(kd_temperature=0.5)),
    ],
    ids=str,
)
def test_one_teacher_fused_matches_dense(built_cache, tiny_model_dir, lambda_, loss):
    model = _student(tiny_model_dir)
    batch = _batch([built_cache], AutoTokenizer.from_pretrained(tiny_model_dir), 3)
    functional.set_backend("torch")
    try:
        _assert_same(_both_paths(model, batch, [loss], lambda_))
    finally:
        functional.set_backend(None)


@pytest.mark.parametrize(("combine", "other"), [("mean", "uld"), ("uncertainty", "uld"), ("mean", "mapped_kl"),
                                               ("uncertainty", "hybrid")])  # fmt: skip
def test_two_teachers_with_their_own_losses_fused_matches_dense(multi_caches, tiny_model_dir, combine, other):
    """Teacher a (the student's tokenizer) with the top-K KL, teacher b (another tokenizer) with ULD, the mapped KL
    or the hybrid, in one run."""
    model = _student(tiny_model_dir)
    loss_b = make_loss(other, k=6)
    batch = _batch([multi_caches["a"], multi_caches["b"]], AutoTokenizer.from_pretrained(tiny_model_dir), 4,
                   combine=combine, targets=["values", loss_b.target])  # fmt: skip
    assert all(t is not None for t in batch["teachers"])
    functional.set_backend("torch")
    try:
        results = _both_paths(model, batch, [TopKKL(), loss_b], 0.5)
    finally:
        functional.set_backend(None)
    _assert_same(results)
    dense = results[0][0]
    assert all(v is not None and v > 0 for v in dense.teacher_kd) and dense.top1_total > 0


def test_two_teachers_fused_triton_matches_dense(multi_caches, tiny_model_dir, triton_uld, device):
    """The same on the Triton backend: ULD kernels (sparse gradient) and the in-place CE kernel, interpreted on CPU."""
    model = _student(tiny_model_dir).to(device)
    batch = _batch([multi_caches["a"], multi_caches["b"]], AutoTokenizer.from_pretrained(tiny_model_dir), 2,
                   max_length=48)  # fmt: skip
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["teachers"] = [None if t is None else {k: v.to(device) for k, v in t.items()} for t in batch["teachers"]]
    functional.set_backend("triton")
    try:
        _assert_same(_both_paths(model, batch, [TopKKL(kd_temperature=2.0), ULD(k=6)], 0.5), rtol=1e-4, atol=1e-5,
                     grad_atol=1e-5)  # fmt: skip
    finally:
        functional.set_backend(None)


def test_two_copies_of_one_teacher_reduce_to_single_teacher_kd(tmp_path, multi_caches, tiny_model_dir):
    model = _student(tiny_model_dir, noise=0.0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = multi_caches["a"]
    twin = shutil.copytree(a, tmp_path / "twin")
    single = _batch([a], tok, 4)
    for combine, scale in (("mean", 1.0), ("sum", 2.0), ("uncertainty", 1.0)):
        ref = forward_losses(model, single, [ULD(k=8)], lambda_=0.5)
        o = forward_losses(model, _batch([a, twin], tok, 4, combine=combine), [ULD(k=8)] * 2, lambda_=0.5)
        torch.testing.assert_close(o.ce, ref.ce)
        torch.testing.assert_close(o.kd, scale * ref.kd)
        assert o.teacher_kd == pytest.approx(ref.teacher_kd * 2)
        assert (o.top1_hits, o.top1_total) == (2 * ref.top1_hits, 2 * ref.top1_total)
        torch.testing.assert_close(o.loss, 0.5 * ref.ce + 0.5 * scale * ref.kd)


def test_loss_and_teacher_counts_must_agree(built_cache, tiny_model_dir):
    model = _student(tiny_model_dir, noise=0.0)
    batch = _batch([built_cache], AutoTokenizer.from_pretrained(tiny_model_dir), 2)
    with pytest.raises(ValueError, match="2 losses for a batch of 1 teachers"):
        forward_losses(model, batch, [make_loss("uld"), make_loss("kl")], lambda_=0.5)


def test_auto_keeps_the_dense_path_on_cpu(monkeypatch):
    monkeypatch.delenv("FUSION_CACHE_KERNEL", raising=False)
    assert functional.resolve_backend("cpu") == "torch"  # so fused_linear=None means the dense path here


def test_gate_weights_keep_only_rows_whose_teacher_beats_the_student():
    from fusion_cache.train.objective import gate_weights

    w = torch.tensor([0.25, 0.25, 0.5, 0.5])
    got, keep = gate_weights(w, torch.tensor([0.3, 0.3, 0.9, 0.5], dtype=torch.float64),
                             torch.tensor([0.4, 0.4, 0.8, 0.5], dtype=torch.float64))  # fmt: skip
    assert keep.tolist() == [True, True, False, False]  # a tie is not "better": the student keeps its own
    torch.testing.assert_close(got, torch.tensor([0.25, 0.25, 0.0, 0.0]))


def _gated_batch(multi_caches, tok):
    """Two teachers (a: the student's tokenizer, b: another) over 4 samples, with answer CEs and bytes."""
    stream = DistillStream([str(multi_caches["a"]), str(multi_caches["b"])], tok, chat_template=True, max_length=256,
                           answer_scores=True)  # fmt: skip
    examples = list(itertools.islice(iter(stream), 4))
    batch = collate(examples, tok.pad_token_id or 0, 2, "mean")
    text = [tok.decode(e.input_ids[e.answer_start :].tolist(), skip_special_tokens=True) for e in examples]
    batch["answer_bytes"] = torch.tensor([len(x.encode()) for x in text], dtype=torch.float64)
    return batch


@pytest.mark.parametrize("fused", [False, True])
def test_kd_gate_is_the_loss_with_the_weights_of_samples_the_student_predicts_better_zeroed(
    multi_caches, tiny_model_dir, fused
):
    """By hand: the student's CE per byte per sample from its own token CEs; a teacher whose cached answer CE is not
    below it on a sample gets weight 0 there. Setting the teachers' answer CEs around the student's makes the gate
    close on chosen samples; the gated loss and its gradient are those of the ungated loss with those weights 0."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _student(tiny_model_dir)
    batch = _gated_batch(multi_caches, tok)
    losses = [TopKKL(), ULD(k=6)]
    with torch.no_grad():
        ce = forward_losses(model, batch, losses, lambda_=0.5, fused_linear=False).ce_tokens  # [M]
    b = len(batch["answer_bytes"])
    student = torch.zeros(b, dtype=torch.float64).index_add_(0, batch["answer_sample"], ce.double())
    student = student / batch["answer_bytes"]
    closed = {0: {1, 2}, 1: {0}}  # teacher -> samples whose teacher CE is set above the student's
    want = dict(batch)
    want["teachers"] = []
    for s, t in enumerate(batch["teachers"]):
        sample = batch["answer_sample"][t["rows"]]
        above = torch.tensor([int(x) in closed[s] for x in sample])
        t["answer_nll"] = torch.where(above, student[sample] + 0.01, student[sample] - 0.01)
        want["teachers"].append({**t, "loss_weights": t["loss_weights"] * (~above).float()})
    functional.set_backend("torch")
    try:
        model.zero_grad()
        got = forward_losses(model, batch, losses, lambda_=0.5, fused_linear=fused, kd_gate=True)
        got.loss.backward()
        g_got = model.get_output_embeddings().weight.grad.clone()
        model.zero_grad()
        ref = forward_losses(model, want, losses, lambda_=0.5, fused_linear=False)
        ref.loss.backward()
        g_ref = model.get_output_embeddings().weight.grad.clone()
    finally:
        functional.set_backend(None)
    torch.testing.assert_close(got.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)
    assert got.kd < forward_losses(model, batch, losses, lambda_=0.5).kd  # the gate removed something
    # each teacher's share of samples kept: (samples it has - closed) / samples it has
    have = [sorted({int(x) for x in batch["answer_sample"][t["rows"]]}) for t in batch["teachers"]]
    assert got.gate_open == pytest.approx([len(set(h) - closed[s]) / len(h) for s, h in enumerate(have)])


def test_kd_gate_needs_the_answer_bytes_and_each_teachers_answer_ce(multi_caches, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _student(tiny_model_dir)
    batch = _gated_batch(multi_caches, tok)
    losses = [TopKKL(), ULD(k=6)]
    with pytest.raises(ValueError, match="answer_bytes"):
        forward_losses(model, {k: v for k, v in batch.items() if k != "answer_bytes"}, losses, lambda_=0.5,
                       kd_gate=True)  # fmt: skip
    plain = _batch([multi_caches["a"], multi_caches["b"]], tok, 4)
    plain["answer_bytes"] = batch["answer_bytes"]
    with pytest.raises(ValueError, match="teacher 0 has no answer_nll"):
        forward_losses(model, plain, losses, lambda_=0.5, kd_gate=True)
