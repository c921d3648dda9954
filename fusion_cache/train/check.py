"""Check a student against teacher caches before anything heavy loads (`fusion-cache check --student S CACHE...`).

    report = check_caches(["cache/a", "cache/b"], tokenizer, student="smollm2-135m", kd_loss=["auto"])
    print(report.table())      # or report.as_dict() (``--json``), report.line() (what train and eval print)
    report.refuse()            # ConfigError naming the field and the value of the first impossible combination

Per teacher it says whether the student has the teacher's tokenizer and chat template (the cache's tokenizer hash
covers both), which alignment applies (the same tokens: row for row; another tokenizer: ``--align``, byte spans by
default), which losses of the registry (`train.losses.LOSSES`) the cache allows and why not, and, for a teacher of
another tokenizer whose cache stores ids, how much of its cached top-K mass and ids the vocabulary map
(`train.vocab`) carries onto the student's vocabulary. The rows are not estimated: the first ``limit`` samples of the
join go through the training stream itself (`train.stream.DistillStream`, the same targets and maps), so the aligned
and dropped counts are the ones training will see, and every id a batch would feed the student is compared with the
student's vocabulary size, read from its config (`train.guards.check_examples` would refuse it at step 1).

Only tokenizers and model configs are loaded, never weights: `train` and `eval` run this check before loading the
student and print `CheckReport.line`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import numpy as np

from fusion_cache.capture.render import has_chat_template
from fusion_cache.capture.render import tokenizer_hash
from fusion_cache.config import lookup
from fusion_cache.errors import ConfigError
from fusion_cache.train.losses import LOSS_CHOICES
from fusion_cache.train.losses import LOSSES
from fusion_cache.train.losses import DistillLoss
from fusion_cache.train.losses import TeacherTraits
from fusion_cache.train.losses import make_loss
from fusion_cache.train.losses import resolve_loss_names
from fusion_cache.train.stream import DistillStream
from fusion_cache.train.stream import shares_tokenizer
from fusion_cache.train.vocab import KIND_NAMES
from fusion_cache.train.vocab import UNMAPPED
from fusion_cache.train.vocab import teacher_tokenizer
from fusion_cache.train.vocab import vocab_map

CHECK_ROWS = 64  # samples `train` and `eval` align before loading the student (a few seconds at most)


@dataclass
class TeacherCheck:
    """What one cache allows a student.

    Attributes:
        name: the teacher's label (as in the metrics).
        cache: the cache's path or URL.
        k, codec, rows_in_cache: K, codec name and rows of the cache.
        tokenizer: ``same`` (the student's tokenizer hash is the cache's) or ``another``.
        template: ``same``, ``another`` or ``unknown`` (another hash and the teacher's tokenizer was not found, so
            the definition and the template cannot be told apart); ``chat`` / ``plain`` when the two render
            differently (one uses a chat template, the other plain text).
        alignment: ``index`` (the same tokens, row for row) or the ``--align`` mode for another tokenizer.
        losses: {loss name: None when the cache allows it, else why not} for every registered loss.
        loss: the loss this teacher trains with (None: not asked).
        rows: the training stream's counts on the checked samples (`train.align.AlignStats.as_dict`).
        coverage: for a teacher of another tokenizer with ids and a map: ``mapped_mass`` (share of the cached top-K
            mass whose token maps onto a student token), ``mapped_ids`` (share of the cached ids that map) and
            ``mass`` (where the whole mass goes: exact, prefix, special, unmapped, tail); else None.
        note: why there is no coverage (the same tokenizer, no ids, no teacher tokenizer found), else None.
        answer_scores: whether the codec stores the teacher's log-probs of the answer tokens, which ``combine
            min_ce`` and ``--kd-gate student`` compare (codecs raw, full, sampled).
    """

    name: str
    cache: str
    k: int
    codec: str
    rows_in_cache: int
    tokenizer: str
    template: str
    alignment: str
    losses: dict[str, str | None]
    loss: str | None = None
    rows: dict = field(default_factory=dict)
    coverage: dict | None = None
    note: str | None = None
    answer_scores: bool = False


@dataclass
class CheckReport:
    """`check_caches`'s answer; ``problems`` are the impossible combinations (`refuse` raises the first)."""

    student: str
    student_vocab: int | None  # rows of the student's embedding (its config's vocab_size), None when unknown
    tokenizer_size: int
    max_length: int
    teachers: list[TeacherCheck]
    samples: dict  # {"checked", "usable", "skipped": {...}, "student_answer_rows", "truncated_answer_rows", "all"}
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def refuse(self) -> None:
        """Raise the first impossible combination (ConfigError naming the field and the value), if any."""
        if self.problems:
            raise ConfigError(self.problems[0])

    def top1_note(self) -> str | None:
        """Why `eval` reports no teacher top-1 agreement for some teachers (None: it does for all)."""
        foreign = [t.name for t in self.teachers if t.alignment != "index"]
        if not foreign:
            return None
        return (f"top-1 agreement not computed for {', '.join(foreign)} (another tokenizer: the teacher's ids are not "
                "the student's)")  # fmt: skip

    def line(self, *, top1: bool = False) -> str:
        """The check in one line (what `train` and, with ``top1``, `eval` print before loading the student)."""
        s = self.samples
        parts = []
        for t in self.teachers:
            r = t.rows
            bits = [f"{t.name}: {_kinship(t)}, {t.alignment} alignment"]
            if t.loss is not None:
                bits.append(f"loss {t.loss}")
            student_rows = r.get("aligned", 0) + r.get("dropped_student", 0)
            if student_rows:
                bits.append(f"{r['aligned']}/{student_rows} student rows aligned ({r['aligned'] / student_rows:.0%})")
            if t.coverage is not None:
                bits.append(f"the map carries {t.coverage['mapped_mass']:.1%} of the top-K mass")
            parts.append(", ".join(bits))
        skipped = sum(s["skipped"].values())
        head = f"check: student {self.student} (vocab {self.student_vocab or '?'})"
        tail = f"{s['usable']} of {s['checked']} samples usable"
        if skipped:
            tail += " (" + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s["skipped"].items() if v) + ")"
        if s["truncated_answer_rows"]:
            tail += f", {s['truncated_answer_rows']} answer rows cut by max_length={self.max_length}"
        note = self.top1_note() if top1 else None
        return f"{head}; " + "; ".join(parts) + f"; {tail}" + (f"; {note}" if note else "")

    def table(self) -> str:
        """A short human-readable table: one column per teacher."""
        rows: list[tuple[str, list[str]]] = [
            ("cache", [t.cache for t in self.teachers]),
            ("K / codec / rows", [f"{t.k} / {t.codec} / {t.rows_in_cache}" for t in self.teachers]),
            ("tokenizer", [t.tokenizer for t in self.teachers]),
            ("chat template", [_TEMPLATE_CELLS[t.template] for t in self.teachers]),
            ("alignment", [t.alignment for t in self.teachers]),
            ("losses allowed", [", ".join(n for n, why in t.losses.items() if why is None) for t in self.teachers]),
            ("losses refused", [", ".join(n for n, why in t.losses.items() if why) or "-" for t in self.teachers]),
        ]
        if any(t.loss for t in self.teachers):
            rows.append(("loss", [t.loss or "-" for t in self.teachers]))
        rows += [
            ("rows aligned", [_aligned(t.rows) for t in self.teachers]),
            ("rows dropped", [_dropped(t.rows) for t in self.teachers]),
            ("map coverage", [_coverage(t) for t in self.teachers]),
            ("min_ce / kd-gate", ["yes" if t.answer_scores else f"no (codec {t.codec})" for t in self.teachers]),
        ]
        width = max(len(k) for k, _ in rows)
        cols = [max(len(v[i]) for _, v in rows) for i in range(len(self.teachers))]
        head = [
            f"{'teacher':<{width}}  " + "  ".join(f"{t.name:<{c}}" for t, c in zip(self.teachers, cols, strict=True))
        ]
        body = [f"{k:<{width}}  " + "  ".join(f"{x:<{c}}" for x, c in zip(v, cols, strict=True)) for k, v in rows]
        s = self.samples
        foot = [
            f"student {self.student}: tokenizer of {self.tokenizer_size} tokens, "
            f"vocab_size {self.student_vocab or '?'}",
            f"samples: {s['checked']} checked{' (the whole join)' if s['all'] else ''}, {s['usable']} usable, "
            f"skipped {s['skipped']}; student answer rows {s['student_answer_rows']}, "
            f"{s['truncated_answer_rows']} cut by max_length={self.max_length}",
            *(f"refused: {p}" for p in self.problems),
        ]
        return "\n".join([*(line.rstrip() for line in head + body), *foot])


