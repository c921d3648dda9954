"""The public API: `import fusion_cache` is light, every exported name resolves, and docs/api.md's examples run as
written (its code blocks, in order, on the tiny model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import fusion_cache

ROOT = Path(__file__).resolve().parents[2]


def test_import_is_light_and_lists_the_api():
    code = "import sys, fusion_cache; print(sorted(m for m in ('torch', 'vllm', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert set(fusion_cache.__all__) <= set(dir(fusion_cache))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fusion_cache.nope  # noqa: B018


def test_every_exported_name_resolves_without_vllm_or_triton():
    code = (
        "import sys, fusion_cache as fc; [getattr(fc, n) for n in fc.__all__]; "
        "print(sorted(m for m in ('vllm', 'triton') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_name_is_documented():
    doc = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in fusion_cache.__all__ if n != "__version__" and f"`{n}" not in doc]
    assert not missing, f"docs/api.md does not document {missing}"


@pytest.mark.slow
def test_the_documented_examples_run(tmp_path, tiny_model_dir, data_file):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.DOTALL)
    assert len(blocks) >= 5
    namespace = {"teacher_dir": tiny_model_dir, "data": data_file, "work": tmp_path}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)  # noqa: S102
    assert namespace["result"].summary["kd_loss"] == {"tiny-qwen2": "kl"}
    assert (tmp_path / "merged" / "config.json").exists()
