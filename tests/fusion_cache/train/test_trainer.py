"""End to end on the tiny model: build a cache, train a student from it, evaluate; deterministic under a seed."""

from __future__ import annotations

import json
import math

import pytest

from fusion_cache.errors import ConfigError
from fusion_cache.eval.evaluate import evaluate_model
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.trainer import lr_lambda
from fusion_cache.train.trainer import run_train


def _train(student, cache, out, **kw):
    base = dict(student=str(student), shards=[str(cache)], out=str(out), batch_size=2, lr=3e-3, max_steps=8)
    return run_train(TrainConfig.create(**{**base, **kw}), progress=False)


def test_build_then_train_then_evaluate(tmp_path, built_cache, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    before = evaluate_model(*_load(tiny_model_dir), str(built_cache), k=8)
    res = _train(tiny_model_dir, built_cache, tmp_path / "run", **{"lambda": 0.5, "top_k": 8})
    after = evaluate_model(res.model, res.tokenizer, str(built_cache), k=8)
    assert after["answer_ce"] < before["answer_ce"] - 0.1  # it learned the cached answers
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) and r["kd"] >= 0 and r["uld_tiny-qwen2"] >= 0 for r in lines)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")  # safetensors that transformers loads
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert reloaded.config.vocab_size == res.model.config.vocab_size
    assert 0.0 <= after["top1_agreement"] <= 1.0


def test_same_seed_same_losses_and_lambda_changes_them(tmp_path, built_cache, tiny_model_dir):
    a = _train(tiny_model_dir, built_cache, tmp_path / "a", max_steps=3, save=False)
    b = _train(tiny_model_dir, built_cache, tmp_path / "b", max_steps=3, save=False)
    c = _train(tiny_model_dir, built_cache, tmp_path / "c", max_steps=3, save=False, **{"lambda": 0.0})
    la, lb, lc = ((tmp_path / n / "metrics.jsonl").read_text() for n in "abc")
    assert la == lb.replace(str(tmp_path / "b"), str(tmp_path / "a")) or _losses(la) == _losses(lb)
    assert _losses(la)[1:] != _losses(lc)[1:]
    assert a.summary["steps"] == b.summary["steps"] == c.summary["steps"] == 3


def test_student_with_another_tokenizer_trains(tmp_path, built_cache):
    from fusion_cache.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "llama", arch="llama", vocab_size=1024)
    res = _train(other, built_cache, tmp_path / "run", max_steps=2, save=False)
    assert evaluate_model(res.model, res.tokenizer, str(built_cache))["top1_agreement"] is None
    with pytest.raises(ConfigError, match="needs the teacher's token ids in the student's vocabulary"):
        _train(other, built_cache, tmp_path / "kl", max_steps=1, save=False, kd_loss="kl")


def test_top_k_kl_distillation_trains_and_logs_both_terms(tmp_path, built_cache, tiny_model_dir):
    _train(tiny_model_dir, built_cache, tmp_path / "kl", max_steps=4, save=False, kd_loss="kl", top_k=8)
    _train(tiny_model_dir, built_cache, tmp_path / "uld", max_steps=4, save=False, top_k=8)
    kl, uld = (_records(tmp_path / n) for n in ("kl", "uld"))
    assert all(r["kl_tiny-qwen2"] >= -1e-6 and math.isfinite(r["kd"]) for r in kl)
    assert "kl_tiny-qwen2" not in uld[0] and uld[0]["uld_tiny-qwen2"] >= 0
    assert [r["loss"] for r in kl] != [r["loss"] for r in uld]
    with pytest.raises(ConfigError, match="kd_loss"):
        TrainConfig.create(student="s", shards=["c"], out="o", kd_loss="mse")


def test_kd_temperature_reaches_the_kl_and_uld_refuses_it(tmp_path, built_cache, tiny_model_dir):
    _train(tiny_model_dir, built_cache, tmp_path / "t1", max_steps=2, save=False, kd_loss="kl", top_k=8)
    _train(tiny_model_dir, built_cache, tmp_path / "t2", max_steps=2, save=False, kd_loss="kl", top_k=8,
           kd_temperature=2.0)  # fmt: skip
    t1, t2 = (_records(tmp_path / n) for n in ("t1", "t2"))
    assert t1[0]["ce"] == pytest.approx(t2[0]["ce"]) and t1[0]["kd"] != pytest.approx(t2[0]["kd"])
    with pytest.raises(ConfigError, match="kd_temperature=2.0 with kd_loss 'uld'"):
        _train(tiny_model_dir, built_cache, tmp_path / "u", max_steps=2, save=False, top_k=8, kd_temperature=2.0)


