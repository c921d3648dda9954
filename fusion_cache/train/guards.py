"""What a training run checks on every step, because its caches may come from strangers.

The cache layer has already checked every row against its own manifest (cache/validate.py): ids below the
teacher's vocabulary, finite sorted log-probs, ... What only the trainer knows is the student: `check_examples`
refuses token ids (the cached tokens a same-tokenizer teacher hands over, and its top-K ids for a KL loss) outside
the student's vocabulary, `check_signatures` (``--require-signature``) refuses a cache no trusted key signed, and
`check_step` stops the run at the first step whose loss or gradient norm is not
finite, before the optimizer applies it. Both errors name the step and the cache rows of the batch's samples.
"""

from __future__ import annotations

import math

from fusion_cache.errors import NonFiniteLossError
from fusion_cache.errors import ShardFormatError

_SHOWN = 4  # samples named in an error (a batch may hold hundreds)


def check_signatures(readers: list, trusted_keys: list[str]) -> None:
    """``train --require-signature``: every cache must carry a valid signature of one of ``trusted_keys`` over the
    fingerprint its reader loaded (fusion_cache/cache/signature.py), checked before any shard is read: the reader
    then checks every shard against that fingerprint's shard list.

    Raises:
        SignatureError: naming the cache that has none.
    """
    from fusion_cache.cache.signature import verify_signature

    for reader in readers:
        verify_signature(str(reader.path), trusted_keys, fingerprint=reader.manifest.fingerprint)


def describe_rows(examples: list, stream) -> str:
    """Where the samples of a batch come from: ``sample <id> (<teacher>: <shard>, record batch b, row r; ...)``."""
    out = []
    for ex in examples[:_SHOWN]:
        refs = getattr(ex, "refs", None) or []
        where = [
            f"{name}: {reader.manifest.shards[ref.shard].path}, record batch {ref.batch}, row {ref.row}"
            for name, reader, ref in zip(stream.names, stream.readers, refs, strict=False)
            if ref is not None
        ]
        out.append(f"sample {ex.sample_id}" + (f" ({'; '.join(where)})" if where else ""))
    more = f" and {len(examples) - _SHOWN} more" if len(examples) > _SHOWN else ""
    return ", ".join(out) + more


def student_vocab(model) -> int:
    """Rows of the student's token embedding and of its output layer, whichever is smaller: ids at or above it would
    index past a weight matrix."""
    n = model.get_input_embeddings().num_embeddings
    out = model.get_output_embeddings()
    if out is not None and getattr(out, "out_features", None) is not None:
        n = min(n, out.out_features)
    return int(n)


def check_examples(examples: list, vocab: int, at: str, stream) -> None:
    """Refuse a micro-batch whose student tokens or teacher ids lie outside the student's vocabulary [0, vocab)
    (a teacher id may be -1: a token the vocabulary map found no student id for).

    Args:
        at: where the batch is used, for the message ("step 12", "evaluation").

    Raises:
        ShardFormatError: naming ``at``, the sample and its cache rows.
    """
    for ex in examples:
        problem = None
        ids = ex.input_ids
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            problem = f"token id {int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())} of its input"
        for name, target in zip(stream.names, ex.teachers, strict=False):
            if problem is None and target is not None and target.ids is not None and target.ids.size:
                lo, hi = int(target.ids.min()), int(target.ids.max())
                if lo < -1 or hi >= vocab:  # -1: a mapped teacher token with no student id (train.stream)
                    problem = f"top-K id {hi if hi >= vocab else lo} of teacher {name}"
        if problem is not None:
            raise ShardFormatError(
                f"{at}: {describe_rows([ex], stream)}: {problem} is outside the student's vocabulary "
                f"[0, {vocab}) (the cache's tokenizer_hash says the teacher shares the student's tokenizer)"
            )


def check_step(step: int, loss: float, grad_norm: float | None, examples: list, stream) -> None:
    """Stop at the first step whose loss (or gradient norm) is NaN or infinite, before the optimizer applies it.

    Raises:
        NonFiniteLossError: naming the step, the value and the cache rows of the step's samples.
    """
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if value is not None and not math.isfinite(value):
            raise NonFiniteLossError(
                f"step {step}: the {what} is {value}; the run stopped before applying it. The step trained on "
                f"{describe_rows(examples, stream)}"
            )
