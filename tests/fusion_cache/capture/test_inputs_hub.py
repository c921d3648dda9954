"""`--data org/name`: the real ``datasets.load_dataset(repo_id)`` path of `capture/inputs.py`, offline.

There is no Hub access here, so the stand-in is the datasets cache an earlier online ``load_dataset`` leaves behind
(``$HF_DATASETS_CACHE/<org>___<name>/<config>/<version>/<hash>/``, arrow files named after the dataset), read with
``HF_HUB_OFFLINE=1``: load_dataset then resolves the id through its own offline fallback
(``CachedDatasetModuleFactory``, "Using the latest cached version of the dataset"). A pre-populated *hub* cache
(``datasets--org--name/snapshots/<sha>/``) is not enough with datasets 5.2: offline, load_dataset raises
"Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)" before it looks at the hub cache. The live Hub is not
tested. Each check runs in a process of its own: huggingface_hub and datasets read the offline switch at import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROWS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(3)]  # fmt: skip


def _hub_cache(tmp_path: Path) -> Path:
    """A datasets cache holding ``acme/tiny-chat`` (splits train: 3 rows, test: 1) as an online load leaves it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_dataset

    files = tmp_path / "files"
    files.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), files / "train.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[:1]), files / "test.parquet")
    scratch, cache = tmp_path / "scratch", tmp_path / "datasets"
    load_dataset("parquet", data_files={s: str(files / f"{s}.parquet") for s in ("train", "test")},
                 cache_dir=str(scratch))  # fmt: skip
    (prepared,) = [p for p in scratch.glob("parquet/*/*/*") if p.is_dir()]
    target = cache / "acme___tiny-chat" / "default" / "0.0.0" / prepared.name
    shutil.copytree(prepared, target)
    for arrow in target.glob("parquet-*.arrow"):  # the builder names them after the dataset: <name>-<split>.arrow
        arrow.rename(target / arrow.name.replace("parquet-", "tiny-chat-"))
    return cache


def _offline(tmp_path: Path, cache: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    return _hub_cache(tmp_path_factory.mktemp("hub"))


def test_a_hub_id_reads_its_splits_and_hashes_offline(tmp_path, hub_cache):
    script = (
        "import json\n"
        "from fusion_cache.capture.inputs import iter_raw_rows, dataset_hash\n"
        "from fusion_cache.errors import DataError\n"
        "out = {'train': [r for _, r in iter_raw_rows('acme/tiny-chat')],\n"
        "       'test': [r for _, r in iter_raw_rows('acme/tiny-chat', 'test')],\n"
        "       'hash': [dataset_hash('acme/tiny-chat'), dataset_hash('acme/tiny-chat')]}\n"
        "for source, split in (('acme/tiny-chat', 'validation'), ('acme/not-cached', None)):\n"
        "    try:\n"
        "        list(iter_raw_rows(source, split))\n"
        "    except DataError as e:\n"
        "        out[source] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    done = _offline(tmp_path, hub_cache, ["-c", script])
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["train"] == ROWS and out["test"] == ROWS[:1]
    assert out["hash"][0] == out["hash"][1] and len(out["hash"][0]) == 64
    assert "no split 'validation'; the dataset has ['train', 'test']" in out["acme/tiny-chat"]
    assert out["acme/not-cached"].startswith("acme/not-cached: cannot load it with datasets.load_dataset: ")
    assert "\n" not in out["acme/not-cached"]


def test_build_data_takes_a_hub_id_and_its_split(tmp_path, hub_cache, tiny_model_dir):
    out = tmp_path / "cache"
    done = _offline(tmp_path, hub_cache, ["-m", "fusion_cache", "build", "--teacher", str(tiny_model_dir),
                                          "--data", "acme/tiny-chat", "--data-split", "test", "--engine", "hf",
                                          "--top-k", "4", "--out", str(out)])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["rows"] == 1
    assert "acme/tiny-chat" in json.dumps(manifest)