def _kinship(t: TeacherCheck) -> str:
    if t.tokenizer == "same":
        return "same tokenizer" if t.template == "same" else f"same tokenizer, {_TEMPLATE_WORDS[t.template]}"
    return "another tokenizer" + (f", {_TEMPLATE_WORDS[t.template]}" if t.template in ("chat", "plain") else "")


_TEMPLATE_WORDS = {
    "same": "the same chat template",
    "another": "another chat template",
    "unknown": "chat template not compared",
    "chat": "the student renders with its chat template, the cache in plain text",
    "plain": "the student renders plain text, the cache with a chat template",
}


_TEMPLATE_CELLS = {"same": "same", "another": "another", "unknown": "not compared",
                   "chat": "student chat, cache plain", "plain": "student plain, cache chat"}  # fmt: skip


def _dropped(rows: dict) -> str:
    return f"{rows.get('dropped_student', 0)} student / {rows.get('dropped_teacher', 0)} teacher"


def _aligned(rows: dict) -> str:
    student_rows = rows.get("aligned", 0) + rows.get("dropped_student", 0)
    if not student_rows:
        return "0"
    return f"{rows['aligned']} of {student_rows} ({rows['aligned'] / student_rows:.1%})"


def _coverage(t: TeacherCheck) -> str:
    if t.coverage is None:
        return t.note or "-"
    return f"{t.coverage['mapped_mass']:.1%} of mass, {t.coverage['mapped_ids']:.1%} of ids"


