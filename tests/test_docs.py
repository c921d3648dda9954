"""README.md and docs/*.md point only at things that exist.

A doc that still names `fusion_cache/train.py` after the file moved sends its reader nowhere, so every one of these
must resolve in the working tree:

- relative markdown links (and their ``#anchor`` when the target is a markdown file);
- repository paths (``fusion_cache/...``, ``kernels/...``, ``tests/...``, ``benchmarks/...``; ``path.py::name``
  also checks that the module defines ``name``), modules named from their stage package (``capture/build.py`` is
  fusion_cache/capture/build.py), and bare ``*.py`` file names, which must name a file somewhere in the repository;
- dotted names in inline code that start with the package (``fusion_cache.train.align.align_bytes``), with one of
  its module or subpackage names (``methods.kth_largest``, ``merge.run.auto_threads``) or with one of its classes
  (``CacheReader.verify``): the module, and every name after it, must be defined;
- ``python -m MODULE`` / ``torchrun ... -m MODULE`` for the project's own modules: the module must be runnable.

Names the project does not own (``torch.topk``, ``ray.init``, vLLM's classes) are not checked.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The repository's top-level folders a doc may name, and where each installed package lives in the tree.
REPO_DIRS = ("fusion_cache", "kernels", "cli", "tests", "benchmarks", "docs", "scripts", "requirements")
PACKAGE_DIRS = {"fusion_cache": "fusion_cache", "fusion_cache.kernels": "kernels", "fusion_cache.cli": "cli"}
# Dotted names whose first part is also one of our module names but that mean something else in the docs: the
# outside library (ray.init), a manifest field (teacher.dtype), an object (stream.iterator).
EXTERNAL = {"ray", "vllm", "io", "json", "os", "teacher", "stream"}
FILE_SUFFIXES = {
    "py", "md", "json", "jsonl", "arrow", "csv", "sh", "txt", "toml", "yml", "yaml", "png", "gz", "pt", "tmp",
    "safetensors", "gguf", "whl", "lock", "incomplete",
}  # fmt: skip

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PATH = re.compile(r"(?<![\w./~$<>{-])((?:" + "|".join(REPO_DIRS) + r")/[\w./*-]*)(::\w+)?")
SUBPACKAGES = sorted(p.name for p in (ROOT / "fusion_cache").iterdir() if p.is_dir() and any(p.glob("*.py")))
# ``capture/build.py``: a module named from its stage package, short for fusion_cache/capture/build.py
SHORT_PY = re.compile(r"(?<![\w./~$<>{-])((?:" + "|".join(SUBPACKAGES) + r")/[\w./-]*\.py)\b(::\w+)?")
BARE_PY = re.compile(r"(?<![\w./<>{-])([A-Za-z_]\w*\.py)\b")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?=$|[\s(\[,:])")
RUN_MODULE = re.compile(r"(?:python3?|torchrun)\b[^\n`]*?\s-m\s+([\w.]+)")


# ------------------------------------------------------------------------------------------------ the source tree


def _sources() -> list[Path]:
    return [p for d in ("fusion_cache", "kernels", "cli") for p in (ROOT / d).rglob("*.py")]


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _body_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines: functions, classes, assignments, imports."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names[n.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names[(a.asname or a.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):
            names.update(_body_names(node.body))
    return names


@functools.cache
def _classes() -> dict[str, list[ast.ClassDef]]:
    """Every top-level class of the library by name (a name may be defined in more than one module)."""
    found: dict[str, list[ast.ClassDef]] = {}
    for path in _sources():
        for node in _tree(path).body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(node)
    return found


def _class_has(cls: ast.ClassDef, name: str, seen: frozenset = frozenset()) -> bool:
    if name in _body_names(cls.body):
        return True
    for base in cls.bases:  # inherited members, when the base is one of ours
        base_name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
        for parent in _classes().get(base_name, []):
            if parent.name not in seen and _class_has(parent, name, seen | {cls.name}):
                return True
    return False


def _has(node: ast.AST, rest: list[str]) -> bool:
    """Whether ``rest`` (attribute names) resolve inside a module or class node."""
    if not rest:
        return True
    if isinstance(node, ast.Module):
        child = _body_names(node.body).get(rest[0])
        return child is not None and (len(rest) == 1 or _has(child, rest[1:]))
    if isinstance(node, ast.ClassDef):
        return _class_has(node, rest[0])  # one level of members is all the docs name
    return len(rest) == 0


def _module_file(dotted: list[str]) -> Path | None:
    """The file of an installed module path like ["fusion_cache", "train", "align"] (a package: its __init__)."""
    for prefix, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        head = prefix.split(".")
        if dotted[: len(head)] == head:
            base = ROOT / folder / Path(*dotted[len(head) :]) if dotted[len(head) :] else ROOT / folder
            if base.with_suffix(".py").is_file():
                return base.with_suffix(".py")
            if (base / "__init__.py").is_file():
                return base / "__init__.py"
            if base.is_dir():  # a namespace folder without __init__.py
                return base
            return None
    return None


def _package_names(package: Path) -> set[str]:
    """Names a package offers: its __init__'s, and (for a package split into modules) those of its modules."""
    names = set(_body_names(_tree(package / "__init__.py").body)) if (package / "__init__.py").is_file() else set()
    for sub in package.glob("*.py"):
        names |= set(_body_names(_tree(sub).body)) | {sub.stem}
    return names


