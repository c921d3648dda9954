"""Cross-tokenizer alignment: every pair ends at the same answer byte (checked against the tokens' exact bytes)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from fusion_cache.capture.render import render
from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.train.align import AlignStats
from fusion_cache.train.align import TokenSpans
from fusion_cache.train.align import align
from fusion_cache.train.align import align_bytes
from fusion_cache.train.align import align_index
from fusion_cache.train.align import answer_boundaries
from fusion_cache.train.vocab import byte_decoder

ANSWERS = [
    "    return x * 2\n Ünïcødé 🙂🙂 ok   spaces 12345.678 日本語\n\n\tdef f(a, b):\n        return a**b  # 🚀",
    "2 + 2 = 4.\u00a0Déjà vu: naïve café — 3.14159e-10 × 42 ≥ 7; emoji 👩‍💻 and 🇫🇷\n\n\n    indented   runs",
    "```python\nfor i in range(10):\n    print(f'{i:>4}')\n```\n1000000 + 0.5 = 1000000.5",
]
PROMPT = [{"role": "system", "content": "Be brief.  "}, {"role": "user", "content": "Ünï  test\n\n 🙂 please"}]


_BYTES = byte_decoder()  # GPT-2's byte-level alphabet: one stand-in character per byte


def _token_bytes(tokenizer, ids) -> np.ndarray:
    """Exact byte length of each token of a byte-level BPE (independent of the offset mapping under test)."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    out = []
    for piece in tokenizer.convert_ids_to_tokens([int(i) for i in ids]):
        out.append(len(piece.encode()) if piece in added else len(piece))  # one stand-in char per byte
        assert piece in added or all(c in _BYTES for c in piece), piece
    return np.asarray(out, dtype=np.int64)


def _view(tokenizer, messages, chat_template):
    """(TokenSpans, exact answer-relative end of each row's context, char boundaries of the answer bytes)."""
    r = render(tokenizer, messages, chat_template=chat_template)
    spans = TokenSpans(r.byte_start, r.byte_end, r.answer_start, r.n_answer)
    lengths = _token_bytes(tokenizer, r.input_ids[r.answer_start :])
    exact = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # row t has consumed answer tokens 0..t-1
    answer = r.text.encode()[int(r.byte_end[r.answer_start - 1]) :]
    assert len(answer) == lengths.sum()  # the offsets' answer origin is where the answer's bytes begin
    on_char = {i for i in range(len(answer) + 1) if i == len(answer) or (answer[i] & 0xC0) != 0x80}
    return spans, exact, on_char


def _check_pairs(student, teacher, a):
    (s, s_exact, s_chars), (t, t_exact, t_chars) = student, teacher
    assert a.n_student == s.n_rows and a.n_teacher == t.n_rows
    # every pair: both contexts end at the same answer byte (exact bytes, not the offsets the alignment used)
    np.testing.assert_array_equal(s_exact[a.student_rows], t_exact[a.teacher_rows])
    # nothing across the prompt/answer boundary: answer rows only, row 0 (the whole prompt) with row 0
    assert a.student_rows.min() == 0 and a.teacher_rows.min() == 0
    assert a.student_rows.max() < s.n_rows and a.teacher_rows.max() < t.n_rows
    assert (np.diff(a.student_rows) > 0).all() and (np.diff(a.teacher_rows) > 0).all()
    # and nothing missed: every byte where both sides' contexts end on a whole character is paired
    common = set(s_exact.tolist()) & set(t_exact.tolist()) & s_chars & t_chars
    assert set(s_exact[a.student_rows].tolist()) == common


@pytest.fixture(scope="module")
def bpe_tokenizers():
    """Two small trained byte-level BPEs of different granularity, specials and templates (4096 and 512)."""
    from fusion_cache.testing import _train_tokenizer

    return _train_tokenizer("qwen2", 4096), _train_tokenizer("llama", 512)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from fusion_cache.models.presets import resolve_model

    try:
        path = resolve_model("smollm2-135m").path  # converted once per FUSION_CACHE_HOME
    except MissingDependencyError as e:
        pytest.skip(f"the embedded teacher is not installed: {e}")
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("answer", ANSWERS)
def test_byte_pairs_end_at_the_same_byte_two_bpes(bpe_tokenizers, answer):
    big, small = bpe_tokenizers
    messages = [*PROMPT, {"role": "assistant", "content": answer}]
    for s_tmpl, t_tmpl in ((True, True), (True, False), (False, True)):
        student, teacher = _view(small, messages, s_tmpl), _view(big, messages, t_tmpl)
        a = align_bytes(student[0], teacher[0])
        _check_pairs(student, teacher, a)
        assert 0 < a.aligned < a.n_student  # different granularity: some rows have no partner
        assert a.n_teacher < a.n_student  # the 4096 vocabulary needs fewer tokens than the 512 one