# ------------------------------------------------------------------------------------------- the check
def student_vocab_size(student: str) -> int | None:
    """Rows of a student's token embedding from its config alone (no weights): its (text) config's vocab_size."""
    from transformers import AutoConfig

    from fusion_cache.models.load import named_load_errors
    from fusion_cache.models.lora import adapter_base
    from fusion_cache.models.lora import is_adapter_dir
    from fusion_cache.models.presets import resolve_model

    name = adapter_base(student) if is_adapter_dir(student) else student
    path = resolve_model(name, role="student").path
    with named_load_errors("student", student):
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    return int(vocab) if vocab else None


def _tokenizer(tokenizer: Any, student_hash: str, reader: Any, teacher_tok: Any) -> str:
    """``same`` or ``another`` tokenizer definition (the hash covers the template too: the teacher's tokenizer, when
    found, tells them apart)."""
    if student_hash == reader.manifest.teacher.tokenizer_hash:
        return "same"
    if teacher_tok is not None and _definition(teacher_tok) == _definition(tokenizer):
        return "same"
    return "another"


def _definition(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))


def _template(reader: Any, tokenizer: Any, same: bool, teacher_tok: Any) -> str:
    """How the student's rendering compares with the cache's (see `TeacherCheck.template`)."""
    chat = has_chat_template(tokenizer)
    if chat != reader.manifest.teacher.chat_template:
        return "chat" if chat else "plain"
    if same:
        return "same"
    if teacher_tok is None:
        return "unknown"
    same_template = (teacher_tok.chat_template or "") == (getattr(tokenizer, "chat_template", None) or "")
    return "same" if same_template else "another"


def _applicable(losses: dict[str, DistillLoss], traits: TeacherTraits, foreign: bool, map_error: str | None) -> dict:
    """{loss name: None or why this teacher cannot use it} (each loss's own `check`, and the map it would need)."""
    out: dict[str, str | None] = {}
    for name, loss in losses.items():
        try:
            loss.check(traits)
        except ConfigError as e:
            out[name] = str(e)
            continue
        out[name] = map_error if (foreign and loss.target != "values" and map_error) else None
    return out


