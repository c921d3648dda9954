"""forward_losses: the chunked fused lm_head path gives the same losses, metric and gradients as the dense one."""

from __future__ import annotations

import itertools

import pytest
import torch

from fusion_cache.capture.render import has_chat_template
from fusion_cache.train import losses
from fusion_cache.train.objective import forward_losses
from fusion_cache.train.stream import CacheStream
from fusion_cache.train.stream import collate


@pytest.mark.parametrize(
    ("lambda_", "opts"), [(0.5, {}), (1.0, {}), (0.0, {}), (0.5, {"zscore": False, "tail": True})], ids=str
)
def test_fused_linear_matches_dense(built_cache, tiny_model_dir, lambda_, opts):
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # The cache was captured from this very model, so unperturbed its ULD distances are ~1e-7: every |p_o - p_s|
    # sits at the kink of the L1, where the gradient is the sign of rounding noise and differs between any two
    # summation orders. Move the student away from the teacher so the gradient is well defined.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stream = CacheStream(str(built_cache), tok, chat_template=has_chat_template(tok), max_length=256)
    batch = collate(list(itertools.islice(iter(stream), 3)), tok.pad_token_id or 0)
    losses.set_backend("torch")
    try:
        results = []
        for fused in (False, True):
            model.zero_grad()
            out = forward_losses(model, batch, lambda_=lambda_, k=8, fused_linear=fused, **opts)
            out.loss.backward()
            grads = [p.grad.clone() for p in (model.get_output_embeddings().weight, model.model.norm.weight)]
            results.append((out, grads))
    finally:
        losses.set_backend(None)
    (dense, g_dense), (fused, g_fused) = results
    for name in ("loss", "ce", "uld"):
        torch.testing.assert_close(getattr(fused, name).float(), getattr(dense, name).detach().float(), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    assert (fused.answer_tokens, fused.top1_hits, fused.top1_total) == (
        dense.answer_tokens, dense.top1_hits, dense.top1_total)  # fmt: skip
    for a, b in zip(g_fused, g_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_keeps_the_dense_path_on_cpu(built_cache, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("FUSION_CACHE_KERNEL", raising=False)
    assert losses.resolve_backend("cpu") == "torch"  # so fused_linear=None means the dense path here
