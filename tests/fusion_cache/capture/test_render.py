"""Rendering: the teacher's own template, a clean prompt/answer boundary, exact byte offsets."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from fusion_cache.capture.render import render
from fusion_cache.capture.render import render_prompt_ids
from fusion_cache.capture.render import tokenizer_hash

MESSAGES = [
    {"role": "user", "content": "Ünïcødé, emoji 🙂🚀, code `x = {1: 2}`\n\tand    runs of spaces 12345"},
    {"role": "assistant", "content": "Sure: naïve café — 3.14159 🙂 done."},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("chat", [True, False])
def test_offsets_cover_the_text_and_answer_starts_at_the_boundary(tok, chat):
    r = render(tok, MESSAGES, chat_template=chat)
    data = r.text.encode()
    assert r.input_ids.dtype == np.int32 and r.byte_start.shape == r.byte_end.shape == r.input_ids.shape
    assert (r.byte_end >= r.byte_start).all() and r.byte_end.max() <= len(data)
    assert (np.diff(r.byte_end) >= 0).all()
    # the answer's first token starts exactly where the prompt ends, in bytes
    prompt_ids = render_prompt_ids(tok, MESSAGES[:-1], chat_template=chat)
    assert r.input_ids[: r.answer_start].tolist() == prompt_ids
    boundary = int(r.byte_start[r.answer_start])
    assert data[boundary:].decode().startswith("Sure")
    # offsets are character-granular: every span is whole UTF-8 characters (a token holding part of a multi-byte
    # character spans that character), and the spans cover the text in order
    for s, e in zip(r.byte_start.tolist(), r.byte_end.tolist(), strict=True):
        data[s:e].decode("utf-8")
    assert int(r.byte_start[0]) == 0 and int(r.byte_end[-1]) == len(data)


def test_ascii_offsets_are_exact(tok):
    msgs = [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b  # 42"}]
    r = render(tok, msgs, chat_template=True)
    data = r.text.encode()
    pieces = [data[s:e] for s, e in zip(r.byte_start.tolist(), r.byte_end.tolist(), strict=True)]
    assert b"".join(pieces) == data
    assert pieces == [tok.decode([i]).encode() for i in r.input_ids.tolist()]


def test_decoding_the_ids_gives_the_text(tok):
    r = render(tok, MESSAGES, chat_template=True)
    assert tok.decode(r.input_ids.tolist()) == r.text


def test_tokenizer_hash_changes_with_the_template(tok):
    h = tokenizer_hash(tok)
    old = tok.chat_template
    try:
        tok.chat_template = old + " "
        assert tokenizer_hash(tok) != h
    finally:
        tok.chat_template = old
    assert tokenizer_hash(tok) == h
