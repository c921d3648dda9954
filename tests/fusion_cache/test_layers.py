"""The package's layering: a stage imports only the layers below it, and nothing in the library imports the CLI.

Every import is checked, the lazy ones inside functions included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each part of the library may import from fusion_cache, bottom layer first. A package may always import
# itself. `testing` builds tiny models for the tests; `__main__` is an entry point, not library code.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "kernels": {"errors"},
    "cache": {"errors", "config"},
    "hf": {"errors", "config", "cache"},
    "models": {"errors", "config", "cache"},
    "capture": {"errors", "config", "cache", "models"},
    "train": {"errors", "config", "cache", "models", "capture", "kernels"},
    "merge": {"errors", "config", "models"},
    "eval": {"errors", "config", "cache", "models", "capture", "train"},
    "recipes": {"errors", "config", "cache", "models", "capture", "train", "merge", "eval"},
    "testing": {"errors", "config", "models", "cache"},
    "__init__": {"errors", "config", "cache", "models", "capture", "train", "merge", "eval", "recipes", "kernels"},
    "cli": {"errors", "config", "cache", "models", "capture", "train", "merge", "eval", "recipes"},
    "__main__": {"cli"},
}


def _part(path: Path) -> str:
    """The layer a source file belongs to: its package under fusion_cache/ (kernels/ and cli/ are their own)."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] in ("kernels", "cli"):
        return rel.parts[0]
    name = rel.parts[1]
    return name.removesuffix(".py")


def _imported_parts(path: Path) -> set[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            bits = name.split(".")
            if bits[0] == "fusion_cache" and len(bits) > 1:
                found.add((bits[1], node.lineno))
            elif bits[0] in ("kernels", "cli"):
                found.add((f"top-level {bits[0]}", node.lineno))
    return found


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("fusion_cache/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("cli/*.py")])


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_only(path):
    part = _part(path)
    assert part in ALLOWED, f"{path}: part {part!r} has no entry in ALLOWED"
    bad = [
        f"line {line}: imports {target}"
        for target, line in sorted(_imported_parts(path))
        if target != part and target not in ALLOWED[part] and target != "__version__"
    ]
    assert not bad, f"{path.relative_to(ROOT)} ({part}) may import only {sorted(ALLOWED[part])}: " + "; ".join(bad)
