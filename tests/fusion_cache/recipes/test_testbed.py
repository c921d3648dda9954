"""The testbed recipe at its small scale: every step runs, a rerun skips them all, the parts fit together as the
fusion benchmark needs, and the training loop resumes to the same weights."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from contextlib import nullcontext

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fusion_cache.cache.reader import CacheReader
from fusion_cache.errors import ConfigError
from fusion_cache.recipes.testbed import SCALES
from fusion_cache.recipes.testbed import LoopSettings
from fusion_cache.recipes.testbed import build_testbed
from fusion_cache.recipes.testbed import encode_rows
from fusion_cache.recipes.testbed import mixed_ce
from fusion_cache.recipes.testbed import new_model
from fusion_cache.recipes.testbed import train_lm
from fusion_cache.train.stream import DistillStream

SMALL = SCALES["small"]


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    return build_testbed(tmp_path_factory.mktemp("testbed"), scale="small", log=lambda msg: None)


def test_every_part_is_there(testbed):
    assert all(p.exists() for p in testbed.data.values())
    for path in [*testbed.teachers.values(), testbed.student]:
        assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    sizes = {"train": SMALL.data.train, "validation": SMALL.data.validation, "heldout": SMALL.data.heldout}
    for split, by_domain in testbed.caches.items():
        for path in by_domain.values():
            m = CacheReader(str(path)).manifest
            assert (m.stats.rows, m.k, m.codec["name"]) == (sizes[split], SMALL.cache_k, "raw")
    assert set(testbed.numbers) == {"teacher-math", "teacher-code", "student-start"}
    for by_domain in testbed.numbers.values():
        for x in by_domain.values():
            assert math.isfinite(x["answer_ce"]) and x["bits_per_byte"] > 0 and x["samples"] == SMALL.data.heldout // 2
        assert min(x["answer_ce"] for x in by_domain.values()) <= mixed_ce(by_domain)
        assert mixed_ce(by_domain) <= max(x["answer_ce"] for x in by_domain.values())


def test_the_tokenizers_disagree_on_numerals_and_specials(testbed):
    digits, merged = (AutoTokenizer.from_pretrained(testbed.tokenizers[k]) for k in ("digits", "merged"))
    assert not any(sum(c.isdigit() for c in tok) > 1 for tok in digits.get_vocab())  # never two digits in a token
    assert [t for t, _ in digits.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" 683")] == ["Ġ", "6", "8", "3"]
    assert [t for t, _ in merged.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" 683")] == ["Ġ683"]
    assert digits.eos_token != merged.eos_token and digits.pad_token != merged.pad_token
    assert digits.chat_template is None and merged.chat_template is None  # plain text: prompt, blank line, answer


def test_the_student_shares_only_the_code_teachers_tokenizer(testbed):
    student = AutoTokenizer.from_pretrained(testbed.student)
    caches = [str(testbed.caches["train"][d]) for d in ("code", "math")]
    stream = DistillStream(caches, student, chat_template=False, max_length=512)
    assert stream.same_tokenizer == [True, False] and stream.has_ids(0)
    examples = list(stream)
    assert len(examples) == SMALL.data.train
    assert all(e.teachers[0] is not None for e in examples)  # every row has the code teacher's targets


def test_a_rerun_skips_every_step(testbed):
    again = build_testbed(testbed.work_dir, scale="small", log=lambda msg: None)
    assert again.timings == testbed.timings  # no unit of work ran
    assert again.numbers == testbed.numbers


def test_other_settings_are_refused(testbed):
    with pytest.raises(ConfigError, match="other settings"):
        build_testbed(testbed.work_dir, scale="full")
    with pytest.raises(ConfigError, match="scale: unknown value 'huge'"):
        build_testbed(testbed.work_dir, scale="huge")


def test_the_loop_resumes_to_the_same_weights(testbed, tmp_path):
    tok = AutoTokenizer.from_pretrained(testbed.tokenizers["digits"])
    seqs = encode_rows(testbed.data["train"], tok, 512)
    loop = LoopSettings(epochs=2, batch_size=4, lr=1e-3, seed=0)

    def train(out, guard):
        model = new_model(SMALL.student, tok, 0, 512)
        train_lm(out, model, tok, seqs, loop, label="t", guard=guard, record={}, log=lambda msg: None)

    train(tmp_path / "a", lambda name: nullcontext())

    @contextmanager
    def killed_in_epoch_2(name):
        if name == "t epoch 2/2":
            raise KeyboardInterrupt
        yield

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", killed_in_epoch_2)
    assert (tmp_path / "b.incomplete" / "state.pt").exists() and not (tmp_path / "b").exists()
    train(tmp_path / "b", lambda name: nullcontext())
    a, b = (load_file(tmp_path / x / "model.safetensors") for x in ("a", "b"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    history = json.loads((tmp_path / "b" / "testbed.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2] and not (tmp_path / "b.incomplete").exists()
