"""Render a conversation for one model: its own chat template (or plain text), its own tokens, byte offsets.

The prompt (everything up to and including the assistant header) and the answer are tokenized separately and
concatenated, so no token ever straddles the prompt/answer boundary and the prompt tokens are exactly what the
model sees before it generates. Byte offsets index the UTF-8 bytes of the rendered text; cross-tokenizer alignment
pairs positions whose tokens end at the same byte.

A text row (one assistant message and no prompt, `fusion_cache.capture.inputs`) is plain text for every model, chat
template or not: BOS (where the tokenizer adds one), the text, EOS; everything after the first token is answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusion_cache.errors import ConfigError


@dataclass(frozen=True)
class Rendered:
    """One conversation as one model sees it.

    Attributes:
        input_ids: int32 [n_tokens].
        answer_start: index of the first answer token (>= 1).
        byte_start: int32 [n_tokens] start of each token in the UTF-8 bytes of ``text``.
        byte_end: int32 [n_tokens] one past the end of each token.
        text: the rendered text (prompt + answer).
    """

    input_ids: np.ndarray
    answer_start: int
    byte_start: np.ndarray
    byte_end: np.ndarray
    text: str

    @property
    def n_answer(self) -> int:
        return len(self.input_ids) - self.answer_start


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of everything that decides how text becomes ids: the tokenizer definition and the chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the vocabulary is the definition we can see
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(b"\0template\0" + (getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(b"\0special\0" + repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()


def _char_to_byte(text: str) -> np.ndarray:
    """[len(text) + 1] int64: byte offset of each character index in the UTF-8 encoding (vectorized)."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    nbytes = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(nbytes, out=out[1:])
    return out


def is_text_row(messages: list[dict] | tuple[dict, ...]) -> bool:
    """A plain-text row: a single assistant message, no prompt."""
    return len(messages) == 1 and messages[0].get("role") == "assistant"


def _split_prompt_answer(tokenizer: Any, messages: list[dict], chat_template: bool) -> tuple[str, str]:
    if is_text_row(messages):
        return _split_text(tokenizer, messages[0]["content"])
    if chat_template:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ConfigError(
                "the tokenizer's chat template does not render the prompt as a prefix of the conversation, so the "
                "answer positions cannot be located; pass a model whose template does, or use plain text rendering"
            )
        return prompt, full[len(prompt) :]
    # Plain text (base models): the turns joined by blank lines, BOS/EOS as the tokenizer defines them.
    prompt = "\n\n".join(m["content"] for m in messages[:-1]) + "\n\n"
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    if bos and _adds_bos(tokenizer):
        prompt = bos + prompt
    return prompt, messages[-1]["content"] + (eos or "")


def _split_text(tokenizer: Any, text: str) -> tuple[str, str]:
    """A text row's "prompt": BOS where the tokenizer adds one, else the text's first token (nothing predicts it)."""
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    if bos and _adds_bos(tokenizer):
        return bos, text + (eos or "")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) < 2:
        return text, eos or ""
    cut = enc["offset_mapping"][1][0]  # where the second token starts
    return text[:cut], text[cut:] + (eos or "")


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def render(tokenizer: Any, messages: list[dict] | tuple[dict, ...], *, chat_template: bool) -> Rendered:
    """Render and tokenize ``messages`` (the last one is the answer) for ``tokenizer``.

    Args:
        tokenizer: a transformers fast tokenizer (offsets are needed).
        messages: {"role", "content"} dicts; the last is the assistant's answer.
        chat_template: use the tokenizer's chat template (True) or plain text (False).

    Returns:
        The Rendered sample.
    """
    messages = list(messages)
    prompt, answer = _split_prompt_answer(tokenizer, messages, chat_template)
    enc_p = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    enc_a = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    if not enc_p["input_ids"]:
        raise ConfigError("the rendered prompt has no tokens")
    text = prompt + answer
    c2b = _char_to_byte(text)
    off_p = np.asarray(enc_p["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    off_a = np.asarray(enc_a["offset_mapping"], dtype=np.int64).reshape(-1, 2) + len(prompt)
    off = np.concatenate([off_p, off_a]).clip(0, len(text))
    ids = np.asarray(enc_p["input_ids"] + enc_a["input_ids"], dtype=np.int32)
    return Rendered(
        input_ids=ids,
        answer_start=len(enc_p["input_ids"]),
        byte_start=c2b[off[:, 0]].astype(np.int32),
        byte_end=c2b[off[:, 1]].astype(np.int32),
        text=text,
    )


def render_prompt_ids(tokenizer: Any, messages: list[dict] | tuple[dict, ...], *, chat_template: bool) -> list[int]:
    """Token ids of the prompt alone (for generating a response): ``messages`` holds no answer yet."""
    placeholder = list(messages) + [{"role": "assistant", "content": ""}]
    prompt, _ = _split_prompt_answer(tokenizer, placeholder, chat_template)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]
