"""Streaming S >= 1 caches for a student: same-tokenizer reuse, re-rendering and alignment for another tokenizer,
joins with missing samples, the bounded shuffle, rank splits, and exact resume at every example."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from transformers import AutoTokenizer

from fusion_cache.cache.reader import CacheReader
from fusion_cache.errors import ConfigError
from fusion_cache.train.stream import DistillStream


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _stream(caches, tok, **kw):
    caches = [str(c) for c in caches] if isinstance(caches, list) else str(caches)
    return DistillStream(caches, tok, chat_template=True, max_length=kw.pop("max_length", 4096), **kw)


def test_same_tokenizer_reuses_cached_tokens(built_cache, tok):
    stream = _stream(built_cache, tok)
    assert stream.same_tokenizer == [True] and stream.n_teachers == 1
    rows = list(CacheReader(built_cache).iter_rows())
    exs = list(stream)
    assert len(exs) == len(rows)
    for ex, row in zip(exs, rows, strict=True):
        (t,) = ex.teachers
        assert (ex.input_ids == row.input_ids).all()
        assert t.values.shape == row.topk_logprobs.shape and (t.student_rows == np.arange(row.n_answer)).all()
        assert (t.ids == row.topk_ids).all() and (t.top1 == row.topk_ids[:, 0]).all()  # what the top-K KL needs
        assert t.entropy is None  # only computed for the uncertainty combine


def test_other_tokenizer_is_rerendered_and_aligned(built_cache, other_teacher_dir):
    tok = AutoTokenizer.from_pretrained(other_teacher_dir)
    by_bytes = list(_stream(built_cache, tok))
    by_index = list(_stream(built_cache, tok, align_mode="index"))
    assert not _stream(built_cache, tok).same_tokenizer[0]
    for eb, ei, row in zip(by_bytes, by_index, CacheReader(built_cache).iter_rows(), strict=True):
        n_student = len(ei.input_ids) - ei.answer_start
        ti, tb = ei.teachers[0], eb.teachers[0]
        assert len(ti.student_rows) == min(n_student, row.n_answer)  # ULD: first min(n_S, n_T) positions
        assert ti.ids is None and ti.top1 is None  # another vocabulary: no top-K KL
        assert tb.student_rows[0] == 0 and np.array_equal(tb.values[0], row.topk_logprobs[0])  # row 0 with row 0
        assert len(tb.student_rows) <= n_student


def test_cross_tokenizer_teacher_and_missing_samples(multi_caches, tok):
    a, b = multi_caches["a"], multi_caches["b"]
    stream = _stream([a, b], tok, entropy_k=8)
    assert stream.same_tokenizer == [True, False] and stream.names == ["tiny-qwen2", "tiny-llama"]
    exs = list(stream)
    assert len(exs) == 8
    assert [e.teachers[1] is not None for e in exs] == [True] * 5 + [False] * 3  # rows 5-7: teacher a only
    b_rows = {r.sample_id: r for r in CacheReader(b).iter_rows()}
    for e in exs[:5]:
        t = e.teachers[1]
        assert t.top1 is None and t.values.shape[1] == 6 and t.entropy.shape == (len(t.student_rows),)
        row = b_rows[e.sample_id]
        assert t.student_rows[0] == 0 and np.array_equal(t.values[0], row.topk_logprobs[0])
        assert len(t.student_rows) < len(e.input_ids) - e.answer_start  # different granularity: some dropped
    counts = stream.counts()
    assert counts["join"] == {"samples": 8, "complete": 5, "missing": {"tiny-qwen2": 0, "tiny-llama": 3},
                              "duplicates": 0}  # fmt: skip
    al = counts["align"]["tiny-llama"]
    assert al["samples"] == 5 and al["aligned"] > 0 and al["dropped_student"] > 0 and al["samples_without_pairs"] == 0
    assert counts["align"]["tiny-qwen2"]["dropped_student"] == 0  # same tokenizer: every row
    for e in list(_stream([a, b], tok, align_mode="index"))[:5]:
        assert e.teachers[1].student_rows.tolist() == list(range(len(e.teachers[1].student_rows)))


def test_truncation_and_shuffle_are_bounded_and_seeded(built_cache, tok):
    def ids(seed):
        return [e.sample_id for e in _stream(built_cache, tok, max_length=30, shuffle_buffer=3, seed=seed, epochs=2)]

    a, b, c = ids(0), ids(0), ids(1)
    assert a == b and sorted(a) == sorted(c) and len(a) == 8 and a != c
    assert all(len(e.input_ids) <= 30 for e in _stream(built_cache, tok, max_length=30))


def _ids_and_values(examples) -> list[tuple]:
    return [
        (e.sample_id, e.input_ids.tolist(), [None if t is None else t.values.tobytes() for t in e.teachers])
        for e in examples
    ]


@pytest.mark.parametrize(
    ("caches", "shuffle_buffer", "world_size"),
    [("single", 1, 1), ("single", 3, 1), ("single", 2, 2), ("joined", 3, 1), ("joined", 2, 2), ("window", 3, 1)],
)
def test_resume_from_any_state_continues_the_same_sequence(built_cache, multi_caches, tok, caches, shuffle_buffer,
                                                           world_size):  # fmt: skip
    """A state taken after any example, saved as JSON and loaded into a new stream, yields exactly the rest, and the
    counts come out as in the uninterrupted run."""
    caches = {"single": built_cache, "joined": [multi_caches["a"], multi_caches["b"]],
              "window": [multi_caches["a"], multi_caches["c"]]}[caches]  # fmt: skip
    for rank in range(world_size):
        kw = dict(shuffle_buffer=shuffle_buffer, seed=5, epochs=3, rank=rank, world_size=world_size, join_window=4)
        ref = _stream(caches, tok, **kw)
        full = list(ref)
        assert len(full) >= 3
        it = _stream(caches, tok, **kw).iterator()
        states = [json.dumps(it.state_dict())]
        for _ in full:
            next(it)
            states.append(json.dumps(it.state_dict()))
        for i, state in enumerate(states):
            resumed = _stream(caches, tok, **kw)
            rest = list(resumed.iterator(json.loads(state)))
            assert _ids_and_values(full[:i] + rest) == _ids_and_values(full), f"rank {rank}, resumed after {i}"
            assert resumed.counts() == ref.counts()


def test_a_state_of_other_caches_or_ranks_is_refused(multi_caches, tok):
    caches = [multi_caches["a"], multi_caches["b"]]
    state = _stream(caches, tok).iterator().state_dict()
    with pytest.raises(ConfigError, match="fingerprints"):
        _stream(caches[::-1], tok).iterator(state)
    with pytest.raises(ConfigError, match="rank 0 of 1, loaded by rank 1 of 2"):
        _stream(caches, tok, rank=1, world_size=2).iterator(state)
    with pytest.raises(ConfigError, match="rank: must be in"):
        _stream(caches, tok, rank=2, world_size=2)


@pytest.mark.parametrize("which", ["single", "joined"])
def test_ranks_read_disjoint_samples_that_cover_the_caches(built_cache, multi_caches, tok, which):
    caches = built_cache if which == "single" else [multi_caches["a"], multi_caches["b"]]
    every = [e.sample_id for e in _stream(caches, tok)]
    parts = [[e.sample_id for e in _stream(caches, tok, rank=r, world_size=2)] for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(every) and abs(len(parts[0]) - len(parts[1])) <= 1


def test_examples_do_not_keep_the_mapped_shard_alive(built_cache, tok):
    """Raw-codec rows are views of the memory-mapped shard; an example in the shuffle buffer must own its arrays,
    or it pins (and keeps resident) its whole shard (bench_train (c) measured one pinned shard per 160 rows)."""
    examples = list(_stream(built_cache, tok, max_length=1024, shuffle_buffer=3))
    assert examples and all(e.teachers[0].values.flags.owndata for e in examples)
    assert all(e.teachers[0].ids.flags.owndata for e in examples)
    assert all(e.input_ids.flags.owndata for e in examples)


def test_carried_and_exact_targets_for_another_tokenizer(multi_caches, tok):
    """exact: the byte-aligned rows and values, with the ids that exist in the student's vocabulary; carried: the
    teacher's mass on the student's vocabulary at those rows and at the student rows inside a teacher token."""
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.train.vocab import teacher_tokenizer
    from fusion_cache.train.vocab import vocab_map

    a, b = multi_caches["a"], multi_caches["b"]
    vmap = vocab_map(teacher_tokenizer(CacheReader(b).manifest), tok)
    plain = list(_stream([a, b], tok))
    exact = list(_stream([a, b], tok, targets=["values", "exact"], maps=[None, vmap]))
    carried = list(_stream([a, b], tok, targets=["values", "carried"], maps=[None, vmap]))
    rows = {r.sample_id: r for r in CacheReader(b).iter_rows()}
    extra = 0
    for p, e, c in zip(plain[:5], exact[:5], carried[:5], strict=True):
        tp, te, tc = p.teachers[1], e.teachers[1], c.teachers[1]
        assert np.array_equal(tp.student_rows, te.student_rows) and np.array_equal(tp.values, te.values)
        assert tp.ids is None and te.ids.shape == te.values.shape and (te.ids < len(tok)).all()
        cached = rows[p.sample_id]
        first = np.flatnonzero(cached.topk_logprobs[:, 0] == tp.values[0, 0])[0]  # the teacher row of row 0
        assert np.array_equal(te.ids[0], vmap.exact_ids(cached.topk_ids[first]))
        assert set(tp.student_rows) <= set(tc.student_rows)  # every shared boundary, plus rows inside tokens
        extra += len(tc.student_rows) - len(tp.student_rows)
        assert ((tc.ids >= -1) & (tc.ids < len(tok))).all() and (tc.ids[:, 0] >= 0).all()
        mass = np.exp(tc.values).sum(axis=1)
        assert (mass <= 1 + 1e-5).all() and (mass > 0).all()
    assert extra > 0  # the tokenizers disagree somewhere: some student rows sit inside a teacher token
    with pytest.raises(ConfigError, match="needs a vocabulary map"):
        _stream([a, b], tok, targets=["values", "carried"])


@pytest.mark.parametrize(("ranks", "workers"), [(1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("caches", ["single", "joined"])
def test_dataloader_workers_and_ranks_split_the_samples(built_cache, multi_caches, tok, caches, ranks, workers):
    """Under DataLoader(num_workers=W) on each of R ranks every sample comes exactly once (worker w of rank r takes
    the stride r * W + w of R * W)."""
    import torch

    caches = built_cache if caches == "single" else [multi_caches["a"], multi_caches["b"]]
    every = sorted(e.sample_id for e in _stream(caches, tok))
    seen = []
    for rank in range(ranks):
        stream = _stream(caches, tok, rank=rank, world_size=ranks)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                             collate_fn=lambda e: e.sample_id)  # fmt: skip
        seen += list(loader)
    assert sorted(seen) == every and len(set(seen)) == len(seen)


def test_rank_and_world_size_come_from_the_environment_unless_given(built_cache, tok, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = _stream(built_cache, tok)
    assert (stream.rank, stream.world_size) == (1, 2)
    assert (_stream(built_cache, tok, rank=0, world_size=1).world_size) == 1
    with pytest.raises(ConfigError, match="rank, world_size: give both or neither, got rank=1, world_size=None"):
        _stream(built_cache, tok, rank=1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match=r"rank: must be in \[0, world_size=2\), got 2"):
        _stream(built_cache, tok)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert (_stream(built_cache, tok).rank, _stream(built_cache, tok).world_size) == (0, 1)


GLOO_WORKER = """
import json, sys
import torch, torch.distributed as dist
from transformers import AutoTokenizer
from fusion_cache.train.distributed import leave_group
from fusion_cache.train.stream import DistillStream

