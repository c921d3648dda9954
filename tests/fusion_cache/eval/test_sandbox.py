"""`fusion_cache.eval.sandbox`: HumanEval's canonical solutions pass, wrong ones fail, and misbehaving programs are
contained (infinite loop, os._exit, exceptions, endless output, stray children, memory, environment, network)."""

from __future__ import annotations

import os
import time

import pytest

from fusion_cache.eval.humaneval import load_problems
from fusion_cache.eval.humaneval import program
from fusion_cache.eval.sandbox import network_isolated
from fusion_cache.eval.sandbox import run_program


@pytest.fixture(scope="module")
def problems():
    return load_problems(5)


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    for p in problems:
        r = run_program(program(p, p["canonical_solution"]))
        assert r.passed and r.status == "passed" and r.returncode == 0, (p["task_id"], r.output)
        wrong = run_program(program(p, "    return None\n"))
        assert not wrong.passed and wrong.status == "failed" and "Error" in wrong.output, p["task_id"]


def test_infinite_loop_times_out_within_the_limit():
    t = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and not r.passed and r.returncode is None
    assert time.perf_counter() - t < 5.0  # killed at the timeout, not at some later limit


def test_early_exit_exceptions_output_and_memory_do_not_pass():
    exit0 = run_program("import os\nos._exit(0)\nraise SystemExit('the tests never ran')\n")
    assert exit0.returncode == 0 and not exit0.passed and exit0.status == "failed"  # no sentinel: tests never ran
    raised = run_program("raise ValueError('boom')\n")
    assert raised.status == "failed" and "ValueError: boom" in raised.output
    t = time.perf_counter()
    huge = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=10.0, max_output_mb=4)
    assert not huge.passed and huge.status == "failed" and "File too large" in huge.output  # EFBIG, not a full disk
    assert time.perf_counter() - t < 10.0 and len(huge.output) <= 2000
    memory = run_program("x = bytearray(2 << 30)\n", memory_mb=512)
    assert not memory.passed and "MemoryError" in memory.output


def test_environment_cwd_and_children_are_contained(tmp_path):
    os.environ["FUSION_CACHE_SECRET_FOR_TEST"] = "leak"
    try:
        r = run_program("import os, sys\nprint(sorted(os.environ), os.getcwd(), sys.flags.isolated)\n")
    finally:
        del os.environ["FUSION_CACHE_SECRET_FOR_TEST"]
    assert r.passed and "FUSION_CACHE_SECRET" not in r.output and "fusion-cache-sandbox-" in r.output
    assert not any(p.name.startswith("fusion-cache-sandbox-") for p in tmp_path.iterdir())
    marker = tmp_path / "child-alive"
    late = f"import time; time.sleep(3); open({str(marker)!r}, 'w').close()"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {late!r}])\n"
    assert run_program(code).passed
    time.sleep(4)
    assert not marker.exists()  # the process group was killed when the program ended


@pytest.mark.skipif(not network_isolated(), reason="unshare -n is not permitted here")
def test_no_network():
    r = run_program("import socket\nsocket.create_connection(('10.255.255.1', 80), timeout=2)\n")
    assert not r.passed and "Network is unreachable" in r.output