@pytest.mark.slow
@pytest.mark.parametrize("answer", ANSWERS)
def test_byte_pairs_end_at_the_same_byte_smollm2_vs_bpe(smollm2_tokenizer, bpe_tokenizers, answer):
    _, small = bpe_tokenizers
    messages = [*PROMPT, {"role": "assistant", "content": answer}]
    stats = AlignStats()
    for s_tmpl, t_tmpl in ((True, True), (True, False), (False, True), (False, False)):
        student, teacher = _view(small, messages, s_tmpl), _view(smollm2_tokenizer, messages, t_tmpl)
        a = align_bytes(student[0], teacher[0])
        _check_pairs(student, teacher, a)
        stats.add(a)
        back = align_bytes(teacher[0], student[0])  # symmetric
        np.testing.assert_array_equal(back.student_rows, a.teacher_rows)
    d = stats.as_dict()
    assert d["aligned"] + d["dropped_student"] == stats.student_rows and d["dropped_teacher"] >= 0
    assert d["samples"] == 4 and d["samples_without_pairs"] == 0 and 0 < d["aligned_fraction_of_student"] < 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from(list("ab xyz09.,:;()[]{}=+-*/#_\n\t") + list("éüßñ日本語ж€—") + ["🙂", "🚀", "👩‍💻", "  "]),
        min_size=1,
        max_size=60,
    ).map("".join)
)
def test_byte_alignment_property(bpe_tokenizers, answer):
    big, small = bpe_tokenizers
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]
    student, teacher = _view(small, messages, True), _view(big, messages, False)
    _check_pairs(student, teacher, align_bytes(student[0], teacher[0]))


def test_identical_tokenization_pairs_everything_but_split_characters(bpe_tokenizers):
    big, _ = bpe_tokenizers
    view = _view(big, [*PROMPT, {"role": "assistant", "content": ANSWERS[0]}], True)
    a = align_bytes(view[0], view[0])
    _check_pairs(view, view, a)
    np.testing.assert_array_equal(a.student_rows, a.teacher_rows)
    rows, _ = answer_boundaries(view[0])
    assert a.aligned == len(rows) < view[0].n_rows  # the emoji's inner byte tokens are not boundaries


def test_index_alignment_is_uld():
    a = align_index(5, 3)
    assert a.student_rows.tolist() == a.teacher_rows.tolist() == [0, 1, 2]
    assert (a.aligned, a.dropped_student, a.dropped_teacher) == (3, 2, 0)
    spans = TokenSpans(np.arange(6), np.arange(1, 7), 2, 4)
    assert align("index", spans, TokenSpans(np.arange(4), np.arange(1, 5), 1, 2)).student_rows.tolist() == [0, 1]


def test_truncated_rows_and_bad_spans():
    # 2 prompt tokens, 4 answer tokens of 1 byte each, but only 2 rows survive truncation on the student
    s = TokenSpans(np.arange(6), np.arange(1, 7), 2, 2)
    t = TokenSpans(np.array([0, 3, 5, 7]), np.array([3, 5, 7, 8]), 1, 3)  # answer tokens of 2, 2, 1 bytes
    a = align_bytes(s, t)
    assert a.student_rows.tolist() == [0] and a.teacher_rows.tolist() == [0]  # student row 1 ends at byte 1
    with pytest.raises(ConfigError, match="answer_start=0"):
        TokenSpans(np.arange(3), np.arange(1, 4), 0, 1)
    with pytest.raises(ConfigError, match="n_rows=3"):
        TokenSpans(np.arange(3), np.arange(1, 4), 1, 3)
    with pytest.raises(ConfigError, match="align: unknown value 'dtw'"):
        align("dtw", s, t)