def check_caches(
    caches: list[str],
    tokenizer: Any,
    *,
    student: str,
    student_vocab: int | None = None,
    losses: list[DistillLoss] | None = None,
    maps: list | None = None,
    kd_loss: list[str] | None = None,
    loss_options: dict | None = None,
    align: str = "bytes",
    max_length: int = 1024,
    limit: int | None = CHECK_ROWS,
    coverage: bool = True,
) -> CheckReport:
    """Check a student (its tokenizer and vocabulary size) against ``caches``; see the module docstring.

    Args:
        caches: one cache per teacher, in training order.
        tokenizer: the student's tokenizer; ``student`` names it in messages.
        student_vocab: rows of the student's embedding (`student_vocab_size`); None skips the id check.
        losses, maps: a training plan's losses and vocabulary maps (`train.trainer.plan_teachers`, already checked);
            else ``kd_loss`` (names, ``auto`` allowed; None: report every loss, train none) with ``loss_options``.
        align, max_length: as `TrainConfig`.
        limit: samples of the join to align (None: all).
        coverage: build a vocabulary map for a teacher of another tokenizer when no plan gave one (a few seconds
            for large vocabularies; cached on disk), to measure what it carries.

    Returns:
        The report; its ``problems`` list the impossible combinations (nothing is raised for them here).
    """
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.train.join import unique_names

    readers = [CacheReader(c) for c in caches]
    names = unique_names([r.manifest.teacher.name for r in readers])
    student_hash = tokenizer_hash(tokenizer)
    same = [shares_tokenizer(r, tokenizer) for r in readers]
    # each foreign teacher's own tokenizer (`train.vocab`, by the hash its manifest records), where its ids could be
    # mapped: the vocabulary map, its coverage, and whether auto can pick mapped_kl depend on it
    toks: list[Any] = [None] * len(readers)
    map_errors: list[str | None] = [None] * len(readers)
    for s, (r, same_s) in enumerate(zip(readers, same, strict=True)):
        if not same_s and (maps is None or maps[s] is None) and (coverage or (kd_loss is not None and r.codec.has_ids)):
            try:
                toks[s] = teacher_tokenizer(r.manifest)
            except ConfigError as e:
                map_errors[s] = str(e)
    traits = [TeacherTraits(names[i], same[i] and r.codec.has_ids, r.codec, r.k, tokenizer_found=toks[i] is not None)
              for i, r in enumerate(readers)]  # fmt: skip
    every = {name: make_loss(name, **(loss_options or {})) for name in LOSSES}
    problems: list[str] = []
    chosen: list[DistillLoss | None]
    if losses is not None:
        chosen = list(losses)
    elif kd_loss is not None:
        for name in kd_loss:
            lookup(dict.fromkeys(LOSS_CHOICES), name, "kd_loss")
        chosen = [make_loss(n, **(loss_options or {})) for n in resolve_loss_names(list(kd_loss), traits)]
    else:
        chosen = [None] * len(readers)
    maps = list(maps) if maps is not None else [None] * len(readers)
    teachers = []
    for s, (name, r, same_s) in enumerate(zip(names, readers, same, strict=True)):
        teacher_tok, map_error = toks[s], map_errors[s]
        wants_map = chosen[s] is not None and chosen[s].target != "values"
        if teacher_tok is not None and r.codec.has_ids and maps[s] is None and (coverage or wants_map):
            maps[s] = vocab_map(teacher_tok, tokenizer)
        allowed = _applicable(every, traits[s], not same_s, map_error)
        loss = chosen[s]
        if loss is not None and allowed.get(loss.name) and losses is None:
            problems.append(allowed[loss.name])
        note = None
        if same_s:
            note = "identity (the same tokenizer)"
        elif not r.codec.has_ids:
            note = f"n/a (codec {r.codec.name!r} stores no ids)"
        elif maps[s] is None:
            note = "n/a (the teacher's tokenizer was not found)"
        teachers.append(TeacherCheck(
            name=name, cache=str(caches[s]), k=r.k, codec=r.codec.name, rows_in_cache=r.manifest.stats.rows,
            tokenizer=_tokenizer(tokenizer, student_hash, r, teacher_tok),
            template=_template(r, tokenizer, same_s, teacher_tok), alignment="index" if same_s else align,
            losses=allowed, loss=None if loss is None else loss.name, note=note, answer_scores=r.codec.has_targets,
        ))  # fmt: skip
    # a refused loss's teacher is still aligned, with the values target (what every loss can be given)
    targets = [
        loss.target
        if loss is not None and not same_s and (loss.target == "values" or maps[s] is not None)
        else "values"
        for s, (loss, same_s) in enumerate(zip(chosen, same, strict=True))
    ]
    samples, max_ids = _sample(readers, caches, tokenizer, teachers, targets, maps, align, max_length, limit)
    report = CheckReport(student, student_vocab, len(tokenizer), max_length, teachers, samples, problems)
    _check_ids(report, max_ids)
    if samples["all"] and samples["checked"] and not samples["usable"]:
        problems.append(
            f"max_length={max_length}: none of the {samples['checked']} samples of the caches leaves the student "
            f"anything to train on (skipped: {samples['skipped']}); raise --max-length or check the caches"
        )
    return report


