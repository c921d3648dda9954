"""`run_merge` on tiny real models: identity, formula over a whole model, dtypes, tied weights, sharded input and
output, run-dir layout, refusals naming the tensor or field, and loading the result with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file

from fusion_cache.errors import ConfigError
from fusion_cache.merge import methods
from fusion_cache.merge.config import METHODS
from fusion_cache.merge.config import MergeConfig
from fusion_cache.merge.io import INDEX_FILE
from fusion_cache.merge.io import SafetensorsModel
from fusion_cache.merge.run import run_merge


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    m = SafetensorsModel(model_dir)
    try:
        return {n: m.tensor(n).clone() for n in m.infos}
    finally:
        m.close()


def _variant(src: Path, dst: Path, *, seed: int, scale: float = 0.01, dtype=None, extra=None) -> Path:
    """A copy of ``src`` with every float tensor moved by scale * N(0, 1) (a stand-in for a fine-tune)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for n, t in load_file(str(src / "model.safetensors")).items():
        t = t + scale * torch.randn(t.shape, generator=g) if scale else t.clone()
        state[n] = t.to(dtype) if dtype else t
    state.update(extra or {})
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _merge(base, models, out, **kw):
    return run_merge(
        MergeConfig.create(base=str(base), models=[str(m) for m in models], out=str(out), **kw), progress=False
    )


