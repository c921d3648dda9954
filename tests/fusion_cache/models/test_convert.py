"""The GGUF conversion on a tiny GGUF written here from the tiny test model: the converted model computes the same
logits, the conversion draws its progress bar (tqdm, stderr) over its four steps when it runs and none with
``progress=False``, and a second `converted_model_dir` reuses the first conversion without a bar.

(The packaged SmolLM2 preset's conversion, 30-60 s, is tested in test_presets.py.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fusion_cache.models.convert import convert_gguf_to_hf
from fusion_cache.models.convert import converted_model_dir

# HF Qwen2 module name -> GGUF tensor name (llama.cpp's convention, which transformers' GGUF loader maps back)
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
_BAR_DONE = re.compile(r"convert tiny\.gguf: 100%\|[^|]*\| 4/4 ")


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """``model_dir`` (the tiny Qwen2 with tied embeddings and a byte-level BPE tokenizer) as an fp32 GGUF file."""
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    added = {a["id"]: a["content"] for a in tok["added_tokens"]}
    tokens = [added.get(i, t) for i, t in enumerate(tokens)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in added else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:  # model.layers.<i>.<module>.<weight|bias>
            parts = name.split(".")
            gguf_name = f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        w.add_tensor(gguf_name, tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_conversion_keeps_the_logits_and_draws_its_bar(tiny_gguf, tiny_model_dir, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    out = convert_gguf_to_hf(tiny_gguf, tmp_path / "hf", dtype=torch.float32)
    assert _BAR_DONE.search(capfd.readouterr().err)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_no_bar_when_asked(tiny_gguf, tmp_path, capfd):
    convert_gguf_to_hf(tiny_gguf, tmp_path / "hf", dtype=torch.float32, progress=False)
    assert "convert tiny.gguf" not in capfd.readouterr().err


def test_first_use_converts_with_a_bar_and_the_second_reuses_it(tiny_gguf, tmp_path, capfd):
    first = converted_model_dir(tiny_gguf, "tiny", home=tmp_path)
    assert _BAR_DONE.search(capfd.readouterr().err)
    assert converted_model_dir(tiny_gguf, "tiny", home=tmp_path) == first
    assert "convert tiny.gguf" not in capfd.readouterr().err
