"""Streaming a cache for a student: same-tokenizer reuse, re-rendering for another tokenizer, index alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from fusion_cache.cache.reader import CacheReader
from fusion_cache.train.stream import CacheStream
from fusion_cache.train.stream import collate


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from fusion_cache.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("other") / "tiny-llama", arch="llama", vocab_size=1024)


def test_same_tokenizer_reuses_cached_tokens(built_cache, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stream = CacheStream(str(built_cache), tok, chat_template=True, max_length=4096)
    assert stream.same_tokenizer
    rows = list(CacheReader(built_cache).iter_rows())
    exs = list(stream)
    assert len(exs) == len(rows)
    for ex, row in zip(exs, rows, strict=True):
        assert (ex.input_ids == row.input_ids).all()
        assert ex.teacher_values.shape == row.topk_logprobs.shape
        assert (ex.teacher_top1 == row.topk_ids[:, 0]).all()
        assert (ex.teacher_ids == row.topk_ids).all()  # what the top-K KL needs
    b = collate(exs[:2], pad_id=0)
    assert b["teacher_ids"].shape == b["teacher_values"].shape and b["teacher_ids"].dtype == torch.int64


def test_other_tokenizer_is_rerendered_and_index_aligned(built_cache, other_model_dir):
    tok = AutoTokenizer.from_pretrained(other_model_dir)
    stream = CacheStream(str(built_cache), tok, chat_template=True, max_length=4096)
    assert not stream.same_tokenizer
    for ex, row in zip(stream, CacheReader(built_cache).iter_rows(), strict=True):
        n_student = len(ex.input_ids) - ex.answer_start
        n_teacher = row.topk_logprobs.shape[0]
        assert ex.teacher_values.shape[0] == min(n_student, n_teacher)  # ULD: first min(n_S, n_T) positions
        assert ex.teacher_top1 is None and ex.teacher_ids is None
        assert tok.decode(ex.input_ids[ex.answer_start :].tolist()).startswith(tok.decode(row.input_ids[:0].tolist()))
    assert "teacher_ids" not in collate(list(stream)[:2], pad_id=0)  # other vocabulary: no top-K KL


def test_truncation_and_shuffle_are_bounded_and_seeded(built_cache, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def ids(seed):
        s = CacheStream(str(built_cache), tok, chat_template=True, max_length=30, shuffle_buffer=3, seed=seed, epochs=2)
        return [e.sample_id for e in s]

    a, b, c = ids(0), ids(0), ids(1)
    assert a == b and sorted(a) == sorted(c) and len(a) == 8
    s = CacheStream(str(built_cache), tok, chat_template=True, max_length=30)
    assert all(len(e.input_ids) <= 30 for e in s)


def test_collate_indexes_answer_positions(built_cache, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    exs = list(CacheStream(str(built_cache), tok, chat_template=True, max_length=4096))[:3]
    b = collate(exs, pad_id=0)
    length = b["input_ids"].shape[1]
    flat = b["input_ids"].reshape(-1)
    # position p predicts token p + 1: the targets are the tokens right after the indexed positions
    assert (flat[b["answer_index"] + 1] == b["answer_targets"]).all()
    assert b["teacher_values"].shape[0] == b["row_weights"].shape[0] == b["uld_rows"].shape[0]
    np.testing.assert_allclose(float(b["row_weights"].sum()), 1.0, rtol=1e-6)  # mean over positions, then batch
    assert int(b["attention_mask"].sum()) == sum(len(e.input_ids) for e in exs) and length == max(
        len(e.input_ids) for e in exs
    )


def _stream(cache, tok, **kw):
    return CacheStream(str(cache), tok, chat_template=True, max_length=4096, **kw)


@pytest.mark.parametrize(("shuffle_buffer", "world_size"), [(1, 1), (3, 1), (2, 2)])
def test_resume_from_any_state_continues_the_same_sequence(built_cache, tiny_model_dir, shuffle_buffer, world_size):
    """A state taken after any example, saved as JSON and loaded into a new stream, yields exactly the rest."""
    import json

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for rank in range(world_size):
        kw = dict(shuffle_buffer=shuffle_buffer, seed=5, epochs=3, rank=rank, world_size=world_size)
        full = [e.sample_id for e in _stream(built_cache, tok, **kw)]
        assert len(full) >= 3
        it = _stream(built_cache, tok, **kw).iterator()
        states = [json.dumps(it.state_dict())]
        for _ in full:
            next(it)
            states.append(json.dumps(it.state_dict()))
        for i, state in enumerate(states):
            rest = [e.sample_id for e in _stream(built_cache, tok, **kw).iterator(json.loads(state))]
            assert rest == full[i:], f"rank {rank}, resumed after {i} examples"


def test_ranks_read_disjoint_rows_that_cover_the_cache(built_cache, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    every = [e.sample_id for e in _stream(built_cache, tok)]
    parts = [[e.sample_id for e in _stream(built_cache, tok, rank=r, world_size=2)] for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(every) and abs(len(parts[0]) - len(parts[1])) <= 1


def test_a_state_from_another_rank_or_world_size_is_refused(built_cache, tiny_model_dir):
    from fusion_cache.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    state = _stream(built_cache, tok, rank=1, world_size=2).iterator().state_dict()
    with pytest.raises(ConfigError, match="rank 1 of 2"):
        _stream(built_cache, tok).iterator(state)
    with pytest.raises(ConfigError, match="rank: must be in"):
        _stream(built_cache, tok, rank=2, world_size=2)


def test_examples_do_not_keep_the_mapped_shard_alive(built_cache, tiny_model_dir):
    """Raw-codec rows are views of the memory-mapped shard; an example in the shuffle buffer must own its arrays,
    or it pins (and keeps resident) its whole shard (bench_train (c) measured one pinned shard per 160 rows)."""
    from transformers import AutoTokenizer

    from fusion_cache.train.stream import CacheStream

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stream = CacheStream(str(built_cache), tok, chat_template=True, max_length=1024, shuffle_buffer=3)
    examples = list(stream)
    assert examples and all(e.teacher_values.flags.owndata for e in examples)
    assert all(e.teacher_ids.flags.owndata for e in examples)
    assert all(e.input_ids.flags.owndata or e.input_ids.base.flags.owndata for e in examples)  # a slice of a copy