@pytest.fixture(scope="module")
def variants(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    return [_variant(tiny_model_dir, d / f"ft{i}", seed=i) for i in range(3)]


@pytest.mark.parametrize("method", METHODS)
def test_merging_the_base_with_itself_returns_it(tiny_model_dir, tmp_path, method):
    out = tmp_path / "m"
    _merge(tiny_model_dir, [tiny_model_dir, tiny_model_dir], out, method=method)
    want, got = _state(tiny_model_dir), _state(out)
    assert want.keys() == got.keys()
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n


@pytest.mark.parametrize("method", ["ties", "sce"])
def test_two_identical_finetunes_merge_to_that_finetune(tiny_model_dir, variants, tmp_path, method):
    opts = {"density": 1.0} if method == "ties" else {"select_topk": 1.0}
    _merge(tiny_model_dir, [variants[0], variants[0]], tmp_path / "m", method=method, **opts)
    want, got = _state(variants[0]), _state(tmp_path / "m")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_streaming_merge_equals_the_formula_on_whole_state_dicts(tiny_model_dir, variants, tmp_path, method):
    base = _state(tiny_model_dir)
    fts = [_state(v) for v in variants]
    summary = _merge(tiny_model_dir, variants, tmp_path / "m", method=method)
    got = _state(tmp_path / "m")
    opts = summary["options"]
    refs = summary["rate_refs"]
    if method == "rsaf":  # the reference rate is ||tau_s|| / ||theta_o|| over the whole model
        num = [sum(float((f[n].double() - base[n].double()).pow(2).sum()) for n in base) ** 0.5 for f in fts]
        den = sum(float(base[n].double().pow(2).sum()) for n in base) ** 0.5
        assert refs == pytest.approx([x / den for x in num], rel=1e-9)
    for n, b in base.items():
        tau = torch.stack([f[n] - b for f in fts])
        if method == "ta":
            delta = methods.task_arithmetic(tau, **opts)
        elif method == "ties":
            delta = methods.ties(tau, **opts)
        elif method == "dare":
            delta = methods.dare(tau, name=n, **opts)
        elif method == "sce":
            delta = methods.sce(tau, **opts)
        else:
            delta = methods.rsaf(tau, b, rate_refs=refs, **opts)
        torch.testing.assert_close(got[n], b + delta, rtol=0, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    prov = json.loads((tmp_path / "m" / "merge_config.json").read_text())
    assert prov["method"] == method and len(prov["models"]) == 3


def test_bf16_base_is_merged_in_fp32_and_written_in_bf16(tiny_model_dir, tmp_path):
    base = _variant(tiny_model_dir, tmp_path / "base", seed=0, scale=0.0, dtype=torch.bfloat16)
    a = _variant(tiny_model_dir, tmp_path / "a", seed=1)  # fp32 fine-tunes, as `train` writes them
    b = _variant(tiny_model_dir, tmp_path / "b", seed=2)
    _merge(base, [a, b], tmp_path / "m", method="ta", alpha=0.5)
    sb, sa, s2, got = _state(base), _state(a), _state(b), _state(tmp_path / "m")
    for n in sb:
        assert got[n].dtype == torch.bfloat16
        want = (sb[n].float() + 0.5 * ((sa[n] - sb[n].float()) + (s2[n] - sb[n].float()))).to(torch.bfloat16)
        assert torch.equal(got[n], want), n


def _shard(src: Path, dst: Path, parts: int = 3) -> Path:
    """Rewrite ``src``'s single safetensors file as ``parts`` shards plus an index json."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(str(src / "model.safetensors"))
    names = sorted(state)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: state[n] for n in names[i::parts]}
        save_file(chunk, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_inputs_and_run_dirs_give_the_same_merge(tiny_model_dir, variants, tmp_path):
    _merge(tiny_model_dir, variants[:2], tmp_path / "plain", method="ties")
    sharded_base = _shard(tiny_model_dir, tmp_path / "base-sharded")
    run_dir = tmp_path / "run"  # `fusion-cache train` writes <run>/model/
    _shard(variants[1], run_dir / "model", parts=2)
    _merge(sharded_base, [variants[0], run_dir], tmp_path / "sharded", method="ties")
    a, b = _state(tmp_path / "plain"), _state(tmp_path / "sharded")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_output_is_sharded_and_loads_with_transformers(tiny_model_dir, variants, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    out = tmp_path / "m"
    summary = _merge(tiny_model_dir, variants[:2], out, method="sce", max_shard_bytes=1_000_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert summary["shards"] == len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(files)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    want = _state(out)
    sd = model.state_dict()
    for n, t in want.items():
        assert torch.equal(sd[n], t), n
    # tied embeddings: no lm_head.weight on disk, and the loaded head is the merged embedding
    assert "lm_head.weight" not in want
    assert torch.equal(model.lm_head.weight, want["model.embed_tokens.weight"])
    ids = tok("def f(x):", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_a_stored_tied_lm_head_is_ignored(tiny_model_dir, variants, tmp_path):
    emb = load_file(str(variants[1] / "model.safetensors"))["model.embed_tokens.weight"]
    b = _variant(variants[1], tmp_path / "b", seed=0, scale=0.0, extra={"lm_head.weight": emb.clone()})
    _merge(tiny_model_dir, [variants[0], b], tmp_path / "m", method="ta")
    _merge(tiny_model_dir, variants[:2], tmp_path / "m2", method="ta")
    a, c = _state(tmp_path / "m"), _state(tmp_path / "m2")
    assert "lm_head.weight" not in a and all(torch.equal(a[n], c[n]) for n in c)


def test_shape_mismatch_names_the_tensor(tiny_model_dir, tmp_path):
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    bad = _variant(tiny_model_dir, tmp_path / "bad", seed=0, scale=0.0, extra={name: state[name][:-1].clone()})
    with pytest.raises(ConfigError, match=rf"{name}.*shape \[{state[name].shape[0] - 1}"):
        _merge(tiny_model_dir, [tiny_model_dir, bad], tmp_path / "m")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.incomplete").exists()


def test_missing_tensor_names_the_tensor(tiny_model_dir, tmp_path):
    dst = tmp_path / "missing"
    shutil.copytree(tiny_model_dir, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(dst / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"'model.norm.weight' of the base is missing"):
        _merge(tiny_model_dir, [dst], tmp_path / "m")
    with pytest.raises(ConfigError, match=r"'model.norm.weight' is not in the base"):
        _merge(dst, [tiny_model_dir], tmp_path / "m")


def test_different_architecture_is_refused(tiny_model_dir, tmp_path):
    other = _variant(tiny_model_dir, tmp_path / "other", seed=0, scale=0.0)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model_type='llama' differs from the base's 'qwen2'"):
        _merge(tiny_model_dir, [other], tmp_path / "m")


def test_bad_inputs_and_options_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        _merge(tiny_model_dir, [tmp_path / "nope"], tmp_path / "m")
    with pytest.raises(ConfigError, match="density=0.5 does not apply to method 'ta'"):
        MergeConfig.create(base="b", models=["a"], out="o", method="ta", density=0.5)
    with pytest.raises(ConfigError, match="drop_rate"):
        MergeConfig.create(base="b", models=["a"], out="o", method="dare", drop_rate=1.0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        _merge(tiny_model_dir, [tiny_model_dir], tmp_path / "full")


def test_thread_count_changes_nothing_and_is_restored(tiny_model_dir, variants, tmp_path):
    before = torch.get_num_threads()
    for method in ("ties", "sce", "rsaf"):
        _merge(tiny_model_dir, variants, tmp_path / f"{method}1", method=method, threads=1)
        assert torch.get_num_threads() == before
        _merge(tiny_model_dir, variants, tmp_path / f"{method}2", method=method, threads=2)
        a, b = _state(tmp_path / f"{method}1"), _state(tmp_path / f"{method}2")
        assert all(torch.equal(a[n], b[n]) for n in a), method  # float64 sums are thread-count independent


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_task_vector_is_refused_naming_the_tensor(tiny_model_dir, tmp_path, bad):
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    t = state[name].clone()
    t[3, 4] = bad
    broken = _variant(tiny_model_dir, tmp_path / "broken", seed=0, scale=0.0, extra={name: t})
    with pytest.raises(ConfigError, match=rf"tensor '{name}': .*broken.* NaN or inf"):
        _merge(tiny_model_dir, [tiny_model_dir, broken], tmp_path / "m", method="rsaf")
    assert not (tmp_path / "m").exists()


def test_dare_merge_depends_on_the_seed_not_on_sharding(tiny_model_dir, variants, tmp_path):
    _merge(tiny_model_dir, variants[:2], tmp_path / "plain", method="dare", seed=5)
    sharded = _shard(variants[1], tmp_path / "ft1-sharded", parts=3)  # another file layout and read order
    _merge(
        _shard(tiny_model_dir, tmp_path / "base-sharded"),
        [variants[0], sharded],
        tmp_path / "sh",
        method="dare",
        seed=5,
    )
    _merge(tiny_model_dir, variants[:2], tmp_path / "other", method="dare", seed=6)
    a, b, c = _state(tmp_path / "plain"), _state(tmp_path / "sh"), _state(tmp_path / "other")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def _base_and_two_finetunes(tmp_path, base: dict, g) -> tuple[list[dict], list]:
    """Save ``base`` (plus an int "ids" tensor) and two fine-tunes of it: a bf16 one with small noise and an fp32 one
    scaled by 1.01; returns the fine-tunes' state dicts and the three opened models (base first)."""
    base["ids"] = torch.arange(4)
    fts = [{n: (t.float() + 1e-2 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in base.items()}]
    fts.append({n: (t.float() * 1.01).to(torch.float32) for n, t in base.items() if n != "ids"} | {"ids": base["ids"]})
    for i, sd in enumerate([base, *fts]):
        (tmp_path / str(i)).mkdir()
        save_file(sd, str(tmp_path / str(i) / "model.safetensors"))
    return fts, [SafetensorsModel(tmp_path / str(i)) for i in range(3)]


def test_model_change_rates_are_the_chunked_float64_sums(tmp_path):
    from fusion_cache.merge.run import model_change_rates

    g = torch.Generator().manual_seed(0)
    shapes = {"big": (400, 1000), "small": (7, 3)}  # "big" spans several STAT_CHUNKs, with a short last block
    spread = torch.logspace(-3, 3, 400).view(400, 1)  # block sums of very different sizes: the order of adding shows
    base = {n: (torch.randn(s, generator=g) * spread[: s[0]]).to(torch.bfloat16) for n, s in shapes.items()}
    fts, models = _base_and_two_finetunes(tmp_path, base, g)
    got = model_change_rates(models[0], models[1:], ["big", "small", "ids"])
    # the definition: float64 squares, ordered sums over STAT_CHUNK chunks, added tensor after tensor
    base_sq, tau_sq = 0.0, [0.0, 0.0]
    for n in ("big", "small"):
        b = base[n].double().reshape(-1)
        for i in range(0, b.numel(), methods.STAT_CHUNK):
            base_sq += methods.ordered_sum(b[i : i + methods.STAT_CHUNK] ** 2)
            for s, sd in enumerate(fts):
                d = sd[n].double().reshape(-1)[i : i + methods.STAT_CHUNK] - b[i : i + methods.STAT_CHUNK]
                tau_sq[s] += methods.ordered_sum(d**2)
    assert got == [(t / base_sq) ** 0.5 for t in tau_sq]
    for m in models:
        m.close()


def test_model_stats_are_the_power_sums_of_each_task_vector(tmp_path):
    from fusion_cache.merge.run import STATS_CHUNK
    from fusion_cache.merge.run import merge_tensor_
    from fusion_cache.merge.run import model_change_rates
    from fusion_cache.merge.run import model_stats

    g = torch.Generator().manual_seed(1)
    shapes = {"big": (STATS_CHUNK // 100 * 3 + 7, 100), "small": (7, 3)}  # several chunks, a short last block
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    fts, models = _base_and_two_finetunes(tmp_path, base, g)
    rates, stats = model_stats(models[0], models[1:], ["big", "small", "ids"])
    assert rates == model_change_rates(models[0], models[1:], ["big", "small", "ids"]) and "ids" not in stats
    for n in ("big", "small"):
        b = base[n].float()
        tau = torch.stack([sd[n].float() - b for sd in fts])  # as the merge forms it, in fp32
        for s, sd in enumerate(fts):  # here the fp32 difference is exact, so the sums must be the same floats
            assert torch.equal(tau[s].double(), sd[n].double() - base[n].double())
        assert stats[n].base_sq == methods.sum_sq(b)
        assert stats[n].sums == [methods.power_sums(t.abs()) for t in tau]
        refs = [0.01, 0.02]
        got = merge_tensor_("rsaf", tau.clone(), b, n, {}, refs, torch.empty(b.numel()), stats[n])
        assert torch.equal(got, methods.rsaf(tau, b, rate_refs=refs))
    for m in models:
        m.close()


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    """0 threads means torch's default, capped by the cores the 1-minute load average leaves idle (at least 1)."""
    import os

    from fusion_cache.merge import run

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, want in ((0.2, 2), (0.6, 1), (1.0, 1), (4.5, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert run.auto_threads(2) == want, load
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert run.auto_threads(8) == 8 and run.auto_threads(32) == 13

    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert run.auto_threads(4) == 4
