"""Map a teacher's vocabulary onto a student's by the bytes each token stands for, and carry cached teacher top-K
distributions onto the student's vocabulary.

    vmap = VocabMap.build(teacher_tokenizer, student_tokenizer)     # or vocab_map(...): built once, cached on disk
    vmap.student[t]        # the student id teacher token t maps to (-1: none), vmap.kind[t]: EXACT, PREFIX, ...

**The rule.** Tokens are compared as raw bytes: byte-level BPE strings are turned back into bytes (GPT-2's
byte-to-unicode table), SentencePiece pieces have their ``▁`` turned into a space and ``<0xAB>`` byte-fallback
pieces into the byte. A teacher token maps to the student token with exactly its bytes when there is one (EXACT);
otherwise to the **longest student token that is a prefix of its bytes** (PREFIX): the student's first token when it
writes those bytes, since a student that will write the teacher token's bytes starts with that token. A special
token maps to the student's token of the same role (eos to eos, bos to bos, ...) and is otherwise unmapped, as is a
token with no student prefix at all (UNMAPPED); unmapped mass goes to the loss's tail bucket.

**Carrying a distribution.** At a student row whose context ends where the teacher's does (a shared byte
boundary), each cached teacher candidate's probability goes to its mapped student token and candidates that land on
the same student token add up: the teacher's distribution over the student's next token, marginalized over the
teacher tokens that begin with it. At a student row whose context ends *inside* a teacher token (the student splits
``347`` into ``3 4 7`` where the teacher has one token), the teacher's row that spans it still predicts the bytes:
the candidates that agree with the bytes already written are kept, the rest of their bytes is mapped as above, and
their probabilities are renormalized (`carry`). So every student row inside a span the teacher predicted gets a
target, the numerals included.

A map depends only on the two tokenizers, so it is built once per pair and cached under
``$FUSION_CACHE_HOME/vocab-maps/<teacher hash>-<student hash>.npz`` (numpy arrays, loaded without pickle).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fusion_cache.errors import ConfigError

EXACT, PREFIX, SPECIAL, UNMAPPED = 0, 1, 2, 3
KIND_NAMES = ("exact", "prefix", "special", "unmapped")
_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")
_FORMAT = 1  # bump when the rule changes: older cached maps are rebuilt


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _style(tokenizer: Any) -> str:
    """ "bytelevel" (GPT-2 style BPE) or "sentencepiece" (``▁`` for spaces, ``<0xAB>`` byte fallback)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"vocabulary map: {type(tokenizer).__name__} is not a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    text = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
    if '"ByteLevel"' in text:
        return "bytelevel"
    if "▁" in text or '"ByteFallback"' in text or '"Metaspace"' in text:
        return "sentencepiece"
    raise ConfigError(f"vocabulary map: cannot tell how the tokenizer's pieces spell bytes (decoder {text[:120]})")


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The raw bytes of every token id (None for special and added control tokens)."""
    style = _style(tokenizer)
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    table = byte_decoder()
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if style == "sentencepiece" and piece and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))  # a byte-fallback piece, even where it is flagged special
        elif piece is None or i in special:
            out.append(None)
        elif style == "bytelevel":
            try:
                out.append(bytes(table[c] for c in piece))
            except KeyError:  # an added token written in plain text
                out.append(piece.encode())
        else:
            out.append(piece.replace("▁", " ").encode())
    return out


def digit_tokens(tokenizer: Any) -> np.ndarray:
    """bool [V]: the tokens that spell a numeral piece (ASCII digits, an optional leading space): the numerals
    probe of `fusion_cache.eval.evaluate.evaluate_rows` (``token_classes``)."""
    out = np.zeros(len(tokenizer), dtype=bool)
    for i, b in enumerate(token_bytes(tokenizer)):
        digits = b.lstrip(b" ") if b else b""
        out[i] = bool(digits) and digits.isdigit()
    return out


@dataclass(frozen=True)
class VocabMap:
    """Teacher ids -> student ids.

    Attributes:
        student: int32 [V_teacher] the student id of each teacher token, -1 where none.
        kind: uint8 [V_teacher] EXACT, PREFIX, SPECIAL (mapped by role) or UNMAPPED.
        teacher_bytes, student_bytes: each token's bytes (None: special), for the mid-token rule of `carry`.
    """

    student: np.ndarray
    kind: np.ndarray
    teacher_bytes: list[bytes | None]
    student_bytes: list[bytes | None]

    @classmethod
    def build(cls, teacher_tokenizer: Any, student_tokenizer: Any) -> VocabMap:
        t_bytes, s_bytes = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
        lookup: dict[bytes, int] = {}
        for i, b in enumerate(s_bytes):
            if b and b not in lookup:  # the lowest id wins among tokens that spell the same bytes
                lookup[b] = i
        student = np.full(len(t_bytes), -1, dtype=np.int32)
        kind = np.full(len(t_bytes), UNMAPPED, dtype=np.uint8)
        for t, b in enumerate(t_bytes):
            if not b:
                continue
            s = lookup.get(b)
            if s is not None:
                student[t], kind[t] = s, EXACT
                continue
            s = _longest_prefix(lookup, b)
            if s is not None:
                student[t], kind[t] = s, PREFIX
        for role in _ROLES:  # control tokens by role: the teacher's end of answer is the student's
            t_id = getattr(teacher_tokenizer, f"{role}_id", None)
            s_id = getattr(student_tokenizer, f"{role}_id", None)
            if t_id is not None and s_id is not None and 0 <= t_id < len(student) and kind[t_id] == UNMAPPED:
                student[t_id], kind[t_id] = s_id, SPECIAL
        return cls(student, kind, t_bytes, s_bytes)

    def outside(self) -> np.ndarray:
        """bool [V_s] True for each student token that no teacher token maps to (the map's image complemented): where
        a carried distribution's unmappable mass goes (`kernels.reference.carried_sampled_kl_rows_reference`)."""
        out = np.ones(len(self.student_bytes), dtype=bool)
        image = self.student[self.student >= 0]
        out[image[image < len(out)]] = False
        return out

    def exact_ids(self, teacher_ids: np.ndarray) -> np.ndarray:
        """int32 [..] the student id of each teacher id that maps EXACT (or SPECIAL, by role), -1 for the others."""
        ids = np.asarray(teacher_ids, dtype=np.int64)
        ok = (ids >= 0) & (ids < len(self.student))
        safe = np.where(ok, ids, 0)
        keep = ok & ((self.kind[safe] == EXACT) | (self.kind[safe] == SPECIAL))
        return np.where(keep, self.student[safe], -1).astype(np.int32)

    def next_student_token(self, remainder: bytes) -> int:
        """The student token that starts ``remainder`` (the longest of its vocabulary that is a prefix), or -1."""
        s = self._lookup.get(remainder)
        if s is None:
            s = _longest_prefix(self._lookup, remainder)
        return -1 if s is None else s

    @property
    def _lookup(self) -> dict[bytes, int]:
        cached = self.__dict__.get("_lookup_cache")
        if cached is None:
            cached = {}
            for i, b in enumerate(self.student_bytes):
                if b and b not in cached:
                    cached[b] = i
            object.__setattr__(self, "_lookup_cache", cached)
        return cached

    def coverage(self, teacher_ids: np.ndarray, logprobs: np.ndarray) -> dict[str, float]:
        """Where the teacher's cached top-K probability mass goes: the share of it on tokens mapped EXACT, PREFIX,
        SPECIAL and UNMAPPED, plus the mass outside the top-K (tail), each a fraction of the total mass 1.

        Args:
            teacher_ids: int [N, K] cached teacher ids; logprobs: [N, K] their log-probs.
        """
        p = np.exp(np.asarray(logprobs, dtype=np.float64))
        ids = np.asarray(teacher_ids, dtype=np.int64)
        kinds = np.where((ids >= 0) & (ids < len(self.kind)), self.kind[np.clip(ids, 0, len(self.kind) - 1)], UNMAPPED)
        n = max(p.shape[0], 1)
        out = {name: float(p[kinds == k].sum()) / n for k, name in enumerate(KIND_NAMES)}
        out["tail"] = float(np.clip(1.0 - p.sum(axis=1), 0.0, 1.0).sum()) / n
        return out


def _longest_prefix(lookup: dict[bytes, int], b: bytes) -> int | None:
    """The id of the longest token in ``lookup`` that is a proper prefix of ``b``."""
    for end in range(len(b) - 1, 0, -1):
        s = lookup.get(b[:end])
        if s is not None:
            return s
    return None


def teacher_tokenizer(manifest: Any) -> Any:
    """The tokenizer a cache was built with, found from its manifest (the preset name, else the model path) and
    checked against the manifest's tokenizer hash, so a map is never built from another tokenizer.

    Raises:
        ConfigError: no loadable tokenizer has the cache's hash (the message says what was tried).
    """
    from fusion_cache.capture.render import tokenizer_hash
    from fusion_cache.models.load import load_stored_tokenizer
    from fusion_cache.models.load import load_tokenizer

    t = manifest.teacher
    stored = load_stored_tokenizer(t.tokenizer_hash)  # a local teacher's, kept by the build (a manifest has no paths)
    if stored is not None and tokenizer_hash(stored) == t.tokenizer_hash:
        return stored
    tried = []
    for where in dict.fromkeys([t.name, t.model]):
        try:
            tok = load_tokenizer(where)
        except Exception as e:  # noqa: BLE001 (any failure to load means: try the next place, and say why)
            tried.append(f"{where}: {type(e).__name__}")
            continue
        if tokenizer_hash(tok) == t.tokenizer_hash:
            return tok
        tried.append(f"{where}: another tokenizer (hash {tokenizer_hash(tok)[:12]})")
    raise ConfigError(
        f"teacher {t.name}: the cache's tokenizer (hash {t.tokenizer_hash[:12]}) is needed to map its ids onto the "
        f"student's vocabulary, and none was found ({'; '.join(tried)}); use kd_loss 'uld' for this teacher"
    )


def _home() -> Path:
    return Path(os.environ.get("FUSION_CACHE_HOME", "~/.cache/fusion-cache")).expanduser()


def vocab_map(teacher_tokenizer: Any, student_tokenizer: Any, *, cache_dir: str | Path | None = None) -> VocabMap:
    """`VocabMap.build`, cached on disk by the two tokenizers' hashes (`capture.render.tokenizer_hash`)."""
    from fusion_cache.capture.render import tokenizer_hash

    key = f"{tokenizer_hash(teacher_tokenizer)[:16]}-{tokenizer_hash(student_tokenizer)[:16]}-v{_FORMAT}"
    path = Path(cache_dir) if cache_dir is not None else _home() / "vocab-maps"
    file = path / f"{key}.npz"
    t_bytes, s_bytes = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    if file.exists():
        with np.load(file, allow_pickle=False) as z:
            student, kind = z["student"], z["kind"]
        if len(student) == len(t_bytes):
            return VocabMap(student, kind, t_bytes, s_bytes)
    vmap = VocabMap.build(teacher_tokenizer, student_tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, student=vmap.student, kind=vmap.kind)
    os.replace(tmp, file)
    return vmap


# ------------------------------------------------------------------------------------------- carrying distributions
@dataclass(frozen=True)
class Carried:
    """Teacher distributions carried onto the student's vocabulary at some student rows.

    Attributes:
        student_rows: int64 [P] the student answer rows with a target (increasing).
        ids: int32 [P, K] student token ids, each at most once per row, -1 padding (most likely first).
        logprobs: float32 [P, K] their log-probs (-inf padding); ``1 - sum(exp)`` is the row's tail bucket.
        exact: bool [P] the row's context ends at a teacher token boundary (False: inside a teacher token).
    """

    student_rows: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    exact: np.ndarray


def carry(
    vmap: VocabMap,
    student_ends: np.ndarray,
    teacher_ends: np.ndarray,
    teacher_ids: np.ndarray,
    teacher_logprobs: np.ndarray,
    answer: bytes,
    *,
    min_mass: float = 1e-3,
) -> Carried:
    """Targets for the student rows whose next bytes some teacher row predicts.

    Args:
        vmap: the teacher -> student map.
        student_ends: int [R_s] for each student answer row, where its context ends (bytes after the answer's start;
            row t predicts the bytes from there). ``-1`` marks rows whose context does not end at a real boundary.
        teacher_ends: int [R_t] the same for the teacher's cached answer rows (increasing).
        teacher_ids, teacher_logprobs: [R_t, K] the cached top-K of each teacher row.
        answer: the answer's bytes (what was actually written; the consumed part of a teacher token is checked
            against it).
        min_mass: a mid-token row whose agreeing candidates hold less teacher mass than this gets no target (the
            teacher did not foresee the text there, and renormalizing a sliver would invent confidence).

    Returns:
        `Carried` for the student rows that have a target.
    """
    k = teacher_ids.shape[1] if teacher_ids.ndim == 2 else 0
    starts = np.asarray(teacher_ends, dtype=np.int64)
    rows, out_ids, out_lp, exact = [], [], [], []
    for r, e in enumerate(np.asarray(student_ends, dtype=np.int64)):
        if e < 0:
            continue
        j = int(np.searchsorted(starts, e, side="right")) - 1  # the teacher row whose prediction spans byte e
        if j < 0:
            continue
        offset = int(e - starts[j])
        cand = np.asarray(teacher_ids[j], dtype=np.int64)
        p = np.exp(np.asarray(teacher_logprobs[j], dtype=np.float64))
        if offset == 0:
            valid = (cand >= 0) & (cand < len(vmap.student))
            mapped = np.where(valid, vmap.student[np.clip(cand, 0, len(vmap.student) - 1)], -1).astype(np.int64)
            mass = p
        else:
            written = answer[int(starts[j]) : int(e)]
            mapped = np.full(len(cand), -1, dtype=np.int64)
            keep = np.zeros(len(cand), dtype=bool)
            for i, t in enumerate(cand):
                b = vmap.teacher_bytes[t] if 0 <= t < len(vmap.teacher_bytes) else None
                if b and len(b) > offset and b[:offset] == written:
                    keep[i] = True
                    mapped[i] = vmap.next_student_token(b[offset:])
            total = float(p[keep].sum())
            if total < min_mass:
                continue
            mass = np.where(keep, p / total, 0.0)
            mapped = np.where(keep, mapped, -1)
        ids, lp = _merge(mapped, mass, k)
        if ids[0] < 0:
            continue
        rows.append(r)
        out_ids.append(ids)
        out_lp.append(lp)
        exact.append(offset == 0)
    if not rows:
        return Carried(np.zeros(0, np.int64), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32),
                       np.zeros(0, bool))  # fmt: skip
    return Carried(np.asarray(rows, np.int64), np.stack(out_ids), np.stack(out_lp), np.asarray(exact, bool))


