"""One cached (sample, teacher) row as numpy arrays: what the writer takes and the reader gives back.

It lives apart from both so that neither imports the other; `MissingField` stands for what a codec does not store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_cache.errors import ShardFormatError


@dataclass
class CacheRow:
    """One (sample, teacher) row, as numpy arrays.

    Attributes:
        sample_id: 32 hex chars.
        row_index: index of the sample in the input dataset.
        conversation: canonical JSON of the messages.
        input_ids: int32 [n_tokens].
        answer_start: index of the first answer token.
        token_byte_start, token_byte_end: int32 [n_tokens] byte offsets into the rendered text.
        topk_ids: int32 [n_answer, K]. Read from a ``values`` cache: a `MissingField` that raises on use.
        topk_logprobs: float32 [n_answer, K] (decoded: exact for raw, quantized for full/values; for a ``shape``
            cache each row's standardized shape (v - v_0) / (v_0 - v_{K-1}) in [-1, 0], not log-probs).
        target_logprobs: float32 [n_answer]. Read from a ``values`` cache: a `MissingField`.
        tail_mass: float32 [n_answer], 1 - sum(exp(topk_logprobs)) of the original values; None when unknown.
        sample_counts: uint8 [n_answer, N] of a sampled capture (``sampled`` codec), else None: then ``topk_ids``
            and ``topk_logprobs`` hold each position's distinct draws (most likely first) and their teacher
            log-probs, padded with -1 and -inf where the count is 0; a position's counts sum to N.
    """

    sample_id: str
    row_index: int
    conversation: str
    input_ids: np.ndarray
    answer_start: int
    token_byte_start: np.ndarray
    token_byte_end: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray
    tail_mass: np.ndarray | None = None
    sample_counts: np.ndarray | None = None

    @property
    def n_answer(self) -> int:
        return int(self.topk_logprobs.shape[0])


class MissingField:
    """Stands for a field a codec does not store (ids and target log-probs of a ``values`` cache).

    Any use (indexing, ``.shape``, numpy conversion, ``len``) raises ShardFormatError naming the codec, so code that
    needs ids fails at once with a clear message instead of computing with a wrong tensor.
    """

    def __init__(self, field: str, codec: str):
        self._msg = (
            f"{field}: a {codec!r} cache stores only the sorted top-K values (what the ULD loss needs); "
            f"rebuild the cache with --codec full or raw to get {field}"
        )

    def _fail(self, *_args, **_kwargs):
        raise ShardFormatError(self._msg)

    __getitem__ = __len__ = __array__ = __iter__ = _fail

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self._fail()

    def __bool__(self) -> bool:
        return False
