"""What the content checks of every read cost (cache/validate.py): decode of whole record batches with and without
`ContentRules`, per codec, on the rows of a real cache.

    PYTHONPATH=. python benchmarks/bench_validate.py --cache /tmp/fc-packaged/cache/smollm2-135m/train

The rows of ``--cache`` are re-encoded with each codec into one Arrow IPC stream of the shard layout (as
bench_codec.py does), then decoded to rows with ``rules=None`` and with the cache's rules, interleaved, best of
``--repeat`` in process CPU seconds on one thread. Prints one line per codec: answer tokens/s without and with the
checks, and the cost in percent, and appends the run to ``benchmarks/results/validate.{md,jsonl}`` (machine,
date, version). Codecs: ``raw``, ``full``, ``values`` (``sampled`` stores a sampled capture, not a re-encodable
top-K; ``shape``'s checks are ``values``').
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402

from benchmarks.common import append_markdown  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from fusion_cache.cache.codecs import make_codec  # noqa: E402
from fusion_cache.cache.codecs.ids import id_order_key  # noqa: E402
from fusion_cache.cache.reader import CacheReader  # noqa: E402
from fusion_cache.cache.reader import decode_record_batch  # noqa: E402
from fusion_cache.cache.schema import SCHEMA_VERSION  # noqa: E402
from fusion_cache.cache.schema import shard_schema  # noqa: E402
from fusion_cache.cache.validate import ContentRules  # noqa: E402
from fusion_cache.cache.writer import rows_to_batch  # noqa: E402
from fusion_cache.cache.writer import shard_schema_with_order  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="a raw cache (its rows are re-encoded with every codec)")
    ap.add_argument("--codecs", nargs="+", default=["raw", "full", "values"], choices=["raw", "full", "values"])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    reader = CacheReader(args.cache)
    rows = list(reader.iter_rows())
    k, vocab = reader.k, reader.manifest.teacher.vocab_size or 1 + max(int(r.topk_ids.max()) for r in rows)
    tokens = sum(r.n_answer for r in rows)
    lines, results = [], []
    for name in args.codecs:
        codec = make_codec(name, vocab_size=vocab)
        prov = {"schema_version": SCHEMA_VERSION, "k": k, "codec": codec.to_json(), "config_fingerprint": "0" * 64}
        schema, order = shard_schema_with_order(shard_schema(prov, codec), codec, rows[:16])
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, schema, options=codec.ipc_options()) as w:
            for i in range(0, len(rows), 64):
                w.write_batch(rows_to_batch(rows[i : i + 64], schema, codec, k, order))
        blob = sink.getvalue()
        orders = {id_order_key(order): order} if codec.shard_entry_fields() else {}  # full layout 4: the manifest's
        rules = ContentRules(vocab, "bench", reader.manifest.max_length, 0, 1 << 62, codec, k)

        def decode(r, blob=blob, codec=codec, orders=orders):
            t = time.process_time()
            for b in pa.ipc.open_stream(pa.BufferReader(blob), options=pa.ipc.IpcReadOptions(use_threads=False)):
                decode_record_batch(b, codec, k, "bench", rules=r, id_orders=orders)
            return time.process_time() - t

        decode(rules)  # compile the kernels, warm the caches
        plain, checked = [], []
        for _ in range(args.repeat):  # interleaved: a busy machine slows both alike
            plain.append(decode(None))
            checked.append(decode(rules))
        a, b = min(plain), min(checked)
        line = (f"{name:>6} K={k}: {tokens / a:,.0f} answer tokens/s without the checks, {tokens / b:,.0f} with: "
                f"+{100 * (b - a) / a:.1f}% ({len(rows)} rows, {tokens} answer tokens)")  # fmt: skip
        print(line, flush=True)
        lines.append(line)
        results.append({"codec": name, "k": k, "rows": len(rows), "answer_tokens": tokens,
                        "tokens_per_s_unchecked": tokens / a, "tokens_per_s_checked": tokens / b,
                        "cost_percent": 100 * (b - a) / a, "repeat": args.repeat})  # fmt: skip
    info = machine()
    append_markdown("validate", f"{info['date']} ({info['cpu']}, 1 thread, best of {args.repeat})",
                    "```\n" + "\n".join(lines) + "\n```", {"machine": info, "cache": args.cache,
                    "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
