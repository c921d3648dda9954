"""SafetensorsModel reads into a caller's buffer (how `run_merge` reuses its memory)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fusion_cache.merge.io import SafetensorsModel


def test_tensor_reads_into_a_reused_buffer(tmp_path):
    state = {
        "a": torch.randn(7, 5),
        "b": torch.randn(3).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    buf = torch.empty(64, dtype=torch.float32)  # 256 bytes: holds each tensor in turn
    with SafetensorsModel(tmp_path) as m:
        for name, want in state.items():
            got = m.tensor(name, out=buf)
            assert got.dtype == want.dtype and torch.equal(got, want), name
            assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # no new allocation
            assert torch.equal(m.tensor(name), want)
        with pytest.raises(ValueError, match=r">= 140 bytes for 'a'"):
            m.tensor("a", out=torch.empty(10, dtype=torch.float32))
        with pytest.raises(ValueError, match="contiguous"):
            m.tensor("b", out=torch.empty(8, 8)[:, 0])


def test_view_maps_the_file_and_release_keeps_it_readable(tmp_path):
    state = {
        "a": torch.randn(300, 70),
        "b": torch.randn(5000).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "empty": torch.zeros(0, 4),
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    before = (tmp_path / "model.safetensors").read_bytes()
    with SafetensorsModel(tmp_path) as m:
        for name, want in state.items():
            v = m.view(name)
            assert v.dtype == want.dtype and v.shape == want.shape and torch.equal(v, want), name
            m.release(name)
            assert torch.equal(v, want), name  # released pages map again on the next read
        v = m.view("a")
        v.zero_()  # a private map: writing to a view never reaches the file
        assert torch.equal(m.tensor("a"), state["a"])
        del v
    assert (tmp_path / "model.safetensors").read_bytes() == before