def test_schedule_warms_up_then_decays():
    f = lr_lambda(total_steps=10, warmup_steps=2)
    assert f(0) == 0.5 and f(1) == 1.0 and f(9) < 0.05 and all(f(i) >= f(i + 1) for i in range(1, 9))


def test_train_settings_are_validated():
    with pytest.raises(ConfigError, match=r"lambda.*less than or equal to 1"):
        TrainConfig.create(student="s", shards=["c"], out="o", **{"lambda": 1.5})
    with pytest.raises(ConfigError, match="shards"):
        TrainConfig.create(student="s", shards=[], out="o")
    with pytest.raises(ConfigError, match="tail=True.*zscore=False"):
        TrainConfig.create(student="s", shards=["c"], out="o", tail=True)


def test_tail_bucket_variant_trains_and_changes_the_loss(tmp_path, built_cache, tiny_model_dir):
    opts = dict(max_steps=2, save=False, zscore=False, top_k=8)
    plain = _train(tiny_model_dir, built_cache, tmp_path / "a", **opts)
    tail = _train(tiny_model_dir, built_cache, tmp_path / "b", **opts, tail=True)
    la, lb = (_losses((tmp_path / n / "metrics.jsonl").read_text()) for n in "ab")
    assert all(math.isfinite(x) for x in lb) and la != lb
    assert plain.summary["steps"] == tail.summary["steps"] == 2


def _load(path):
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _losses(text):
    return [round(json.loads(line)["loss"], 6) for line in text.splitlines()]


@pytest.mark.slow
def test_trains_and_evaluates_from_a_values_cache(tmp_path, tiny_model_dir, data_file, hf_engine):
    """A `values` cache has no ids: ULD training works, the top-1 agreement (which needs ids) is reported as None."""
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig

    cache = tmp_path / "values"
    cfg = BuildConfig.create(
        teacher=str(tiny_model_dir), data=str(data_file), out=str(cache), top_k=8, engine="hf", codec="values"
    )
    run_build(cfg, engine=hf_engine, progress=False)
    res = _train(tiny_model_dir, cache, tmp_path / "run", max_steps=3, save=False, **{"lambda": 0.5, "top_k": 8})
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in lines)
    metrics = evaluate_model(res.model, res.tokenizer, str(cache), k=8)
    assert metrics["top1_agreement"] is None and math.isfinite(metrics["uld"])
    with pytest.raises(ValueError, match="a cache whose codec stores ids"):
        _train(tiny_model_dir, cache, tmp_path / "kl", max_steps=1, save=False, kd_loss="kl")
    with pytest.raises(ValueError, match="combine 'min_ce': teacher .*codec 'values'"):
        _train(tiny_model_dir, cache, tmp_path / "min_ce", max_steps=1, save=False, combine="min_ce")
    with pytest.raises(ValueError, match="kd_gate 'student': teacher .*codec 'values'"):
        _train(tiny_model_dir, cache, tmp_path / "gate", max_steps=1, save=False, kd_gate="student")


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_min_ce_trains_two_teachers_and_weights_by_their_answer_scores(tmp_path, multi_caches, tiny_model_dir):
    cfg = TrainConfig.create(
        student=str(tiny_model_dir), shards=[str(multi_caches["a"]), str(multi_caches["b"])], out=str(tmp_path),
        combine="min_ce", kd_loss=["kl", "mapped_kl"], batch_size=2, max_steps=3, top_k=6, lr=1e-3, save=False,
    )  # fmt: skip
    run_train(cfg, progress=False)
    lines = _records(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in lines)