def _merge(ids: np.ndarray, mass: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Add up the mass of equal ids (dropping -1), most likely first, padded to k with -1 / -inf."""
    ok = (ids >= 0) & (mass > 0)
    out_ids = np.full(k, -1, dtype=np.int32)
    out_lp = np.full(k, -np.inf, dtype=np.float32)
    if not ok.any():
        return out_ids, out_lp
    uniq, inverse = np.unique(ids[ok], return_inverse=True)
    summed = np.bincount(inverse, weights=mass[ok])
    order = np.argsort(-summed, kind="stable")[:k]
    out_ids[: len(order)] = uniq[order]
    out_lp[: len(order)] = np.log(np.minimum(summed[order], 1.0))
    return out_ids, out_lp


def coverage_report(cache: str, student_tokenizer: Any, *, limit: int | None = None) -> dict:
    """How well a cache serves a student of another tokenizer through the map (`fusion-cache coverage`).

    Returns:
        {"teacher", "student_vocab", "teacher_vocab", "map": {exact, prefix, special, unmapped: shares of the
        teacher's vocabulary}, "mass": {exact, prefix, special, unmapped, tail: shares of the teacher's probability
        mass at the cached answer rows}, "rows": {student answer rows, with a target at a shared boundary, inside a
        teacher token, without a target}, "samples"}.
    """
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.capture.render import has_chat_template
    from fusion_cache.train.stream import DistillStream
    from fusion_cache.train.stream import carry_row

    reader = CacheReader(cache)
    # the student's view of each row, as training renders it (max_length: no truncation here)
    view = DistillStream([cache], student_tokenizer, chat_template=has_chat_template(student_tokenizer),
                         max_length=1 << 30, rank=0, world_size=1)  # fmt: skip
    if view.same_tokenizer[0]:
        raise ConfigError(f"{cache}: the student has the teacher's tokenizer; every token maps to itself")
    vmap = vocab_map(teacher_tokenizer(reader.manifest), student_tokenizer)
    mass = dict.fromkeys((*KIND_NAMES, "tail"), 0.0)
    rows = {"student_rows": 0, "boundary": 0, "inside_teacher_token": 0, "no_target": 0}
    n_teacher_rows = samples = 0
    for cached in reader.iter_rows():
        if limit is not None and samples >= limit:
            break
        samples += 1
        for key, v in vmap.coverage(cached.topk_ids, cached.topk_logprobs).items():
            mass[key] += v * cached.n_answer
        n_teacher_rows += cached.n_answer
        _, spans = view._student_view([cached])
        c = carry_row(vmap, cached, spans)
        rows["student_rows"] += spans.n_rows
        rows["boundary"] += int(c.exact.sum())
        rows["inside_teacher_token"] += int((~c.exact).sum())
        rows["no_target"] += spans.n_rows - len(c.student_rows)
    kinds = np.bincount(vmap.kind, minlength=len(KIND_NAMES)) / max(len(vmap.kind), 1)
    return {
        "teacher": reader.manifest.teacher.name,
        "teacher_vocab": len(vmap.student),
        "student_vocab": len(student_tokenizer),
        "map": {name: float(kinds[k]) for k, name in enumerate(KIND_NAMES)},
        "mass": {k: v / max(n_teacher_rows, 1) for k, v in mass.items()},
        "rows": rows,
        "samples": samples,
    }