dist.init_process_group("gloo")
stream = DistillStream(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[2]), chat_template=True, max_length=4096)
loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda e: e.sample_id)
ids = list(loader)
out = [None] * dist.get_world_size()
dist.all_gather_object(out, [stream.rank, stream.world_size, ids])
if dist.get_rank() == 0:
    print("RESULT " + json.dumps(out))
leave_group()
"""


@pytest.mark.slow
def test_two_real_gloo_ranks_with_two_workers_each_split_the_samples(built_cache, tiny_model_dir, tok, tmp_path):
    """torchrun, 2 processes, gloo: the stream takes its rank from torch.distributed (no arguments)."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(GLOO_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(built_cache), str(tiny_model_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks on a 2-core machine
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert [p[:2] for p in parts] == [[0, 2], [1, 2]]
    seen = parts[0][2] + parts[1][2]
    assert sorted(seen) == sorted(e.sample_id for e in _stream(built_cache, tok, rank=0, world_size=1))
    assert len(set(seen)) == len(seen) and all(p[2] for p in parts)


def test_a_stream_with_nothing_usable_says_so(built_cache, tok, caplog):
    with caplog.at_level("WARNING", logger="fusion_cache.train.stream"):
        assert list(_stream(built_cache, tok, max_length=2)) == []
    assert "got no usable samples" in caplog.text and "no_answer_token" in caplog.text
    assert "rank 0 of 1 got" in caplog.text and "max_length=2" in caplog.text
    with pytest.raises(ConfigError, match="larger max_length"):
        list(_stream(built_cache, tok, max_length=2, epochs=2))


