"""A controlled testbed where multi-teacher fusion must help if the machinery is right (issue 17, item 4a).

    python -m fusion_cache.recipes.testbed --work /tmp/testbed [--scale small] [--lock /tmp/fc-cpu.lock]

    from fusion_cache.recipes.testbed import build_testbed
    tb = build_testbed("/tmp/testbed", scale="small")  # Testbed: every path, and the teachers' held-out numbers

Two small teachers with different tokenizers and complementary skills, a student weaker than both, and gold answers
written by generators (`fusion_cache.recipes.testbed_data`), all made here from scratch. Under ``work_dir``,
deterministically (seeded, one torch thread), each step skipped when its output exists:

1. ``data/``: each teacher's pretraining rows (one domain each), the student's small mixed train split, a validation
   split (for choosing settings) and a held-out split (mixed, and one file per domain); disjoint prompts.
2. ``tokenizers/digits`` (D: every digit its own token, as Llama-3 and Qwen split numbers; 2048 entries) and
   ``tokenizers/merged`` (M: plain byte-level BPE, which merges frequent numbers; 3000 entries), both trained on both
   domains, with different special tokens: no id and no numeral lines up.
3. ``models/student-start``: D, a 2-layer Llama of width 128, briefly pretrained on generic text (see `_GENERIC`).
4. ``models/teacher-math`` (M, math rows only) and ``models/teacher-code`` (D, code rows only): Llamas of 4 layers
   and width 256, trained on their answers with a plain loop, checkpointed after every epoch. (Not Qwen2: for a
   ``qwen2`` model directory transformers' AutoTokenizer builds Qwen2's own pre-tokenizer and normalizer around the
   saved vocabulary, so the teacher would not tokenize as it was trained.)
5. ``caches/<split>/teacher-<domain>``: each teacher's top-K over the train, validation and held-out splits
   (`fusion_cache.capture.build.run_build`, HF engine, raw codec). The student shares the code teacher's tokenizer,
   so that teacher allows the top-K KL; the math teacher must be distilled across tokenizers, on exactly the
   numerals where D and M differ.
6. ``numbers.json``: held-out answer CE per domain (per token, and in bits per answer byte, which compares models
   of different tokenizers) of both teachers and of the student start.

``--lock FILE`` takes an exclusive flock on FILE around each unit of work (a teacher epoch, a cache, ...), so other
jobs on a shared machine interleave with a build that takes an hour. ``benchmarks/bench_fusion_quality.py`` trains
and compares the students.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import AbstractContextManager
from contextlib import contextmanager
from contextlib import nullcontext
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from fusion_cache.errors import ConfigError
from fusion_cache.recipes.testbed_data import DOMAINS
from fusion_cache.recipes.testbed_data import SIZES
from fusion_cache.recipes.testbed_data import DataSizes
from fusion_cache.recipes.testbed_data import split_files
from fusion_cache.recipes.testbed_data import write_splits

Guard = Callable[[str], AbstractContextManager]  # wraps one unit of work (its name given), e.g. a CPU lock
CACHE_SPLITS = ("train", "validation", "heldout")
_DONE = "testbed.json"  # written last into a finished model directory: what made it


@dataclass(frozen=True)
class Arch:
    """One model of the testbed: its tokenizer and its shape."""

    tokenizer: str  # "digits" or "merged"
    arch: str  # "llama" or "qwen2"
    layers: int
    hidden: int


@dataclass(frozen=True)
class TestbedScale:
    """Sizes and training settings of one scale (`SCALES`)."""

    data: DataSizes
    vocab: dict[str, int] = field(default_factory=lambda: {"digits": 2048, "merged": 3000})
    tokenizer_rows: int = 8000  # pretraining rows per domain the tokenizers learn from
    teachers: dict[str, Arch] = field(
        default_factory=lambda: {"math": Arch("merged", "llama", 4, 256), "code": Arch("digits", "llama", 4, 256)}
    )
    teacher_epochs: int = 3
    teacher_batch: int = 32
    teacher_lr: float = 1e-3
    student: Arch = Arch("digits", "llama", 2, 128)
    student_steps: int = 300  # generic pretraining
    student_batch: int = 16
    student_block: int = 128
    student_lr: float = 2e-3
    cache_k: int = 32
    max_length: int = 512
    seed: int = 0

    def step_settings(self) -> dict[str, dict]:
        """What each step's output depends on (recorded with it, so a rerun with other settings is refused)."""
        data = {"data": asdict(self.data), "seed": self.seed}
        tok = data | {"vocab": self.vocab, "tokenizer_rows": self.tokenizer_rows, "max_length": self.max_length}
        out = {"data": data, "tokenizers": tok}
        out["student-start"] = tok | {
            "student": asdict(self.student),
            "steps": self.student_steps,
            "batch": self.student_batch,
            "block": self.student_block,
            "lr": self.student_lr,
        }
        for dom, arch in self.teachers.items():
            out[f"teacher-{dom}"] = tok | {
                "teacher": asdict(arch),
                "epochs": self.teacher_epochs,
                "batch": self.teacher_batch,
                "lr": self.teacher_lr,
            }
        return json.loads(json.dumps(out))  # tuples as lists: what a record read back holds


