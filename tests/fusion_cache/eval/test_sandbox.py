"""`fusion_cache.eval.sandbox`: misbehaving programs are contained (infinite loop, os._exit, exceptions, endless
output, memory, environment, stray and detached descendants, the filesystem, privileges, network), and `run_check`'s
verdict is the tests' (HumanEval's own cases: tests/fusion_cache/eval/test_humaneval.py)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from fusion_cache.eval.sandbox import _make_cgroup
from fusion_cache.eval.sandbox import _remove_cgroup
from fusion_cache.eval.sandbox import isolation
from fusion_cache.eval.sandbox import network_isolated
from fusion_cache.eval.sandbox import run_check
from fusion_cache.eval.sandbox import run_program

FS = pytest.mark.skipif(not isolation().get("filesystem"), reason="no mount namespace here (the fallback)")


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


def test_environment_and_cwd_are_contained():
    os.environ["FUSION_CACHE_SECRET_FOR_TEST"] = "leak"
    try:
        r = run_program("import os, sys\nprint(sorted(os.environ), os.getcwd(), sys.flags.isolated)\n")
    finally:
        del os.environ["FUSION_CACHE_SECRET_FOR_TEST"]
    assert r.passed and "FUSION_CACHE_SECRET" not in r.output and "fusion-cache-sandbox-" in r.output


def _alive(token: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if token.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    found.append(int(pid))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("namespaces", [True, False], ids=["jail", "fallback"])
@pytest.mark.parametrize("detach", [False, True], ids=["child", "setsid grandchild"])
def test_every_descendant_dies_with_the_program(detach, namespaces):
    token = f"fusion-cache-test-{secrets.token_hex(6)}"
    late = f"import time; time.sleep(30)  # {token}"
    code = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {late!r}], start_new_session={detach})\n"  # a new session escapes
        "import time; time.sleep(0.5)\n"  # a process-group kill; not a PID namespace or a subreaper
    )
    r = run_program(code, namespaces=namespaces)
    assert r.passed, r.output
    cgroup = " + cgroup" if _make_cgroup_here() else ""
    jail = "pid namespace" if namespaces and isolation()["namespaces"] else "subreaper"
    assert r.isolation["descendants"] == jail + cgroup
    time.sleep(0.2)
    assert not _alive(token)
    r = run_program(code + "while True:\n    pass\n", timeout=2.0, namespaces=namespaces)  # and on a timeout
    assert r.status == "timeout"
    time.sleep(0.2)
    assert not _alive(token)


def _make_cgroup_here() -> bool:
    path = _make_cgroup()
    if path:
        _remove_cgroup(path)
    return path is not None


@pytest.mark.skipif(not _make_cgroup_here(), reason="no cgroup v2 child can be made here (docs/eval.md)")
def test_a_cgroup_kill_reaches_a_setsid_grandchild_of_an_exited_parent():
    # no subreaper, no PID namespace: the grandchild is an orphan in its own session; only the cgroup holds it
    token = f"fusion-cache-test-{secrets.token_hex(6)}"
    path = _make_cgroup()
    late = f"import time; time.sleep(30)  # {token}"
    parent = (
        f"import subprocess, sys; open({path + '/cgroup.procs'!r}, 'w').write('0'); "
        f"subprocess.Popen([sys.executable, '-c', {late!r}], start_new_session=True)"
    )
    try:
        subprocess.run([sys.executable, "-c", parent], check=True, timeout=20)
        time.sleep(0.2)
        assert _alive(token)  # the parent exited; the grandchild lives on
        _remove_cgroup(path)
        time.sleep(0.1)
        assert not _alive(token) and not os.path.exists(path)
    finally:
        _remove_cgroup(path)


def test_the_program_runs_unprivileged():
    r = run_program("import os\nprint('uid', os.getuid(), 'euid', os.geteuid())\nos.setuid(0)\n")
    # root's programs run as nobody; another user's as that user (in a user namespace: the identity map, no
    # capabilities), where uid 0 is not even mapped (EINVAL rather than EPERM)
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    assert f"uid {uid} euid {uid}" in r.output, r.output
    assert not r.passed and ("PermissionError" in r.output or "Invalid argument" in r.output), r.output
    assert r.isolation["unprivileged"] or os.geteuid() != 0


@FS
def test_only_the_work_directory_is_writable_and_the_host_is_not_visible(tmp_path):
    probe = tmp_path / "written-by-the-sandbox"
    # the interpreter's own directories are bound in (e.g. a pyenv install under /root); nothing else is
    hidden = [
        p for p in ("/root", "/home", "/work", "/var", "/opt", str(tmp_path)) if not sys.base_prefix.startswith(p)
    ]
    code = (
        "import os\n"
        "open('mine.txt', 'w').write('ok')\n"  # its own directory: fine
        f"for path in ({str(probe)!r}, '/tmp/x', '/usr/x', '/x'):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, e.errno)\n"
        f"print('host', [p for p in {hidden!r} if os.path.exists(p)])\n"
    )
    r = run_program(code)
    assert r.passed and "WROTE" not in r.output and r.output.count("refused") == 4, r.output
    assert not probe.exists()
    assert "host []" in r.output  # nothing of the host but the interpreter's directories


def test_run_check_verdict_is_the_tests():
    test = "def check(f):\n    assert f(2) == 3\n    assert f(-1) == 0\n"
    assert run_check("def inc(x):\n    return x + 1\n", test, "inc").passed
    wrong = run_check("def inc(x):\n    return x\n", test, "inc")
    assert not wrong.passed and "AssertionError" in wrong.output
    # a value that is not plain data cannot reach the tests (an object equal to everything)
    cheat = "class A:\n    def __eq__(self, o):\n        return True\ndef inc(x):\n    return A()\n"
    r = run_check(cheat, test, "inc")
    assert not r.passed and "plain data" in r.output
    # plain containers, exceptions and prints pass through as they would in one process
    tuples = "def f(x):\n    print('noise')\n    return (x, {x: [x]}, {x}, b'x', 1.5, None)\n"
    assert run_check(tuples, "def check(f):\n    assert f(1) == (1, {1: [1]}, {1}, b'x', 1.5, None)\n", "f").passed
    raises = "def f(x):\n    raise ValueError('no')\n"
    t = "def check(f):\n    try:\n        f(1)\n    except ValueError:\n        return\n    assert False\n"
    assert run_check(raises, t, "f").passed
    slow = run_check("def f(x):\n    while True:\n        pass\n", test, "f", timeout=1.0)
    assert slow.status == "timeout"


@pytest.mark.skipif(not network_isolated(), reason="no network namespace here")
def test_no_network():
    r = run_program("import socket\nsocket.create_connection(('10.255.255.1', 80), timeout=2)\n")
    assert not r.passed and "Network is unreachable" in r.output