def test_each_pass_logs_its_dropped_samples_by_reason(built_cache, tok, caplog):
    every = len(list(_stream(built_cache, tok)))
    stream = _stream(built_cache, tok, max_length=20, epochs=2)  # answers start at 12-25
    with caplog.at_level("INFO", logger="fusion_cache.train.stream"):
        kept = len(list(stream))
    dropped = stream.skipped["no_answer_token"]
    assert 0 < dropped and kept + dropped == 2 * every and stream.skipped["nothing_aligned"] == 0
    lines = [r.getMessage() for r in caplog.records if "yielded" in r.getMessage()]
    assert len(lines) == 2 and lines[-1].startswith("rank 0 of 1: epoch 1 yielded")
    assert f"'no_answer_token': {dropped}" in lines[-1]


def test_answer_scores_are_each_teachers_answer_cross_entropy_per_byte(multi_caches, tok):
    import json

    caches = [multi_caches["a"], multi_caches["b"]]
    plain = list(_stream(caches, tok))
    assert all(t is None or t.answer_nll is None for ex in plain for t in ex.teachers)  # only when asked
    exs = list(_stream(caches, tok, answer_scores=True))
    rows = {r.sample_id: r for r in CacheReader(multi_caches["a"]).iter_rows()}
    assert exs and all(ex.teachers[0] is not None for ex in exs)
    for ex in exs:
        row = rows[ex.sample_id]
        answer = len(json.loads(row.conversation)[-1]["content"].encode())
        nll = -row.target_logprobs.astype(np.float64).sum()
        c = ex.teachers[0].answer_nll
        # nats over the bytes the answer's tokens cover: at most the answer's bytes, so never below nll / answer
        assert c > 0 and c >= nll / answer - 1e-9 and c * answer == pytest.approx(nll, rel=0.5)
        other = ex.teachers[1]
        assert other is None or (other.answer_nll > 0 and other.answer_nll != c)  # another teacher, another score
