"""evaluate.evaluate_teachers against evaluate_model on real tiny caches (one same-tokenizer, one other)."""

from __future__ import annotations

import pytest

from fusion_cache.cache.reader import CacheReader
from fusion_cache.evaluate import evaluate_model
from fusion_cache.evaluate import evaluate_teachers
from fusion_cache.train import load_student


@pytest.mark.slow  # builds the shared tiny caches when run alone
def test_evaluate_teachers_matches_evaluate_model_and_adds_the_other_teacher(tiny_model_dir, multi_caches):
    model, tok, _ = load_student(str(tiny_model_dir))
    a, b = str(multi_caches["a"]), str(multi_caches["b"])
    one = evaluate_model(model, tok, a, k=6, batch_size=3)
    both = evaluate_teachers(model, tok, [a, b], k=6, batch_size=3)
    # the student's tokens and CE come from the same-tokenizer cache, whichever teachers join it
    assert both["samples"] == one["samples"] == 8 and both["answer_tokens"] == one["answer_tokens"]
    assert both["answer_ce"] == pytest.approx(one["answer_ce"], rel=1e-5)
    assert both["top1_agreement"] == pytest.approx(one["top1_agreement"])
    ulds = list(both["uld"].values())
    assert ulds[0] == pytest.approx(one["uld"], rel=1e-4)  # per-sample mean, then mean over samples, as evaluate_model
    assert ulds[1] is not None and ulds[1] > 0 and list(both["aligned"].values())[1] > 0  # the other tokenizer
    # a subset of samples: only those are evaluated; teacher b lacks rows 5-7, so its ULD covers what it has
    ids = [r.sample_id for r in CacheReader(a).iter_rows()]
    sub = evaluate_teachers(model, tok, [a, b], k=6, sample_ids=set(ids[5:]))
    assert sub["samples"] == 3 and list(sub["uld"].values())[1] is None
