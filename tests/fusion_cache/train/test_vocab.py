"""The vocabulary map across tokenizers (byte-level BPE and SentencePiece-style pieces), carrying a teacher's
top-K onto the student's vocabulary (hand-computed), the on-disk cache of maps, and the coverage report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from fusion_cache.errors import ConfigError
from fusion_cache.train import vocab
from fusion_cache.train.vocab import EXACT
from fusion_cache.train.vocab import PREFIX
from fusion_cache.train.vocab import SPECIAL
from fusion_cache.train.vocab import UNMAPPED
from fusion_cache.train.vocab import VocabMap
from fusion_cache.train.vocab import carry

TEXTS = ["def f(x):\n    return x + 347  # ünï 🙂", "The answer is 12,345.67 and 0.5!", "  spaces\ttabs\n\nnew"]


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def llama(other_teacher_dir):
    return AutoTokenizer.from_pretrained(other_teacher_dir)


@pytest.fixture(scope="module")
def sentencepiece():
    """A small SentencePiece-style BPE (``▁`` for spaces, ``<0xAB>`` byte fallback), as Gemma's and Llama 2's."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>", *byte_tokens],
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(TEXTS * 50 + ["return the value of x plus one"] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("which", ["qwen", "llama", "sentencepiece"])
def test_token_bytes_spell_the_text(request, which):
    tok = request.getfixturevalue(which)
    table = vocab.token_bytes(tok)
    assert len(table) == len(tok) and table[tok.eos_token_id] is None  # special: no bytes
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids) == text.encode(), which


def test_map_between_two_byte_level_vocabularies(qwen, llama):
    # the tiny llama's 1024 merges are a subset of the tiny qwen's 4096 (one corpus): qwen -> llama needs prefixes
    assert (VocabMap.build(llama, qwen).kind[3:] == EXACT).all()
    vmap = VocabMap.build(qwen, llama)
    t_bytes, s_bytes = vocab.token_bytes(qwen), vocab.token_bytes(llama)
    lookup = {b: i for i, b in reversed(list(enumerate(s_bytes))) if b}
    assert (vmap.kind == EXACT).sum() > 500 and (vmap.kind == PREFIX).sum() > 1000
    for t in range(len(t_bytes)):
        b, s, kind = t_bytes[t], int(vmap.student[t]), vmap.kind[t]
        if kind == EXACT:
            assert s_bytes[s] == b
        elif kind == PREFIX:  # the longest student token that starts the teacher token
            assert b.startswith(s_bytes[s]) and len(s_bytes[s]) < len(b)
            assert not any(b[:n] in lookup for n in range(len(s_bytes[s]) + 1, len(b)))
        elif kind == SPECIAL:
            assert b is None and s in (llama.eos_token_id, llama.pad_token_id, llama.bos_token_id)
        else:
            assert kind == UNMAPPED and s == -1 and b is None
    assert vmap.kind[qwen.eos_token_id] == SPECIAL and vmap.student[qwen.eos_token_id] == llama.eos_token_id
    same = VocabMap.build(qwen, qwen)
    words = [t for t, b in enumerate(vocab.token_bytes(qwen)) if b]
    assert (same.student[words] == words).all() and (same.kind[words] == EXACT).all()


def test_map_to_and_from_sentencepiece(qwen, sentencepiece):
    vmap = VocabMap.build(sentencepiece, qwen)
    t_bytes, s_bytes = vocab.token_bytes(sentencepiece), vocab.token_bytes(qwen)
    byte_a = sentencepiece.convert_tokens_to_ids("<0x61>")
    assert t_bytes[byte_a] == b"a" and s_bytes[vmap.student[byte_a]] == b"a"
    space_word = next(t for t, b in enumerate(t_bytes) if b and b.startswith(b" ") and len(b) > 2)
    assert s_bytes[vmap.student[space_word]] and t_bytes[space_word].startswith(s_bytes[vmap.student[space_word]])
    back = VocabMap.build(qwen, sentencepiece)
    assert (back.kind[[t for t, b in enumerate(s_bytes) if b]] != UNMAPPED).all()  # byte fallback covers any bytes


def _toy_map() -> VocabMap:
    """Teacher: 0 ' 347', 1 ' 34', 2 ' 3', 3 'x', 4 '<eos>' (special); student: 0 ' ', 1 ' 3', 2 '4', 3 '7',
    4 '3', 5 '<end>' (special), 6 ' 34'."""
    t = [b" 347", b" 34", b" 3", b"x", None]
    s = [b" ", b" 3", b"4", b"7", b"3", None, b" 34"]
    lookup = {b: i for i, b in enumerate(s) if b}
    student = np.array([6, 6, 1, -1, 5], dtype=np.int32)  # ' 347' -> ' 34' (prefix), ' 34' and ' 3' exact
    kind = np.array([PREFIX, EXACT, EXACT, UNMAPPED, SPECIAL], dtype=np.uint8)
    vmap = VocabMap(student, kind, t, s)
    assert vmap._lookup == lookup
    return vmap


