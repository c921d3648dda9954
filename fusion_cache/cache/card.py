"""The dataset card: ``README.md`` with the Hub's YAML header, rendered from a cache's manifest alone.

    fusion-cache build ... --out ./cache      # writes <out>/README.md next to manifest.json
    fusion-cache combine --cache ./cache      # writes it again for the combined manifest

`render_card` reads nothing but the `Manifest` (its ``license``, ``answers``, ``content`` and ``meta`` included),
so a build and a combine of the same cache write the same card. The card is written before the manifest: a
directory with a card and no manifest is still not a cache (readers look for ``manifest.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fusion_cache.cache.manifest import ContentStats
from fusion_cache.cache.manifest import Manifest

CARD_NAME = "README.md"


# Histogram bins of each statistic: percentiles to 1/1000 of the range in bounded memory, however many tokens.
_BINS = 1000
_PERCENTILES = (10, 50, 90)


class ContentAccumulator:
    """Histograms of the top-1 probability, the top-K mass and the top-K entropy of every answer token written.

    Example:
        acc = ContentAccumulator(k)
        acc.add(row.topk_logprobs)  # [n_answer, K] float32, per row as it is written
        stats = acc.stats()         # ContentStats (p10/p50/p90), None when no token was added
    """

    def __init__(self, k: int):
        self.max_entropy = float(np.log(max(k, 2)))  # entropy of K equal probabilities: the top of its range
        self.hist = np.zeros((3, _BINS), dtype=np.int64)

    def add(self, logprobs: np.ndarray) -> None:
        """Count the answer tokens of one row. ``logprobs``: [n_answer, K] teacher log-probs, best first or not."""
        p = np.exp(logprobs.astype(np.float64))  # [n, K]
        mass = p.sum(axis=1)  # [n]
        top1 = p.max(axis=1)  # [n]
        q = p / np.maximum(mass, 1e-30)[:, None]
        entropy = -(q * np.log(np.maximum(q, 1e-30))).sum(axis=1) / self.max_entropy  # [n], in [0, 1]
        for i, v in enumerate((top1, mass, entropy)):
            idx = np.clip((v * _BINS).astype(np.int64), 0, _BINS - 1)
            self.hist[i] += np.bincount(idx, minlength=_BINS)

    def stats(self) -> ContentStats | None:
        if self.hist[0].sum() == 0:
            return None
        cols = []
        for i, scale in enumerate((1.0, 1.0, self.max_entropy)):
            cdf = np.cumsum(self.hist[i]) / self.hist[i].sum()
            # the upper edge of the first bin holding the percentile
            cols.append([round(float((np.searchsorted(cdf, q / 100) + 1) / _BINS * scale), 4) for q in _PERCENTILES])
        return ContentStats(top1_prob=cols[0], topk_mass=cols[1], entropy=cols[2])


def combined_content(parts: list[Manifest]) -> ContentStats | None:
    """The content statistics of a combined cache: each percentile the answer-token-weighted mean of the parts'
    (approximate: the parts keep no histograms); None when a part has none."""
    if not parts or any(p.content is None for p in parts):
        return None
    w = np.array([p.stats.answer_tokens for p in parts], dtype=np.float64)
    w = w / max(w.sum(), 1.0)

    def mean(field: str) -> list[float]:
        vals = np.array([getattr(p.content, field) for p in parts], dtype=np.float64)  # [parts, 3]
        return [round(float(v), 4) for v in (w[:, None] * vals).sum(axis=0)]

    return ContentStats(top1_prob=mean("top1_prob"), topk_mass=mean("topk_mass"), entropy=mean("entropy"), exact=False)


def _yaml_str(value: str) -> str:
    """A YAML scalar that reads back as ``value`` (JSON strings are valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _sampled(m: Manifest) -> bool:
    """The cache holds tokens drawn from the teacher (``build --sampling rs``), not its top-K."""
    from fusion_cache.cache.codecs import get_codec

    return bool(getattr(get_codec(str(m.codec.get("name"))), "has_counts", False))


def _what(m: Manifest) -> str:
    """What the cache holds per answer token, for its title."""
    return f"{m.k} sampled tokens" if _sampled(m) else f"top-{m.k} log-probs"


def card_header(m: Manifest) -> str:
    """The YAML front matter the Hub reads: license, tags, task category, pretty name, and the shards as data."""
    # The Hub takes an SPDX id (apache-2.0) or "other" with license_name/license_link for terms of use.
    lic = m.license or "unknown"
    spdx = lic if " " not in lic and "://" not in lic else "other"
    lines = ["---", f"license: {_yaml_str(spdx)}"]
    if spdx == "other":
        lines.append(f"license_name: {_yaml_str(lic.split(' ')[0].lower() if lic != 'unknown' else 'unknown')}")
        link = next((w for w in lic.split() if "://" in w), None)
        if link:
            lines.append(f"license_link: {_yaml_str(link.strip('()'))}")
    lines += [
        "tags:",
        "  - fusion-cache",
        "  - distillation",
        "  - logits",
        f"  - {_yaml_str('codec-' + str(m.codec.get('name')))}",
        "task_categories:",
        "  - text-generation",
        f"pretty_name: {_yaml_str(f'{m.teacher.name} {_what(m)} (fusion-cache)')}",
        "configs:",
        "  - config_name: default",
        "    data_files:",
        "      - split: train",
        "        path:",
    ]
    lines += [f"          - {_yaml_str(s.path)}" for s in m.shards]
    lines.append("---")
    return "\n".join(lines)


def _answers_text(m: Manifest) -> str:
    a = m.answers
    if a is None or a.source == "dataset":
        return "the dataset's own rows (answers written by people or another process, not sampled here)"
    settings = ", ".join(
        f"{k}={v}"
        for k, v in (
            ("temperature", a.temperature),
            ("top_p", a.top_p),
            ("n", a.n),
            ("seed", a.seed),
            ("max_new_tokens", a.max_new_tokens),
        )
        if v is not None
    )
    rev = f" (revision {a.revision})" if a.revision else ""
    return f"sampled by `fusion-cache generate` with {a.model}{rev}: {settings}"


def _percentiles(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def render_card(m: Manifest) -> str:
    """The whole ``README.md`` of the cache described by ``m``."""
    t = m.teacher
    revision = t.revision or "null (the source has no commit to record: a hub id given without @revision)"
    lic = m.license or "unknown: not recorded (pass `build --license` to record the teacher's license or terms)"
    st = m.stats
    rows = [
        ("teacher", f"`{t.name}`"),
        ("revision", f"`{revision}`" if t.revision else revision),
        ("license / terms", lic),
        ("tokenizer hash", f"`{t.tokenizer_hash}`"),
        ("chat template", "the tokenizer's chat template" if t.chat_template else "none (plain text prompts)"),
        ("engine, dtype", f"{t.engine}, {t.dtype}"),
        ("answers", _answers_text(m)),
        ("dataset", f"`{m.dataset.source}` (sha256 `{m.dataset.hash}`), {m.dataset.rows_read} rows read"),
        ("N (draws per answer token)" if _sampled(m) else "K", str(m.k)),
        ("codec", f"`{json.dumps(m.codec, sort_keys=True)}`"),
        ("rows", f"{st.rows} (skipped: {dict(sorted(st.skipped.items()))}, truncated: {st.truncated})"),
        ("answer tokens", f"{st.answer_tokens} of {st.tokens} tokens"),
        (
            "bytes per answer token",
            f"{m.bytes_per_answer_token:.1f} ({st.payload_bytes} bytes, {len(m.shards)} shards)",
        ),
        ("fingerprint", f"`{m.fingerprint}`"),
    ]
    if m.content is not None:
        how = "" if m.content.exact else " (mean of the parts')"
        over = "the distinct draws" if _sampled(m) else "the top-K"
        rows += [
            ("top-1 probability p10/p50/p90", _percentiles(m.content.top1_prob) + how),
            (f"mass of {over} p10/p50/p90", _percentiles(m.content.topk_mass)),
            (f"entropy of {over}, renormalised (nats) p10/p50/p90", _percentiles(m.content.entropy)),
        ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    body = [
        card_header(m),
        "",
        f"# {m.teacher.name}: {_what(m)} per answer token",
        "",
        (
            f"A fusion-cache cache: for every answer token of every row, {m.k} tokens drawn from the teacher's full "
            "next-token distribution (RS-KD), kept as the distinct draws with their counts and log-probabilities, "
            "stored once so that students distil without running the teacher again (`--kd-loss rs_kl`: an "
            "unbiased estimate of full-vocabulary KD)."
            if _sampled(m)
            else "A fusion-cache cache: for every answer token of every row, the teacher's K most likely next tokens "
            "and their log-probabilities, stored once so that students distil without running the teacher again."
        ),
        "",
        table,
        "",
    ]
    if m.meta:
        body += ["## Meta", "", "```json", json.dumps(m.meta, indent=2, sort_keys=True, ensure_ascii=False), "```", ""]
    body += [
        "## Load and verify",
        "",
        "```bash",
        "fusion-cache inspect --cache DIR            # the manifest, license and meta",
        "fusion-cache verify --cache DIR             # every shard's sha256 against the manifest, and the fingerprint",
        "```",
        "",
        "```python",
        "from fusion_cache.cache.reader import CacheReader",
        "from fusion_cache.hf import load_cache",
        "",
        'reader = CacheReader("DIR")  # checks the sha256 of each shard as it opens it',
        'ds = load_cache("DIR")  # the same rows decoded into a datasets.Dataset ([n_answer, K] ids and log-probs)',
        "```",
        "",
        f"The fingerprint `{m.fingerprint[:16]}…` changes with any byte of any shard and with the build settings "
        "(docs/cache-format.md).",
        "",
    ]
    return "\n".join(body)


def write_card(m: Manifest, directory: str | Path) -> Path:
    """Write ``<directory>/README.md`` atomically (temp file + rename)."""
    path = Path(directory) / CARD_NAME
    tmp = path.with_name(f"{CARD_NAME}.{os.getpid()}.tmp")
    tmp.write_text(render_card(m))
    os.replace(tmp, path)
    return path
