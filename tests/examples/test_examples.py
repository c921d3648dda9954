"""examples/*.py run as a user runs them (a subprocess each) on the tiny model and a real tiny cache, and distil:
the student starts away from the teacher, so the KD term is positive, and every step's loss is finite."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny teacher's architecture and tokenizer with other random weights (a student the KD loss can move)."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("student")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _run(script: str, *args: str, processes: int = 1) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    launch = launch if processes > 1 else []
    cmd = [sys.executable, *launch, str(EXAMPLES / script), *map(str, args)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_every_example_is_short_and_tested():
    for path in sorted(EXAMPLES.glob("*.py")):
        assert len(path.read_text().splitlines()) < 80, f"{path.name} is 80 lines or more"
        assert f'"{path.name}"' in Path(__file__).read_text(), f"{path.name} is not run by a test"


def test_plain_pytorch(student_dir, built_cache):
    out = _run("plain_pytorch.py", "--student", student_dir, "--cache", built_cache, "--steps", "3")
    steps = re.findall(r"step (\d+): loss (\S+) ce (\S+) kd (\S+)", out)
    assert [int(s[0]) for s in steps] == [1, 2, 3]
    assert all(math.isfinite(float(s[1])) and float(s[3]) > 0 for s in steps)


@pytest.mark.parametrize(("processes", "gate"), [(1, False), (2, False), (2, True)])
def test_hf_trainer(student_dir, built_cache, tmp_path, processes, gate):
    """Two processes: Trainer's accelerate dispatches each padded batch and splits it along dim 0 (with the gate,
    each sample's answer_bytes too)."""
    args = ("--student", student_dir, "--cache", built_cache, "--out", tmp_path, "--steps", "3")
    args += ("--kd-gate",) if gate else ()
    out = _run("hf_trainer.py", *args, processes=processes)
    losses = re.findall(r"final loss (\S+) on (\d+) process", out)
    assert len(losses) == processes and all(math.isfinite(float(x)) and int(n) == processes for x, n in losses)


def test_trl_sft(student_dir, built_cache, tmp_path):
    pytest.importorskip("trl")  # the `trl` extra (scripts/setup.sh installs it)
    out = _run("trl_sft.py", "--student", student_dir, "--cache", built_cache, "--out", tmp_path, "--steps", "3")
    assert math.isfinite(float(re.search(r"final loss (\S+)", out).group(1)))
