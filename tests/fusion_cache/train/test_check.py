"""`train.check` on real caches of the tiny models: a student with the teacher's tokenizer and one with another,
the rows counted by the training stream itself, and the refusals train and eval make before loading any weights."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from fusion_cache.errors import ConfigError
from fusion_cache.models.load import load_tokenizer
from fusion_cache.train.check import check_caches
from fusion_cache.train.check import student_vocab_size
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.stream import DistillStream
from fusion_cache.train.trainer import run_train


def _check(student, caches, **kw):
    kw.setdefault("student_vocab", student_vocab_size(str(student)))
    return check_caches([str(c) for c in caches], load_tokenizer(str(student)), student=str(student), **kw)


def _stream_counts(student, caches, **kw):
    """What a whole pass of the training stream counts (the numbers the check must reproduce)."""
    tok = load_tokenizer(str(student))
    stream = DistillStream([str(c) for c in caches], tok, chat_template=True, max_length=1024, epochs=1, **kw)
    for _ in stream:
        pass
    return stream.counts()


def test_same_and_another_tokenizer_student(multi_caches, tiny_model_dir):
    a, b = multi_caches["a"], multi_caches["b"]
    report = _check(tiny_model_dir, [a, b], limit=None)
    same, other = report.teachers
    assert (same.tokenizer, same.template, same.alignment) == ("same", "same", "index")
    assert (other.tokenizer, other.template, other.alignment) == ("another", "another", "bytes")
    # a top-K cache of the student's own tokenizer: every top-K loss; rs_kl wants a sampled cache
    assert all(why is None for name, why in same.losses.items() if name != "rs_kl")
    assert "holds a top-K, not sampled tokens" in same.losses["rs_kl"]
    assert other.losses["kl"] and "needs the teacher's token ids" in other.losses["kl"]
    assert other.losses["uld"] is None and other.losses["mapped_kl"] is None and other.losses["hybrid"] is None
    # the rows are the training stream's own counts over the same samples
    counts = _stream_counts(tiny_model_dir, [a, b])["align"]
    for t in report.teachers:
        assert {k: t.rows[k] for k in counts[t.name]} == counts[t.name]
    assert 0 < other.rows["aligned"] < other.rows["aligned"] + other.rows["dropped_student"]
    skipped = {"no_answer_token": 0, "nothing_aligned": 0}
    rows = same.rows["aligned"]
    assert report.samples == {"checked": 8, "usable": 8, "skipped": skipped, "student_answer_rows": rows,
                              "truncated_answer_rows": 0, "all": True}  # fmt: skip
    assert same.coverage is None and same.note.startswith("identity")
    assert 0.9 < other.coverage["mapped_mass"] <= 1.0 and 0.9 < other.coverage["mapped_ids"] <= 1.0
    assert sum(other.coverage["mass"].values()) == pytest.approx(1.0)
    assert report.problems == [] and report.student_vocab == 4096
    line = report.line()
    assert "\n" not in line and line.startswith(f"check: student {tiny_model_dir} (vocab 4096);")
    assert "tiny-llama: another tokenizer, bytes alignment" in line and "8 of 8 samples usable" in line
    table = report.table()
    assert "losses refused" in table and "kl, kl_notail" in table and "(the whole join)" in table
    assert same.answer_scores and other.answer_scores and "min_ce / kd-gate  yes" in table
    assert json.loads(json.dumps(report.as_dict()))["teachers"][1]["alignment"] == "bytes"


def test_a_student_of_another_tokenizer_gets_byte_spans_and_the_loss_auto_picks(multi_caches, other_teacher_dir):
    a = multi_caches["a"]
    report = _check(other_teacher_dir, [a], kd_loss=["auto"], limit=None)
    (t,) = report.teachers
    assert (t.tokenizer, t.alignment, t.loss) == ("another", "bytes", "mapped_kl")
    # the carried target: every student row inside a span the teacher predicted (`train.stream`)
    counts = _stream_counts(other_teacher_dir, [a], targets=["carried"], maps=[_map(a, other_teacher_dir)])
    assert t.rows["aligned"] == counts["align"][t.name]["aligned"]
    kl = _check(other_teacher_dir, [a], kd_loss=["kl"])
    assert kl.problems and kl.problems[0].startswith("kd_loss 'kl' for teacher tiny-qwen2")
    with pytest.raises(ConfigError, match="kd_loss: unknown value 'nope'; valid values: .*auto"):
        _check(other_teacher_dir, [a], kd_loss=["nope"])


def _map(cache, student):
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.train.vocab import teacher_tokenizer
    from fusion_cache.train.vocab import vocab_map

    return vocab_map(teacher_tokenizer(CacheReader(str(cache)).manifest), load_tokenizer(str(student)))


def test_max_length_cuts_and_skips_rows(multi_caches, tiny_model_dir):
    report = _check(tiny_model_dir, [multi_caches["a"]], max_length=24)
    s = report.samples
    assert s["truncated_answer_rows"] > 0 and s["usable"] + s["skipped"]["no_answer_token"] == s["checked"]
    assert "cut by max_length=24" in report.line()
    nothing = _check(tiny_model_dir, [multi_caches["a"]], max_length=2)
    assert nothing.samples["usable"] == 0
    with pytest.raises(ConfigError, match="max_length=2: none of the 8 samples"):
        nothing.refuse()


def test_limit_checks_the_first_samples_only(multi_caches, tiny_model_dir):
    report = _check(tiny_model_dir, [multi_caches["a"]], limit=3)
    assert report.samples["checked"] == 3 and report.samples["all"] is False


def test_ids_beyond_the_students_vocabulary_and_a_cache_without_ids(multi_caches, tiny_model_dir, synthetic_caches):
    report = _check(tiny_model_dir, [multi_caches["a"]], student_vocab=1000, kd_loss=["kl"])
    assert len(report.problems) == 2  # the cached input tokens and the teacher's top-K ids
    with pytest.raises(ConfigError, match=r"\(vocab_size=1000\): the student's input tokens reach id \d+"):
        report.refuse()
    values = _check(tiny_model_dir, [synthetic_caches["values"]], kd_loss=["mapped_kl"])
    assert "a 'values' cache stores no token ids" in values.problems[0]
    assert values.teachers[0].note == "n/a (codec 'values' stores no ids)"
    # no answer log-probs: min_ce and the student gate are refused by train; the check says so up front
    assert not values.teachers[0].answer_scores and "no (codec values)" in values.table()


# ------------------------------------------------------------------------------------------- before any weights load
def _broken_weights(model_dir, tmp_path, **config_edits):
    """A copy of a model whose weights cannot load (a sentinel: loading them raises), its config edited."""
    out = tmp_path / f"broken-{model_dir.name}"
    shutil.copytree(model_dir, out)
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **config_edits}))
    return out


def _train_cfg(student, cache, out, **kw):
    return TrainConfig.create(student=str(student), shards=[str(cache)], out=str(out), max_steps=1, save=False, **kw)


def test_train_refuses_before_writing_or_loading(tmp_path, built_cache, other_teacher_dir, tiny_model_dir):
    foreign = _broken_weights(other_teacher_dir, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="kd_loss 'kl' for teacher tiny-qwen2"):
        run_train(_train_cfg(foreign, built_cache, tmp_path / "kl", kd_loss="kl"), progress=False)
    assert not (tmp_path / "kl").exists() and time.perf_counter() - t0 < 30
    small = _broken_weights(tiny_model_dir, tmp_path, vocab_size=1000)  # the teacher's tokenizer, a smaller embedding
    with pytest.raises(ConfigError, match=r"vocab_size=1000\): the student's input tokens reach id"):
        run_train(_train_cfg(small, built_cache, tmp_path / "small"), progress=False)
    assert not (tmp_path / "small").exists()
    # the same student with its weights: the check passes, is handed over once, and the run records it
    seen = []
    res = run_train(_train_cfg(other_teacher_dir, built_cache, tmp_path / "ok", batch_size=2), progress=False,
                    on_check=seen.append)  # fmt: skip
    assert len(seen) == 1 and seen[0].teachers[0].alignment == "bytes"
    assert res.summary["check"] == seen[0].line() and res.summary["fusion"]["align_mode"] == "bytes"