@pytest.mark.slow
def test_the_student_gate_logs_each_teachers_open_share_and_changes_only_the_distillation(
    tmp_path, multi_caches, tiny_model_dir
):
    """``kd_gate="student"``: each step logs ``gate_<teacher>``, the share of its samples a teacher distilled (in
    [0, 1]); the first step's CE (before any update) is the ungated run's, its KD term at most the ungated one's."""
    runs = {}
    for gate in ("none", "student"):
        cfg = TrainConfig.create(
            student=str(tiny_model_dir), shards=[str(multi_caches["a"]), str(multi_caches["b"])],
            out=str(tmp_path / gate), combine="mean", kd_loss=["kl", "mapped_kl"], batch_size=4, max_steps=3,
            top_k=6, lr=1e-3, save=False, kd_gate=gate,
        )  # fmt: skip
        run_train(cfg, progress=False)
        runs[gate] = _records(tmp_path / gate)
    gated, plain = runs["student"], runs["none"]
    assert all(0.0 <= r[f"gate_{t}"] <= 1.0 for r in gated for t in ("tiny-qwen2", "tiny-llama"))
    assert "gate_tiny-qwen2" not in plain[0]
    assert gated[0]["ce"] == pytest.approx(plain[0]["ce"], rel=1e-6)
    assert gated[0]["kd"] <= plain[0]["kd"] + 1e-7
    assert all(math.isfinite(r["loss"]) for r in gated)


@pytest.mark.slow
def test_a_run_with_two_teachers_logs_each_teacher(tmp_path, multi_caches, tiny_model_dir):
    cfg = TrainConfig.create(
        student=str(tiny_model_dir), shards=[str(multi_caches["a"]), str(multi_caches["b"])], out=str(tmp_path),
        combine="uncertainty", batch_size=2, max_steps=3, top_k=6, lr=1e-3, save=False,
    )  # fmt: skip
    res = run_train(cfg, progress=False)
    lines = _records(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["uld_tiny-qwen2"] is not None and r["loss"] > 0 for r in lines)
    assert any(r["uld_tiny-llama"] is not None for r in lines)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["teachers"] == ["tiny-qwen2", "tiny-llama"] == res.summary["teachers"]
    assert summary["fusion"]["join"]["missing"]["tiny-llama"] >= 1 and summary["fusion"]["align_mode"] == "bytes"


@pytest.mark.slow
def test_each_teacher_trains_with_its_own_loss(tmp_path, multi_caches, tiny_model_dir):
    """kl for the teacher with the student's tokenizer and a cross-tokenizer loss for the other, in one run; auto
    picks kl and mapped_kl."""
    base = dict(student=str(tiny_model_dir), shards=[str(multi_caches["a"]), str(multi_caches["b"])], batch_size=2,
                max_steps=2, top_k=6, lr=1e-3, save=False, seed=3)  # fmt: skip
    runs = {}
    for name, kd in (("uld", ["kl", "uld"]), ("mapped", ["kl", "mapped_kl"]), ("hybrid", ["kl", "hybrid"]),
                     ("auto", "auto")):  # fmt: skip
        runs[name] = run_train(TrainConfig.create(**base, out=str(tmp_path / name), kd_loss=kd), progress=False)
    assert runs["auto"].summary["kd_loss"] == {"tiny-qwen2": "kl", "tiny-llama": "mapped_kl"}
    for name, loss in (("uld", "uld"), ("mapped", "mapped_kl"), ("hybrid", "hybrid")):
        rec = _records(tmp_path / name)
        assert runs[name].summary["kd_loss"]["tiny-llama"] == loss
        assert {"kl_tiny-qwen2", f"{loss}_tiny-llama"} <= set(rec[0]) and rec[0]["kl_tiny-qwen2"] >= -1e-6
        assert all(math.isfinite(r["loss"]) for r in rec)
    assert [r["loss"] for r in _records(tmp_path / "mapped")] == [r["loss"] for r in _records(tmp_path / "auto")]
    assert [r["loss"] for r in _records(tmp_path / "mapped")] != [r["loss"] for r in _records(tmp_path / "uld")]
    with pytest.raises(ConfigError, match="kd_loss 'kl' for teacher tiny-llama"):
        run_train(TrainConfig.create(**base, out=str(tmp_path / "bad"), kd_loss="kl"), progress=False)


