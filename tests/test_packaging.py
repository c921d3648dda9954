"""Packaging: kernels/ and cli/ install as fusion_cache.kernels and fusion_cache.cli (nothing named `kernels` or
`cli` at the top of site-packages), pyproject's package list names every package, and both an editable install
(this environment) and a built wheel import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_package_list_names_every_package_directory():
    cfg = _pyproject()["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {"fusion_cache." + ".".join(p.parent.relative_to(ROOT / "fusion_cache").parts)
            for p in (ROOT / "fusion_cache").rglob("*.py") if "__pycache__" not in p.parts}  # fmt: skip
    dirs = {d.rstrip(".") for d in dirs}
    assert dirs | {"fusion_cache.kernels", "fusion_cache.cli"} == listed
    assert cfg["package-dir"] == {"fusion_cache.kernels": "kernels", "fusion_cache.cli": "cli"}
    assert _pyproject()["project"]["scripts"]["fusion-cache"] == "fusion_cache.cli.main:app"


def test_the_editable_install_maps_kernels_and_cli_under_the_package():
    code = (
        "import importlib.util as u, fusion_cache.kernels.reference as r, fusion_cache.cli.main as m; "
        "print(r.__file__); print(m.__file__); print(u.find_spec('kernels'), u.find_spec('cli'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    ref, cli, top = out.splitlines()
    assert Path(ref) == ROOT / "kernels" / "reference.py" and Path(cli) == ROOT / "cli" / "main.py"
    assert top == "None None"


@pytest.mark.slow
def test_a_built_wheel_installs_and_imports(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools writes build/ next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("fusion_cache", "kernels", "cli"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(src)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = wheels.glob("fusion_cache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fusion_cache/kernels/reference.py" in names and "fusion_cache/cli/main.py" in names
    assert "fusion_cache/data/demo_prompts.jsonl" in names and "fusion_cache/cache/codecs/full.py" in names
    assert not [n for n in names if n.split("/")[0] in ("kernels", "cli", "tests", "benchmarks")]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    code = (
        "import fusion_cache, fusion_cache.kernels.reference, fusion_cache.cli.main, fusion_cache.train.trainer; "
        "print(fusion_cache.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of this environment's editable install
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd="/")
    assert out.stdout.strip().startswith(str(target))