def _sample(readers, caches, tokenizer, teachers, targets, maps, align, max_length, limit) -> tuple[dict, dict]:
    """Run the first ``limit`` samples of the join through the training stream; fill each teacher's rows and
    coverage. Returns (the sample counts, {what: largest id a batch would feed the student})."""
    stream = DistillStream(list(caches), tokenizer, chat_template=has_chat_template(tokenizer), max_length=max_length,
                           align_mode=align, targets=targets, maps=maps, epochs=1,
                           rank=0, world_size=1)  # fmt: skip  # every rank checks the same rows: no data split
    whole = copy.copy(stream)
    whole.max_length = 1 << 30  # the student's untruncated view: how many answer rows max_length cuts
    n = len(readers)
    mass = [dict.fromkeys((*KIND_NAMES, "tail"), 0.0) for _ in range(n)]
    mapped_ids, all_ids, teacher_rows = [0] * n, [0] * n, [0] * n
    max_ids: dict[str, int] = {}
    checked = usable = answer_rows = truncated = 0
    exhausted = True
    for sample in stream.join():
        if limit is not None and checked >= limit:
            exhausted = False
            break
        checked += 1
        spans = whole._student_view(sample.rows)[1]
        full = spans.n_rows
        kept = min(full, max(0, max_length - spans.answer_start))  # what `DistillStream` keeps of them
        ex = stream.example(sample.rows)
        answer_rows += full
        truncated += full - kept
        for s, row in enumerate(sample.rows):
            if row is None or maps[s] is None or not readers[s].codec.has_ids:
                continue
            for key, v in maps[s].coverage(row.topk_ids, row.topk_logprobs).items():
                mass[s][key] += v * row.n_answer
            teacher_rows[s] += row.n_answer
            ids = np.asarray(row.topk_ids, dtype=np.int64)
            valid = (ids >= 0) & (ids < len(maps[s].kind))
            mapped_ids[s] += int((valid & (maps[s].kind[np.where(valid, ids, 0)] != UNMAPPED)).sum())
            all_ids[s] += ids.size
        if ex is None:
            continue
        usable += 1
        if ex.input_ids.size:
            max_ids["tokens"] = max(max_ids.get("tokens", -1), int(ex.input_ids.max()))
        for name, target in zip(stream.names, ex.teachers, strict=True):
            if target is not None and target.ids is not None and target.ids.size:
                max_ids[name] = max(max_ids.get(name, -1), int(target.ids.max()))
    for s, t in enumerate(teachers):
        t.rows = stream.align_stats[stream.names[s]].as_dict()
        if teacher_rows[s]:
            shares = {k: v / teacher_rows[s] for k, v in mass[s].items()}
            top_k_mass = max(1.0 - shares["tail"], 1e-12)
            carried = shares["exact"] + shares["prefix"] + shares["special"]
            t.coverage = {"mapped_mass": carried / top_k_mass, "mapped_ids": mapped_ids[s] / max(all_ids[s], 1),
                          "mass": shares}  # fmt: skip
    samples = {"checked": checked, "usable": usable, "skipped": dict(stream.skipped),
               "student_answer_rows": answer_rows, "truncated_answer_rows": truncated, "all": exhausted}  # fmt: skip
    return samples, max_ids


def _check_ids(report: CheckReport, max_ids: dict[str, int]) -> None:
    """A problem for every id a batch would feed the student at or above its vocabulary size."""
    vocab = report.student_vocab
    if vocab is None:
        return
    for what, top in max_ids.items():
        if top >= vocab:
            whose = "the student's input tokens" if what == "tokens" else f"teacher {what}'s top-K ids"
            report.problems.append(
                f"student {report.student!r} (vocab_size={vocab}): {whose} reach id {top}, outside its embedding; "
                "use a student whose embedding covers the tokenizer, or kd_loss 'uld' for a teacher of another "
                "vocabulary"
            )


def check_json(report: CheckReport) -> str:
    """``fusion-cache check --json``."""
    return json.dumps(report.as_dict(), indent=2)