def _resolve_full(parts: list[str]) -> bool:
    """``fusion_cache.a.b.name...``: the longest module prefix must exist and define the rest."""
    for cut in range(len(parts), 0, -1):
        f = _module_file(parts[:cut])
        if f is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        if f.is_dir() or f.name == "__init__.py":
            folder = f if f.is_dir() else f.parent
            if rest[0] not in _package_names(folder):
                return False
            sub = folder / f"{rest[0]}.py"
            return len(rest) == 1 or not sub.is_file() or _has(_tree(sub), rest[1:])
        return _has(_tree(f), rest)
    return False


@functools.cache
def _stems() -> dict[str, list[Path]]:
    """Module files by short name (``methods`` -> fusion_cache/merge/methods.py), packages by folder name."""
    found: dict[str, list[Path]] = {}
    for p in _sources():
        if p.name != "__init__.py":
            found.setdefault(p.stem, []).append(p)
    return found


def dotted_problem(name: str) -> str | None:
    """Why a dotted name in a doc does not resolve, or None (also None for names the project does not own)."""
    parts = name.split(".")
    if parts[-1] in FILE_SUFFIXES:
        return None  # a file name (``manifest.json``); bare *.py names are checked as files
    if parts[0] in ("kernels", "cli"):
        return f"`{name}`: installed as fusion_cache.{name}"
    if parts[0] == "fusion_cache":
        return None if _resolve_full(parts) else f"`{name}` does not resolve in the source tree"
    if parts[0] in EXTERNAL:
        return None
    if parts[0] in SUBPACKAGES:
        return None if _resolve_full(["fusion_cache", *parts]) else f"`{name}`: no fusion_cache.{name}"
    if parts[0] in _stems():
        if any(_has(_tree(f), parts[1:]) for f in _stems()[parts[0]]):
            return None
        return f"`{name}`: {parts[1]!r} is not defined in any {parts[0]}.py"
    if parts[0] in _classes():
        if any(_class_has(c, parts[1]) for c in _classes()[parts[0]]):
            return None
        return f"`{name}`: class {parts[0]} has no {parts[1]!r}"
    return None


# ------------------------------------------------------------------------------------------------ the docs


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", md.read_text(), re.M)}


def _repo_path_exists(path: str) -> bool:
    path = path.rstrip(".-")
    if any(c in path for c in "*?["):
        return any(ROOT.glob(path))
    p = ROOT / path
    return p.exists() or p.with_suffix(p.suffix + ".py").exists()


@functools.cache
def _py_names() -> set[str]:
    skip = {".git", ".venv", "node_modules"}
    return {p.name for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)}


