"""Answer-only prompt logprobs inside vLLM's runner: the same answer rows as vLLM's own full path, vLLM's own path
for requests without an answer start, and vLLM's method kept where it does not have the expected shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_cache.capture.engines.base import SequenceRequest
from fusion_cache.capture.engines.vllm_answer_logits import _incompatibility
from fusion_cache.capture.engines.vllm_answer_logits import answer_only_prompt_logprobs
from fusion_cache.capture.engines.vllm_answer_logits import answer_topk
from fusion_cache.testing import capture_with

K = 64
# fp32 log-probabilities of magnitude < 20: a few ulps; the hook's normalizer sums in another order than log_softmax
TOL = 4e-6


@pytest.mark.parametrize("block_rows", [256, 8])  # one normalizer block, and 5 blocks with a partial last one
def test_answer_topk_equals_log_softmax_top_k(block_rows, monkeypatch) -> None:
    monkeypatch.setattr("fusion_cache.capture.engines.vllm_answer_logits._NORM_BLOCK_ROWS", block_rows)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 500, generator=gen) * 4
    targets = torch.randint(0, 500, (37,), generator=gen)
    for scores in (logits, logits.to(torch.bfloat16)):  # bf16 logits are scored in fp32, as vLLM does
        ids, values = answer_topk(scores, 7, targets)
        ref = torch.log_softmax(scores.float(), dim=-1)
        ref_values, ref_ids = torch.topk(ref, 7, dim=-1)
        assert ids.dtype == torch.int64 and values.dtype == torch.float32 and ids.shape == (37, 8)
        assert torch.equal(ids[:, 0], targets) and torch.equal(ids[:, 1:], ref_ids)
        torch.testing.assert_close(values[:, 1:], ref_values, atol=TOL, rtol=0)
        torch.testing.assert_close(values[:, 0], ref.gather(-1, targets[:, None])[:, 0], atol=TOL, rtol=0)


def test_incompatible_runner_methods_are_named() -> None:
    assert "no _get_prompt_logprobs_dict" in _incompatibility(None)

    def other_signature(self, hidden_states, num_scheduled_tokens, extra):
        return {}

    assert "takes" in _incompatibility(other_signature)

    def other_body(self, hidden_states, num_scheduled_tokens):
        return {}

    assert "no longer reads" in _incompatibility(other_body)


def _long_requests() -> list[SequenceRequest]:
    """~5900 tokens: more than one 2048-token scheduler step, so requests are prefilled in chunks, with answer
    starts before, inside and after a chunk boundary, at 1 (every row) and at the last token (one row)."""
    rng = np.random.default_rng(1)
    spec = [(1000, 900), (1000, 1), (1000, 600), (1000, 500), (1000, 50), (700, 699), (2, 1), (40, 40), (150, 3)]
    return [SequenceRequest(rng.integers(0, 4096, size=n).tolist(), a) for n, a in spec]


def _assert_same_answer_rows(on, off) -> None:
    """ids identical but for swapped near-ties (values within TOL), logprobs within TOL, same dtypes and shapes."""
    differing_rows = 0
    for a, b in zip(on, off, strict=True):
        assert a.ids.shape == b.ids.shape and a.ids.dtype == b.ids.dtype == np.int32
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=TOL, rtol=0)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=TOL, rtol=0)
        swapped = a.ids != b.ids
        differing_rows += int(swapped.any(axis=1).sum())
        # a swap is only allowed where the neighbour's value is within TOL (the two sides rounded a near-tie apart)
        near_tie = np.zeros_like(swapped)
        close = np.abs(np.diff(a.logprobs, axis=1)) <= TOL
        near_tie[:, 1:] |= close
        near_tie[:, :-1] |= close
        assert not (swapped & ~near_tie).any(), "ids differ where no near-tie explains it"
    assert differing_rows <= 0.01 * sum(len(c.ids) for c in on)


@pytest.mark.slow
@pytest.mark.vllm
def test_answer_only_rows_equal_vllms_full_path(vllm_engine) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._get_prompt_logprobs_dict
    reqs = _long_requests()
    assert vllm_engine.answer_only_logits
    on = vllm_engine.capture(reqs, K)
    hook = vllm_engine.last_answer_hook
    assert GPUModelRunner._get_prompt_logprobs_dict is original  # vLLM's method is put back after the call
    off = capture_with(vllm_engine, "answer_only_logits", False, reqs, K)
    # the hook ran in the runner: it scored exactly the answer rows and skipped every other prompt row
    sent = [r for r in reqs if r.answer_start < len(r.input_ids)]
    assert hook.installed and hook.fallback_steps == 0
    assert hook.scored_rows == sum(len(r.input_ids) - r.answer_start for r in sent)
    assert hook.skipped_rows == sum(r.answer_start - 1 for r in sent)
    _assert_same_answer_rows(on, off)


@pytest.mark.slow
@pytest.mark.vllm
def test_requests_without_answer_start_get_vllms_own_path(vllm_engine) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from fusion_cache.capture.engines.vllm import PromptLogprobArrays
    from fusion_cache.capture.engines.vllm import _prompt_logprob_arrays

    prompts = [TokensPrompt(prompt_token_ids=r.input_ids) for r in _long_requests()[4:]]
    params = SamplingParams(max_tokens=1, prompt_logprobs=8, detokenize=False, flat_logprobs=True)

    def run():
        with _prompt_logprob_arrays():
            return [o.prompt_logprobs for o in vllm_engine.llm.generate(prompts, params, use_tqdm=False)]

    plain = run()
    with answer_only_prompt_logprobs() as hook:
        hooked = run()
    assert hook.installed and hook.fallback_steps > 0 and hook.scored_rows == 0
    for a, b in zip(hooked, plain, strict=True):
        assert isinstance(a, PromptLogprobArrays)
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.logprobs, b.logprobs)


@pytest.mark.slow
@pytest.mark.vllm
def test_unexpected_runner_method_keeps_vllms_path(vllm_engine, monkeypatch, caplog) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._get_prompt_logprobs_dict

    def wrapped(self, hidden_states, num_scheduled_tokens, unexpected=None):  # a vLLM with another signature
        return original(self, hidden_states, num_scheduled_tokens)

    reqs = _long_requests()[5:]
    expected = vllm_engine.capture(reqs, K)
    monkeypatch.setattr(GPUModelRunner, "_get_prompt_logprobs_dict", wrapped)
    monkeypatch.setattr("fusion_cache.capture.engines.vllm_answer_logits._WARNED", set())
    with caplog.at_level("WARNING", logger="fusion_cache.capture.engines.vllm_answer_logits"):
        got = vllm_engine.capture(reqs, K)
    hook = vllm_engine.last_answer_hook
    assert not hook.installed and "takes" in hook.reason and "answer-only prompt logprobs off" in caplog.text
    assert GPUModelRunner._get_prompt_logprobs_dict is wrapped
    _assert_same_answer_rows(got, expected)