SCALES = {
    "full": TestbedScale(SIZES["full"]),
    # the test's scale: every step runs, on models too small to learn anything, in a few seconds
    "small": TestbedScale(
        SIZES["small"],
        vocab={"digits": 300, "merged": 360},
        tokenizer_rows=240,
        teachers={"math": Arch("merged", "llama", 1, 32), "code": Arch("digits", "llama", 1, 32)},
        teacher_epochs=2,
        teacher_batch=16,
        student=Arch("digits", "llama", 1, 32),
        student_steps=3,
        student_batch=4,
        student_block=32,
        cache_k=8,
    ),
}

# Special tokens per tokenizer: different names and different positions, so no id means the same in both.
_SPECIALS = {
    "digits": {"specials": ["<|pad|>", "<|endoftext|>"], "eos": "<|endoftext|>", "pad": "<|pad|>"},
    "merged": {"specials": ["<unk>", "<s>", "</s>", "<pad>"], "eos": "</s>", "pad": "<pad>", "bos": "<s>"},
}


@dataclass(frozen=True)
class Testbed:
    """Everything `build_testbed` made.

    Attributes:
        work_dir: the root.
        scale: "full" or "small".
        data: `testbed_data.split_files` (split name -> JSONL).
        tokenizers: {"digits", "merged"} -> tokenizer directory.
        teachers: {"math", "code"} -> model directory (with its tokenizer).
        student: the student's start (with the digits tokenizer).
        caches: {split: {domain: cache directory}} for the splits in `CACHE_SPLITS`.
        numbers: {model: {domain: {"answer_ce", "answer_tokens", "bits_per_byte", "samples"}}} on the held-out
            split, for "teacher-math", "teacher-code" and "student-start".
        timings: seconds of each unit of work (across resumed runs; waits for the guard's lock left out).
    """

    work_dir: Path
    scale: str
    data: dict[str, Path]
    tokenizers: dict[str, Path]
    teachers: dict[str, Path]
    student: Path
    caches: dict[str, dict[str, Path]]
    numbers: dict
    timings: dict[str, float]


def testbed_paths(work_dir: str | Path) -> dict:
    """Where each part of the testbed lives under ``work_dir`` (see the module docstring)."""
    w = Path(work_dir)
    return {
        "data": split_files(w / "data"),
        "tokenizers": {t: w / "tokenizers" / t for t in ("digits", "merged")},
        "teachers": {d: w / "models" / f"teacher-{d}" for d in DOMAINS},
        "student": w / "models" / "student-start",
        "caches": {s: {d: w / "caches" / s / f"teacher-{d}" for d in DOMAINS} for s in CACHE_SPLITS},
        "numbers": w / "numbers.json",
        "timings": w / "timings.json",
    }


# ---------------------------------------------------------------------------------------------------------------
# tokenizers