@pytest.mark.slow
def test_rs_kl_trains_from_sampled_caches_of_either_tokenizer(tmp_path, sampled_caches, tiny_model_dir):
    """A sampled cache of the student's tokenizer (its draws as they are) and one of another tokenizer (the draws'
    weights carried through the vocabulary map): auto picks rs_kl for both, the run learns, other losses are refused."""
    base = dict(student=str(tiny_model_dir), shards=[str(sampled_caches["a"]), str(sampled_caches["b"])],
                batch_size=2, max_steps=3, lr=1e-3, save=False, seed=3)  # fmt: skip
    res = run_train(TrainConfig.create(**base, out=str(tmp_path / "auto"), kd_loss="auto"), progress=False)
    assert res.summary["kd_loss"] == {"tiny-qwen2": "rs_kl", "tiny-llama": "rs_kl"}
    rec = _records(tmp_path / "auto")
    assert {"rs_kl_tiny-qwen2", "rs_kl_tiny-llama"} <= set(rec[0])
    assert all(math.isfinite(r["loss"]) for r in rec)
    assert any(r["rs_kl_tiny-llama"] is not None and r["rs_kl_tiny-llama"] != 0 for r in rec)
    hot = run_train(TrainConfig.create(**base, out=str(tmp_path / "t2"), kd_loss="rs_kl", kd_temperature=2.0),
                    progress=False)  # fmt: skip
    assert hot.summary["kd_loss"] == res.summary["kd_loss"]
    assert [r["loss"] for r in _records(tmp_path / "t2")] != [r["loss"] for r in rec]
    for bad in ("kl", "uld", "mapped_kl"):
        with pytest.raises(ConfigError, match=f"kd_loss '{bad}' for teacher tiny-qwen2: its cache holds tokens"):
            run_train(TrainConfig.create(**base, out=str(tmp_path / bad), kd_loss=bad), progress=False)


@pytest.mark.slow
def test_auto_falls_back_to_uld_when_a_foreign_teachers_tokenizer_is_not_found(
    tmp_path, multi_caches, tiny_model_dir, monkeypatch, caplog
):
    """No stored copy of the teacher's tokenizer and no Hub: auto trains that teacher with uld and says why; an
    explicit mapped_kl is refused before any work, naming what was tried."""
    monkeypatch.setenv("FUSION_CACHE_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = dict(student=str(tiny_model_dir), shards=[str(multi_caches["a"]), str(multi_caches["b"])], batch_size=2,
                max_steps=1, save=False)  # fmt: skip
    with caplog.at_level("WARNING", logger="fusion_cache.train.trainer"):
        res = run_train(TrainConfig.create(**base, out=str(tmp_path / "auto"), kd_loss="auto"), progress=False)
    assert res.summary["kd_loss"] == {"tiny-qwen2": "kl", "tiny-llama": "uld"}
    assert "teacher tiny-llama: kd_loss auto picks uld, not mapped_kl" in caplog.text
    with pytest.raises(ConfigError, match="teacher tiny-llama: the cache's tokenizer .* none was found"):
        run_train(TrainConfig.create(**base, out=str(tmp_path / "m"), kd_loss=["kl", "mapped_kl"]), progress=False)


def test_config_rules_for_several_caches(tmp_path):
    base = dict(student="s", out=str(tmp_path))
    with pytest.raises(ConfigError, match="given twice"):
        TrainConfig.create(shards=["a", "a"], **base)
    with pytest.raises(ConfigError, match="combine"):
        TrainConfig.create(shards=["a", "b"], combine="max", **base)
    with pytest.raises(ConfigError, match="one per cache"):
        TrainConfig.create(shards=["a", "b", "c"], kd_loss=["kl", "uld"], **base)
    names = "'uld', 'kl', 'kl_notail', 'mapped_kl', 'hybrid', 'rs_kl' or 'auto'"
    with pytest.raises(ConfigError, match=f"kd_loss.0: Input should be {names}"):
        TrainConfig.create(shards=["a"], kd_loss="mse", **base)
    cfg = TrainConfig.create(shards=["a", "b"], kd_loss="kl", **base)
    assert (cfg.combine, cfg.align, cfg.kd_loss) == ("mean", "bytes", ["kl"])
