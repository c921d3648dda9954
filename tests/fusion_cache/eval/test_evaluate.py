"""`fusion_cache.eval.evaluate` on the tiny model: answer CE of an input file's rows, a cache's metrics, several
teachers' caches at once (`evaluate_teachers`), `run_eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fusion_cache.cache.reader import CacheReader
from fusion_cache.errors import ConfigError
from fusion_cache.eval.evaluate import eval_table
from fusion_cache.eval.evaluate import evaluate_model
from fusion_cache.eval.evaluate import evaluate_rows
from fusion_cache.eval.evaluate import evaluate_teachers
from fusion_cache.eval.evaluate import run_eval
from fusion_cache.models.load import load_student
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.trainer import run_train


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = load_student(str(tiny_model_dir))
    return model, tok


def test_rows_of_a_file_give_the_same_ce_as_the_cache_of_those_rows(tiny, data_file, built_cache):
    model, tok = tiny
    rows = evaluate_rows(model, tok, str(data_file), batch_size=2)
    assert math.isfinite(rows["answer_ce"]) and rows["answer_ce"] > 0
    assert rows["samples"] == 4  # the row with an empty answer is skipped, as `build` skips it
    assert rows["top1_agreement"] is None and rows["uld"] is None
    # the cache holds the same rows rendered the same way: the same tokens and the same CE
    cached = evaluate_model(model, tok, str(built_cache), batch_size=3, k=8)
    assert rows["answer_tokens"] == cached["answer_tokens"]
    assert rows["answer_ce"] == pytest.approx(cached["answer_ce"], rel=1e-5)
    # ECE sums per-bin gaps over batches: the batch size does not change it
    assert 0.0 <= rows["answer_ece"] <= 1.0 and rows["answer_ece"] == pytest.approx(cached["answer_ece"], abs=1e-6)
    assert 0.0 <= cached["top1_agreement"] <= 1.0 and cached["uld"] > 0
    first = evaluate_rows(model, tok, str(data_file), limit=1)
    assert first["samples"] == 1 and first["answer_tokens"] < rows["answer_tokens"]
    assert rows["tail_mass"] is None  # no teacher, no top-K to be outside of


@torch.no_grad()
def test_tail_mass_is_the_students_probability_outside_the_cached_top_k(tiny, built_cache):
    """By hand, row by row: one unpadded forward per cached sample, 1 - sum of softmax at the cached ids."""
    model, tok = tiny
    got = evaluate_model(model, tok, str(built_cache), batch_size=3, k=8)
    outside = []
    for row in CacheReader(str(built_cache)).iter_rows():
        a, n = row.answer_start, len(row.topk_ids)
        logits = model(input_ids=torch.as_tensor(row.input_ids[None].astype("int64"))).logits[0, a - 1 : a - 1 + n]
        probs = torch.softmax(logits.float(), -1)
        outside += (1 - probs.gather(1, torch.as_tensor(row.topk_ids.astype("int64"))).sum(-1)).tolist()
    assert len(outside) == got["answer_tokens"]
    assert got["tail_mass"] == pytest.approx(sum(outside) / len(outside), rel=1e-4)
    assert 0.0 < got["tail_mass"] < 1.0
    table = eval_table({"cache": {"path": "c", "k": 8} | got, "wall_seconds": 0.0})
    assert f"| student mass outside the teacher's cached top-K (cache) | {got['tail_mass']:.4f} |" in table


def test_run_eval_of_a_run_directory_writes_eval_json(tmp_path, tiny_model_dir, data_file, built_cache):
    run = tmp_path / "run"
    cfg = TrainConfig.create(student=str(tiny_model_dir), shards=[str(built_cache)], out=str(run), batch_size=2,
                             max_steps=1, top_k=8)  # fmt: skip
    run_train(cfg, progress=False)
    result = run_eval(str(run), data=str(data_file), cache=str(built_cache), k=8)
    assert result["model"] == str(run / "model") and result["written_to"] == str(run / "eval.json")
    saved = json.loads((run / "eval.json").read_text())
    assert saved["data"]["answer_ce"] == result["data"]["answer_ce"] and math.isfinite(saved["cache"]["answer_ce"])
    table = eval_table(result)
    assert f"| {result['cache']['top1_agreement']:.4f} |" in table and "HumanEval" not in table
    # a cache passed as --data is evaluated as a cache
    as_data = run_eval(str(tiny_model_dir), data=str(built_cache), k=8, out=str(tmp_path / "e.json"))
    assert "data" not in as_data and as_data["cache"]["answer_ce"] == pytest.approx(
        json.loads((tmp_path / "e.json").read_text())["cache"]["answer_ce"]
    )


def test_run_eval_refuses_what_it_cannot_evaluate(tmp_path, tiny_model_dir, built_cache):
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_eval(str(tiny_model_dir))
    with pytest.raises(ConfigError, match="does not exist"):
        run_eval(str(tiny_model_dir), data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="not a fusion-cache cache"):
        run_eval(str(tiny_model_dir), cache=str(tmp_path))
    with pytest.raises(ConfigError, match="pass one cache"):
        run_eval(str(tiny_model_dir), data=str(built_cache), cache=str(built_cache))


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


def test_token_classes_give_the_ce_of_their_tokens(tiny, data_file):
    """The numerals probe: the answer CE over the digit tokens only, against the per-token CE by hand."""
    import torch
    import torch.nn.functional as F

    from fusion_cache.capture.inputs import read_conversations
    from fusion_cache.capture.render import render
    from fusion_cache.train.vocab import digit_tokens

    model, tok = tiny
    digits = digit_tokens(tok)
    assert digits[tok.convert_tokens_to_ids("7")] and not digits[tok.eos_token_id]
    r = evaluate_rows(model, tok, str(data_file), batch_size=2, token_classes={"digits": digits, "all": digits | True})
    assert r["answer_ce_all"] == pytest.approx(r["answer_ce"], rel=1e-5) and r["tokens_all"] == r["answer_tokens"]
    total = n = 0
    for conv in read_conversations(str(data_file)):
        if not conv.response:
            continue
        rd = render(tok, conv.messages, chat_template=True)
        ids = torch.as_tensor(rd.input_ids, dtype=torch.long)
        with torch.no_grad():
            logits = model(ids[None]).logits[0, rd.answer_start - 1 : -1]
        ce = F.cross_entropy(logits, ids[rd.answer_start :], reduction="none")
        sel = torch.as_tensor(digits)[ids[rd.answer_start :]]
        total, n = total + float(ce[sel].sum()), n + int(sel.sum())
    assert n > 0 and r["tokens_digits"] == n and r["answer_ce_digits"] == pytest.approx(total / n, rel=1e-4)


def test_run_eval_checks_the_model_against_the_cache_before_loading_it(tmp_path, built_cache, other_teacher_dir,
                                                                       tiny_model_dir):  # fmt: skip
    import shutil

    small = tmp_path / "small"  # the cache's tokenizer, a smaller embedding, and weights that cannot load (a sentinel)
    shutil.copytree(tiny_model_dir, small)
    (small / "model.safetensors").write_bytes(b"not a safetensors file")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(ConfigError, match=r"vocab_size=1000\): the student's input tokens reach id"):
        run_eval(str(small), cache=str(built_cache))
    seen = []
    result = run_eval(str(other_teacher_dir), cache=str(built_cache), on_check=seen.append)
    note = "top-1 agreement not computed for tiny-qwen2 (another tokenizer"
    assert len(seen) == 1 and note in seen[0].line(top1=True) and note not in seen[0].line()
    assert result["cache"]["top1_agreement"] is None and result["cache"]["top1_note"].startswith(note)
    assert f"| teacher top-1 agreement (cache) | n/a: {note}" in eval_table(result)
    same = run_eval(str(tiny_model_dir), cache=str(built_cache), limit=2)
    assert same["cache"]["top1_note"] is None and same["cache"]["top1_agreement"] is not None