def train_tokenizer(kind: str, texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (a transformers fast tokenizer, no chat template) trained on ``texts``.

    Args:
        kind: "digits" (a digit is always its own token) or "merged" (numbers merge like any other text).
    """
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    spec = _SPECIALS[kind]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=spec["eos"], pad_token=spec["pad"], bos_token=spec.get("bos"),
        model_max_length=1 << 30,
    )  # fmt: skip


def _rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def _tokenizer_texts(data: dict[str, Path], n: int) -> list[str]:
    texts = []
    for dom in DOMAINS:
        for i, row in enumerate(_rows(data[f"pretrain-{dom}"])):
            if i == n:
                break
            texts.append(row["prompt"] + "\n\n" + row["response"])
    return texts


# ---------------------------------------------------------------------------------------------------------------
# models and the plain training loop


def new_model(arch: Arch, tokenizer, seed: int, max_positions: int):
    """A randomly initialized fp32 causal LM for ``tokenizer`` (head_dim 32, tied embeddings)."""
    import torch
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM
    from transformers import Qwen2Config
    from transformers import Qwen2ForCausalLM

    heads = max(1, arch.hidden // 32)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=arch.hidden, intermediate_size=4 * arch.hidden,
        num_hidden_layers=arch.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    if arch.arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's RNG stream
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(torch.float32)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside (CPU results are bitwise repeatable and two jobs can share two cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_rows(path: Path, tokenizer, max_length: int) -> list[tuple[list[int], int]]:
    """(ids, answer start) of each row of an input file, rendered exactly as a cache build and training render it
    (`fusion_cache.capture.render.render`, plain text: prompt, a blank line, the answer, eos)."""
    from fusion_cache.capture.inputs import read_conversations
    from fusion_cache.capture.render import render

    out = []
    for conv in read_conversations(path):
        r = render(tokenizer, conv.messages, chat_template=False)
        out.append((r.input_ids[:max_length].tolist(), r.answer_start))
    return out


def _length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """A shuffled epoch in batches of similar length (little padding): shuffle, sort within windows of 50 batches,
    cut, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for i in range(0, len(order), window):
        part = sorted(order[i : i + window], key=lambda j: lengths[j])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(seqs: list[tuple[list[int], int]], pad: int):
    """input_ids, attention_mask, labels [B, T]: labels are -100 on the prompt and the padding (loss on answers)."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (row, start) in enumerate(seqs):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start : len(row)] = ids[i, start : len(row)]
        mask[i, : len(row)] = 1
    return ids, mask, labels


@dataclass(frozen=True)
class LoopSettings:
    """One run of `train_lm`."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    max_steps: int | None = None  # stop after this many steps in total (None: every epoch to the end)


def _schedule(total: int):
    warmup = max(1, min(200, total // 10))

    def f(step: int) -> float:  # linear warmup, cosine down to a tenth
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def train_lm(out: Path, model, tokenizer, seqs: list[tuple[list[int], int]], s: LoopSettings, *, label: str,
             guard: Guard, record: dict, log: Callable[[str], None]) -> None:  # fmt: skip
    """Train ``model`` on ``seqs`` (CE on the tokens from each answer start) and save it with its tokenizer in ``out``.

    AdamW, warmup then cosine decay, gradient clipping at 1. Every epoch is one unit of work under ``guard`` and
    ends with a checkpoint in ``<out>.incomplete/state.pt``, so an interrupted run resumes at its last finished
    epoch and gives the same weights as an uninterrupted one. ``record`` (settings) is written with the model.
    """
    import torch

    work = out.with_name(out.name + ".incomplete")
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.pt"
    steps_per_epoch = math.ceil(len(seqs) / s.batch_size)
    total = s.max_steps or s.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total))
    history: list[dict] = []
    state = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if state is not None and state.get("record") == record:  # else: another run's epochs, start again
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        history = state["history"]
    pad = tokenizer.pad_token_id
    lengths = [len(ids) for ids, _ in seqs]
    for epoch in range(len(history), s.epochs):
        with guard(f"{label} epoch {epoch + 1}/{s.epochs}"), one_thread():
            t0 = time.perf_counter()
            model.train()
            loss_sum = tokens = 0.0
            step = epoch * steps_per_epoch
            for batch in _length_batches(lengths, s.batch_size, random.Random(f"{s.seed}:{epoch}")):
                if step >= total:
                    break
                ids, mask, labels = _collate([seqs[i] for i in batch], pad)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                n = float((labels[:, 1:] != -100).sum())
                loss_sum, tokens, step = loss_sum + float(loss.detach()) * n, tokens + n, step + 1
            history.append({"epoch": epoch + 1, "train_ce": loss_sum / max(tokens, 1), "answer_tokens": int(tokens),
                            "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "history": history, "record": record}, tmp)  # fmt: skip
            tmp.replace(state_path)
        log(f"{label}: epoch {epoch + 1}/{s.epochs} train CE {history[-1]['train_ce']:.4f} "
            f"({history[-1]['seconds']:.0f} s)")  # fmt: skip
    _publish_model(out, model, tokenizer, {**record, "history": history})
    shutil.rmtree(work, ignore_errors=True)


def _publish_model(out: Path, model, tokenizer, record: dict) -> None:
    """Save model + tokenizer + ``record`` into a temporary sibling and rename it to ``out`` (never half-written)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is as readable as any other
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finished(path: Path, settings: dict) -> bool:
    """Whether the step whose output is ``path`` finished with these settings (its record ``path/testbed.json``).

    Raises:
        ConfigError: it finished with other settings.
    """
    try:
        done = json.loads((path / _DONE).read_text())
    except OSError:
        return False
    if done.get("settings") != settings:
        raise ConfigError(
            f"work_dir: {path} was made with other settings ({done.get('settings')}, now {settings}); use another "
            "work dir or remove it"
        )
    return True


# Why the student starts from a brief generic pretraining rather than random weights: a random student spends its
# first hundred steps learning which tokens text is made of, which SFT and KD get alike from the gold answers, so
# the comparison would be blurred by a phase no teacher can help with; and pairwise fusion merges task vectors,
# which are small deltas from a common, trained base only when there is one (InfiFusion's pivots are pretrained).
# The text is neither domain: the Python standard library's source (code and English prose, few numerals), so the
# student knows neither the word problems nor the task templates, and stays well below both teachers.
_GENERIC = "the first source files of the Python standard library, sorted by name"


def _generic_blocks(tokenizer, n_tokens: int, block: int) -> list[tuple[list[int], int]]:
    """Blocks of ``block`` tokens of generic text (`_GENERIC`), at least ``n_tokens`` in all (answer start 0)."""
    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tokenizer(path.read_text(encoding="utf-8", errors="ignore"), add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= n_tokens + block:
            break
    return [(ids[i : i + block], 0) for i in range(0, len(ids) - block + 1, block)]


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def domain_scores(model, tokenizer, files: dict[str, Path], *, batch_size: int = 32) -> dict[str, dict]:
    """Answer CE of ``model`` on each domain's file (`fusion_cache.eval.evaluate.evaluate_rows`).

    Returns:
        {domain: {"answer_ce" (nats per answer token), "answer_tokens", "samples", "bits_per_byte" (the answers'
        total CE over their UTF-8 bytes, in bits: comparable across tokenizers; the eos token's CE is counted,
        its bytes are none), "answer_ce_digits" and "tokens_digits" (the numerals probe: the CE over the answer
        tokens that spell digits, `fusion_cache.train.vocab.digit_tokens`)}}.
    """
    from fusion_cache.eval.evaluate import evaluate_rows
    from fusion_cache.train.vocab import digit_tokens

    classes = {"digits": digit_tokens(tokenizer)}
    out = {}
    for dom, path in files.items():
        r = evaluate_rows(model, tokenizer, str(path), batch_size=batch_size, token_classes=classes)
        n_bytes = sum(len(row["response"].encode("utf-8")) for row in _rows(Path(path)))
        out[dom] = {
            "answer_ce": r["answer_ce"],
            "answer_tokens": r["answer_tokens"],
            "samples": r["samples"],
            "bits_per_byte": r["answer_ce"] * r["answer_tokens"] / max(n_bytes, 1) / math.log(2),
            "answer_ce_digits": r["answer_ce_digits"],
            "tokens_digits": r["tokens_digits"],
        }
    return out


def mixed_ce(per_domain: dict[str, dict]) -> float:
    """The token-weighted answer CE over all domains' rows: what `evaluate_rows` gives on the mixed file."""
    tokens = sum(d["answer_tokens"] for d in per_domain.values())
    return sum(d["answer_ce"] * d["answer_tokens"] for d in per_domain.values()) / max(tokens, 1)


# ---------------------------------------------------------------------------------------------------------------
# the build


def _noop_guard(name: str) -> AbstractContextManager:
    return nullcontext()


@contextmanager
def flock_guard(lock_file: str | Path, log: Callable[[str], None] = print) -> Iterator[Guard]:
    """A `Guard` holding an exclusive flock on ``lock_file`` (the one the `flock` command takes) per unit of work."""
    import fcntl

    @contextmanager
    def guard(name: str) -> Iterator[None]:
        with open(lock_file, "a") as fh:
            t = time.perf_counter()
            fcntl.flock(fh, fcntl.LOCK_EX)
            waited = time.perf_counter() - t
            if waited > 1:
                log(f"{name}: waited {waited:.0f} s for {lock_file}")
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    yield guard


class _Timings:
    """Seconds per unit of work, kept in ``timings.json`` across resumed runs."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    @contextmanager
    def unit(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.data[name] = round(self.data.get(name, 0.0) + time.perf_counter() - t, 1)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def build_testbed(work_dir: str | Path, *, scale: str = "full", guard: Guard | None = None,
                  log: Callable[[str], None] | None = None) -> Testbed:  # fmt: skip
    """Make (or finish, or just return) the testbed in ``work_dir``; see the module docstring for the steps.

    Args:
        work_dir: where everything goes; a rerun skips every finished step.
        scale: "full" (about an hour on one core) or "small" (seconds; what the test runs).
        guard: wraps every unit of work (e.g. `flock_guard`); None: nothing.
        log: progress messages (default: print).

    Returns:
        The Testbed.

    Raises:
        ConfigError: an unknown scale, or a work dir made with other settings.
    """
    if scale not in SCALES:
        raise ConfigError(f"scale: unknown value {scale!r}; valid values: {', '.join(SCALES)}")
    s = SCALES[scale]
    say = log or (lambda msg: print(f"[testbed] {msg}", flush=True))
    guard = guard or _noop_guard
    w = Path(work_dir)
    w.mkdir(parents=True, exist_ok=True)
    p = testbed_paths(w)
    timings = _Timings(p["timings"])
    settings = s.step_settings()

    @contextmanager
    def unit(name: str) -> Iterator[None]:  # the guard, then the clock: the timings leave out waits for a lock
        with guard(name), timings.unit(name):
            yield

    if not _finished(w / "data", settings["data"]):
        with unit("data"):
            write_splits(w / "data", s.data, seed=s.seed)
            (w / "data" / _DONE).write_text(json.dumps({"settings": settings["data"]}, indent=2) + "\n")
        say(f"data: {', '.join(f'{k} {sum(1 for _ in _rows(v))}' for k, v in p['data'].items())}")
    tokenizers = _build_tokenizers(p, s, settings["tokenizers"], unit)
    _build_student(p, s, tokenizers["digits"], settings["student-start"], unit, say)
    for dom in DOMAINS:
        _build_teacher(dom, p, s, tokenizers, settings[f"teacher-{dom}"], unit, say)
    _build_caches(p, s, unit, say)
    numbers = _build_numbers(p, unit, say)
    return Testbed(w, scale, p["data"], p["tokenizers"], p["teachers"], p["student"], p["caches"], numbers,
                   dict(timings.data))  # fmt: skip


def _build_tokenizers(p: dict, s: TestbedScale, settings: dict, unit: Guard) -> dict:
    from transformers import AutoTokenizer

    for kind, path in p["tokenizers"].items():
        if not _finished(path, settings):
            with unit(f"tokenizer-{kind}"):
                tok = train_tokenizer(kind, _tokenizer_texts(p["data"], s.tokenizer_rows), s.vocab[kind])
                tmp = path.with_name(path.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tok.save_pretrained(tmp)
                (tmp / _DONE).write_text(json.dumps({"settings": settings}, indent=2) + "\n")
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
    return {k: AutoTokenizer.from_pretrained(v) for k, v in p["tokenizers"].items()}


def _build_student(p, s: TestbedScale, tok, settings, unit: Guard, say) -> None:
    out = p["student"]
    if _finished(out, settings):
        return
    with unit("student-start encode"):
        blocks = _generic_blocks(tok, s.student_steps * s.student_batch * s.student_block, s.student_block)
    model = new_model(s.student, tok, s.seed + 3, s.max_length)
    loop = LoopSettings(epochs=1, batch_size=s.student_batch, lr=s.student_lr, seed=s.seed, max_steps=s.student_steps)
    record = {"settings": settings, "generic_text": _GENERIC, "blocks": len(blocks)}
    train_lm(out, model, tok, blocks, loop, label="student-start", guard=unit, record=record, log=say)


def _build_teacher(dom: str, p, s: TestbedScale, tokenizers, settings, unit: Guard, say) -> None:
    out = p["teachers"][dom]
    if _finished(out, settings):
        return
    arch = s.teachers[dom]
    tok = tokenizers[arch.tokenizer]
    with unit(f"teacher-{dom} encode"):
        seqs = encode_rows(p["data"][f"pretrain-{dom}"], tok, s.max_length)
    model = new_model(arch, tok, s.seed + (1 if dom == "math" else 2), s.max_length)
    loop = LoopSettings(epochs=s.teacher_epochs, batch_size=s.teacher_batch, lr=s.teacher_lr, seed=s.seed)
    train_lm(out, model, tok, seqs, loop, label=f"teacher-{dom}", guard=unit,
             record={"settings": settings, "domain": dom}, log=say)  # fmt: skip


def _build_caches(p, s: TestbedScale, unit: Guard, say) -> None:
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig

    for split, by_dom in p["caches"].items():
        for dom, out in by_dom.items():
            if (out / "manifest.json").exists():
                continue
            cfg = BuildConfig.create(
                teacher=str(p["teachers"][dom]), data=str(p["data"][split]), out=str(out), top_k=s.cache_k,
                engine="hf", codec="raw", dtype="float32", max_length=s.max_length, overwrite=True,
            )  # fmt: skip
            with unit(f"cache {split}/teacher-{dom}"), one_thread():
                m = run_build(cfg, progress=False)
            say(f"cache {split}/teacher-{dom}: {m.stats.rows} rows, {m.stats.answer_tokens} answer tokens")


def _build_numbers(p, unit: Guard, say) -> dict:
    from fusion_cache.models.load import load_student

    if p["numbers"].exists():
        return json.loads(p["numbers"].read_text())
    files = {dom: p["data"][f"heldout-{dom}"] for dom in DOMAINS}
    models = {f"teacher-{d}": p["teachers"][d] for d in DOMAINS} | {"student-start": p["student"]}
    numbers = {}
    with unit("held-out numbers"), one_thread():
        for name, path in models.items():
            model, tok, _ = load_student(str(path))
            numbers[name] = domain_scores(model, tok, files)
    p["numbers"].write_text(json.dumps(numbers, indent=2) + "\n")
    for name, by_dom in numbers.items():
        say(f"{name}: " + ", ".join(f"{d} CE {x['answer_ce']:.4f} ({x['bits_per_byte']:.3f} bits/byte)"
                                    for d, x in by_dom.items()))  # fmt: skip
    return numbers


def numbers_table(numbers: dict) -> str:
    """A markdown table of `Testbed.numbers`."""
    lines = ["| model | " + " | ".join(f"{d} CE/token | {d} bits/byte" for d in DOMAINS) + " |",
             "|---|" + "---|---|" * len(DOMAINS)]  # fmt: skip
    for name, by_dom in numbers.items():
        cells = " | ".join(f"{by_dom[d]['answer_ce']:.4f} | {by_dom[d]['bits_per_byte']:.4f}" for d in DOMAINS)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="work directory (a rerun resumes)")
    ap.add_argument("--scale", default="full", choices=list(SCALES), help="full: the real testbed; small: a test")
    ap.add_argument("--lock", type=Path, default=None, help="flock this file around every unit of work")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    with flock_guard(args.lock) if args.lock else nullcontext(None) as guard:
        tb = build_testbed(args.work, scale=args.scale, guard=guard)
    print(numbers_table(tb.numbers))
    print(f"units of work: {sum(tb.timings.values()):.0f} s in all; this run {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