def _runnable(module: list[str]) -> bool:
    """Whether ``python -m`` can run this module: a module file, or a package with a __main__.py."""
    f = _module_file(module) if module[0] == "fusion_cache" else None
    if f is None or f.is_dir():
        return False
    return f.name != "__init__.py" or (f.parent / "__main__.py").is_file()


def problems(doc: Path) -> list[str]:
    """Every dangling link, path, module name and runnable module in one markdown file."""
    text = doc.read_text()
    found = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            found.append(f"link {target!r}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} missing")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            found.append(f"link {target!r}: no heading with anchor #{anchor} in {dest.name}")
    for m in PATH.finditer(text):
        path, member = m.group(1).rstrip(".-"), m.group(2)
        if not _repo_path_exists(path):
            found.append(f"path {path!r} does not exist")
        elif member and path.endswith(".py") and not _has(_tree(ROOT / path), [member[2:]]):
            found.append(f"{path}{member}: {member[2:]!r} is not defined there")
    for m in SHORT_PY.finditer(text):
        path, member = "fusion_cache/" + m.group(1), m.group(2)
        if not (ROOT / path).is_file():
            found.append(f"path {m.group(1)!r}: no {path}")
        elif member and not _has(_tree(ROOT / path), [member[2:]]):
            found.append(f"{m.group(1)}{member}: {member[2:]!r} is not defined there")
    for m in BARE_PY.finditer(text):
        if m.group(1) not in _py_names():
            found.append(f"file {m.group(1)!r}: no file of that name in the repository")
    for m in INLINE.finditer(text):
        d = DOTTED.match(m.group(1).strip())
        if d and (why := dotted_problem(d.group(1))):
            found.append(why)
    for m in RUN_MODULE.finditer(text):
        mod = m.group(1).split(".")
        if mod[0] not in ("fusion_cache", "kernels", "cli"):
            continue
        if not _runnable(mod):
            found.append(f"`-m {m.group(1)}` is not a runnable module (the entry point is `python -m fusion_cache`)")
    return sorted(set(found))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_names_only_what_exists(doc):
    bad = problems(doc)
    assert not bad, f"{doc.relative_to(ROOT)}:\n  " + "\n  ".join(bad)


# ------------------------------------------------------------------------------------------------ the checker itself


def test_checker_catches_stale_names(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "See [the notes](dev-notes.md), `fusion_cache/train.py`, `fusion_cache/unknown/`, combine.py,\n"
        "`kernels.reference.uld_loss_reference`, `fusion_cache.train.align.no_such_name`, `methods.no_such`,\n"
        "`CacheReader.no_such`, `kernels/reference.py::nope`, `train/unified_old.py`,\n"
        "and `python -m fusion_cache.train`.\n"
    )
    bad = "\n".join(problems(doc))
    for needle in (
        "dev-notes.md",
        "fusion_cache/train.py",
        "fusion_cache/unknown/",
        "combine.py",
        "installed as fusion_cache.kernels",
        "fusion_cache.train.align.no_such_name",
        "methods.no_such",
        "CacheReader",
        "reference.py::nope",
        "train/unified_old.py",
        "-m fusion_cache.train",
    ):
        assert needle in bad, f"{needle!r} not reported in:\n{bad}"


def test_checker_accepts_what_exists(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "`fusion_cache/cache/reader.py`, `kernels/reference.py::uld_loss_reference`, `fusion_cache/cache/`,\n"
        "reader.py, `capture/build.py::run_build`, `cache/row.py`, `cache.reader.CacheReader`, "
        "`fusion_cache.cache.reader.CacheReader`, `fusion_cache.kernels.reference`, `methods.kth_largest`,\n"
        "`merge.run.auto_threads`, `CacheReader.verify()`, `torch.topk`, `ray.init(num_cpus=2)`,\n"
        "`manifest.json`, /tmp/x/cache/train, `torchrun --nproc-per-node 2 -m fusion_cache train`.\n"
    )
    assert problems(doc) == []