def test_carry_merges_at_a_boundary_and_conditions_inside_a_teacher_token():
    vmap = _toy_map()
    answer = b" 347x"
    # teacher rows: row 0 predicts ' 347' at byte 0, row 1 predicts 'x' at byte 4, row 2 predicts <eos> at byte 5
    t_ends = np.array([0, 4, 5])
    t_ids = np.array([[0, 1, 2, 3], [3, 0, 2, 1], [4, 3, 0, 1]])
    p = np.array([[0.5, 0.2, 0.2, 0.05], [0.9, 0.05, 0.03, 0.01], [0.8, 0.1, 0.05, 0.05]])
    # student rows: ' 3' at 0, '4' at 2, '7' at 3, 'x'? at 4, <end> at 5; row 1 (byte 2) is inside ' 347'
    s_ends = np.array([0, 2, 3, 4, 5])
    c = carry(vmap, s_ends, t_ends, t_ids, np.log(p), answer)
    assert c.student_rows.tolist() == [0, 1, 2, 3, 4] and c.exact.tolist() == [True, False, False, True, True]
    got = {int(r): dict(zip(i[i >= 0].tolist(), np.exp(lp[i >= 0].astype(np.float64)).round(5).tolist(), strict=True))
           for r, i, lp in zip(c.student_rows, c.ids, c.logprobs, strict=True)}  # fmt: skip
    # row 0: ' 347' (0.5) and ' 34' (0.2) both go to ' 34', ' 3' (0.2) to ' 3', 'x' unmapped (tail)
    assert got[0] == {6: 0.7, 1: 0.2}
    # row 1 at byte 2 (' 3' written): candidates that start with ' 3' and are longer: ' 347' -> '4', ' 34' -> '4'
    # (' 3' itself ends there); renormalized over their 0.7
    assert got[1] == {2: 1.0}
    # row 2 at byte 3 (' 34' written): only ' 347' continues, with '7'
    assert got[2] == {3: 1.0}
    # row 3 at byte 4 is the teacher's boundary for 'x', which maps nowhere (its 0.9 is tail); row 4: <eos> -> <end>
    assert got[3] == {6: 0.06, 1: 0.03} and got[4] == {5: 0.8, 6: 0.1}
    assert all((np.diff(lp[np.isfinite(lp)]) <= 0).all() for lp in c.logprobs)  # most likely first
    # a mid-token row whose agreeing candidates hold almost no mass gets no target
    thin = carry(vmap, np.array([2]), t_ends[:1], t_ids[:1], np.log(np.array([[1e-5, 1e-5, 0.9, 0.09]])), answer)
    assert len(thin.student_rows) == 0


def test_coverage_shares_add_up():
    vmap = _toy_map()
    cov = vmap.coverage(np.array([[0, 1, 3], [4, 2, 3]]), np.log(np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]])))
    assert cov == pytest.approx({"exact": 0.25, "prefix": 0.25, "special": 0.3, "unmapped": 0.1, "tail": 0.1})
    assert sum(cov.values()) == pytest.approx(1.0)


def test_maps_are_cached_on_disk_without_pickle(tmp_path, qwen, llama):
    first = vocab.vocab_map(llama, qwen, cache_dir=tmp_path)
    (file,) = tmp_path.glob("*.npz")
    with np.load(file, allow_pickle=False) as z:
        assert set(z.files) == {"student", "kind"}
    again = vocab.vocab_map(llama, qwen, cache_dir=tmp_path)
    assert np.array_equal(first.student, again.student) and np.array_equal(first.kind, again.kind)


def test_the_teacher_tokenizer_comes_from_the_manifest_and_its_hash(multi_caches):
    from fusion_cache.cache.manifest import load_manifest
    from fusion_cache.capture.render import tokenizer_hash

    m = load_manifest(str(multi_caches["b"]))
    assert tokenizer_hash(vocab.teacher_tokenizer(m)) == m.teacher.tokenizer_hash
    forged = m.model_copy(update={"teacher": m.teacher.model_copy(update={"tokenizer_hash": "0" * 64})})
    with pytest.raises(ConfigError, match="none was found"):
        vocab.teacher_tokenizer(forged)


def test_coverage_report_on_a_real_cache(multi_caches, qwen):
    r = vocab.coverage_report(str(multi_caches["b"]), qwen)
    assert r["samples"] == 5 and r["teacher"].endswith("tiny-llama")
    assert sum(r["mass"].values()) == pytest.approx(1.0, abs=1e-6) and sum(r["map"].values()) == pytest.approx(1.0)
    rows = r["rows"]
    assert rows["boundary"] > 0 and rows["inside_teacher_token"] >= 0
    assert rows["boundary"] + rows["inside_teacher_token"] + rows["no_target"] == rows["student_rows"]
    json.dumps(r)
    with pytest.raises(ConfigError, match="every token maps to itself"):
        vocab.coverage_report(str(multi_caches["a"]), qwen)
