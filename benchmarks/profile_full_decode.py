"""Where the `full` codec's decode time goes: per stage, full layout 2 (zstd 3) against layout 3 (zstd 16).

    PYTHONPATH=. python benchmarks/profile_full_decode.py --cache /tmp/me/demo2/cache/train --repeat 21

Encodes the rows of a ``raw`` cache into one shard-layout record batch per layout (as bench_codec.py does: the id
order from the first 8,192 tokens, the common columns included), then decodes each one ``--repeat`` times,
interleaved, on one core (numpy, torch and Arrow on one thread, Arrow decompressing on the calling thread as
CacheReader does): the Arrow IPC read (zstd decompression of every column), and inside ``decode_record_batch`` the
ids, the values, the target log-probs and the rest (length checks, per-row slicing), each timed by a wrapper
around its function. Prints a Markdown table of best / median milliseconds of process CPU time (the analysis in
benchmarks/results/codec.md quotes it); writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from fusion_cache.cache.codecs import Codec  # noqa: E402
from fusion_cache.cache.codecs import FullCodec  # noqa: E402
from fusion_cache.cache.codecs import full as full_module  # noqa: E402
from fusion_cache.cache.codecs import make_codec  # noqa: E402
from fusion_cache.cache.codecs.ids import id_order_key  # noqa: E402
from fusion_cache.cache.reader import CacheReader  # noqa: E402
from fusion_cache.cache.reader import decode_record_batch  # noqa: E402
from fusion_cache.cache.schema import SCHEMA_VERSION  # noqa: E402
from fusion_cache.cache.schema import shard_schema  # noqa: E402
from fusion_cache.cache.writer import rows_to_batch  # noqa: E402
from fusion_cache.cache.writer import shard_schema_with_order  # noqa: E402

# the full codec's decode stages, each timed by a wrapper put in place of its name in codecs/full.py
STAGES = ("decode_rank_planes", "decode_bucket_ids", "_gather_groups", "decode_value_groups", "_grouped_targets")


def _blob(rows, k: int, codec: Codec) -> tuple[bytes, dict]:
    """The rows as one record batch of the full shard layout, Arrow IPC bytes with the codec's compression, and the
    id orders its rows name (full layout 4: what the shard's manifest entry holds)."""
    prov = {"schema_version": SCHEMA_VERSION, "k": k, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
    used, first = 0, []
    for r in rows:  # the id order of a build's first engine call (8,192 tokens), as bench_codec.py
        used += len(r.input_ids)
        if first and used > 8192:
            break
        first.append(r)
    schema, order = shard_schema_with_order(shard_schema(prov, codec), codec, first)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, schema, options=codec.ipc_options()) as w:
        w.write_batch(rows_to_batch(rows, schema, codec, k, order))
    return sink.getvalue(), ({id_order_key(order): order} if codec.shard_entry_fields() else {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="a raw cache of real teacher output")
    ap.add_argument("--repeat", type=int, default=21, help="interleaved decodes per layout")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    reader = CacheReader(args.cache)
    rows, k = list(reader.iter_rows()), reader.k
    vocab = int(max(r.topk_ids.max() for r in rows)) + 1
    full = make_codec("full", vocab_size=max(vocab, 257))
    codecs = {
        "layout 2 (zstd 3)": FullCodec(value_bits=6, id_bytes=full.id_bytes, zstd_level=3, layout=2),
        f"layout {full.layout} (zstd {full.zstd_level})": full,
    }
    blobs = {name: _blob(rows, k, codec) for name, codec in codecs.items()}
    n = sum(r.n_answer for r in rows)
    spent: dict[str, float] = {}

    def timed(name):
        fn = getattr(full_module, name)

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t = time.process_time()
            out = fn(*a, **kw)
            spent[name] = spent.get(name, 0.0) + time.process_time() - t
            return out

        return wrapper

    originals = {name: getattr(full_module, name) for name in STAGES}
    for name in STAGES:
        setattr(full_module, name, timed(name))
    options = pa.ipc.IpcReadOptions(use_threads=False)
    res: dict[str, dict[str, list[float]]] = {name: {} for name in codecs}
    try:
        for _ in range(args.repeat):
            for name, codec in codecs.items():
                spent.clear()
                t = time.process_time()
                batches = list(pa.ipc.open_stream(pa.BufferReader(blobs[name][0]), options=options))
                t_ipc = time.process_time() - t
                t = time.process_time()
                for b in batches:
                    decode_record_batch(b, codec, k, "profile", id_orders=blobs[name][1])
                t_dec = time.process_time() - t
                ids = sum(spent.get(s, 0.0) for s in STAGES[:3])
                stage = {
                    "Arrow IPC read + zstd decompression": t_ipc,
                    "ids": ids,
                    "values": spent["decode_value_groups"],
                    "target log-probs": spent["_grouped_targets"],
                    "the rest": t_dec - ids - spent["decode_value_groups"] - spent["_grouped_targets"],
                    "total": t_ipc + t_dec,
                }
                for key, v in stage.items():
                    res[name].setdefault(key, []).append(v)
    finally:
        for name, fn in originals.items():
            setattr(full_module, name, fn)
    print(f"{Path(args.cache).name}, K={k}, {n} answer tokens; best / median ms of {args.repeat} interleaved runs")
    print("| stage | " + " | ".join(codecs) + " |\n|---|" + "---|" * len(codecs))
    for key in res[next(iter(codecs))]:
        cells = [f"{np.min(res[c][key]) * 1e3:.2f} / {np.median(res[c][key]) * 1e3:.2f}" for c in codecs]
        print(f"| {key} | " + " | ".join(cells) + " |")
    for c in codecs:
        tot = np.array(res[c]["total"])
        print(f"{c}: {n / tot.min() / 1e6:.3f}M answer tokens/s best, {n / np.median(tot) / 1e6:.3f}M median")
    print(f"load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
