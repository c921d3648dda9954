"""Run one generated Python program in a fresh, limited subprocess and say whether it passed.

    from fusion_cache.eval.sandbox import run_program
    run_program("assert 1 + 1 == 2\\n", timeout=5.0)  # ProgramResult(passed=True, status="passed", ...)

HumanEval's own ``execution`` module is disabled by default and runs the programs in ``multiprocessing`` children
of the evaluating process (which would inherit the model, its threads and its environment). Here every program
runs in a new ``python -I -S`` interpreter (isolated mode: no site-packages, no PYTHON* variables, script dir not on
sys.path) with:

- a temporary working directory that is deleted afterwards, and an environment of PATH/LANG only;
- resource limits set in the child before exec: address space (``RLIMIT_AS``), CPU seconds, file size (stdout
  and stderr are files: a program that prints without end gets EFBIG from its writes instead of filling the
  disk), no core files;
- its own session and process group, killed as a whole on timeout and after every run (no stray grandchildren);
- no network, where the kernel lets ``unshare -n`` give the child an empty network namespace (root, or user
  namespaces enabled); elsewhere the network is not blocked (`network_isolated` says which).

Passing means: the interpreter exited with status 0 *and* printed the run's sentinel after the tests, so a
program that calls ``os._exit(0)`` before its tests ran does not pass. This limits accidents of generated code; it
is not a security boundary against code written to escape (run untrusted models in a container or VM).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

try:  # POSIX only; on other platforms the limits are skipped
    import resource
except ImportError:  # pragma: no cover
    resource = None

_OUTPUT_TAIL = 2000  # characters of stdout/stderr kept in the result


@dataclass(frozen=True)
class ProgramResult:
    """The outcome of one program.

    Attributes:
        passed: exit status 0 and the sentinel printed after the program's last line.
        status: "passed", "failed" (non-zero exit or no sentinel: an exception, MemoryError past the memory limit,
            EFBIG past the output limit, an early exit), "timeout", or "killed:<signal>" (e.g. SIGXCPU).
        returncode: the interpreter's exit status (negative: the signal that ended it); None on timeout.
        seconds: wall time of the run.
        output: the last characters of the program's stdout and stderr (for debugging a failure).
    """

    passed: bool
    status: str
    returncode: int | None
    seconds: float
    output: str


@functools.cache
def network_isolated() -> bool:
    """Whether programs run without network: ``unshare -n`` works on this machine (probed once)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        return subprocess.run([exe, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _limits(memory_bytes: int, cpu_seconds: int, file_bytes: int):
    """The child's preexec_fn: resource limits, set after fork and before exec (never in the parent)."""

    def apply() -> None:
        if resource is None:  # pragma: no cover
            return
        for name, value in (
            ("RLIMIT_AS", memory_bytes),
            ("RLIMIT_CPU", cpu_seconds),
            ("RLIMIT_FSIZE", file_bytes),
            ("RLIMIT_CORE", 0),
        ):
            limit = getattr(resource, name, None)
            if limit is None:
                continue
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass  # a hard limit below ours already applies

    return apply


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str) -> str:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - 4 * _OUTPUT_TAIL))
            return f.read().decode("utf-8", "replace")[-_OUTPUT_TAIL:]
    except OSError:
        return ""


def run_program(
    source: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    max_output_mb: int = 16,
    python: str | None = None,
) -> ProgramResult:
    """Execute ``source`` in a fresh isolated interpreter with limits (see the module docstring).

    Args:
        source: the whole program (for HumanEval: prompt + completion + tests + ``check(entry_point)``).
        timeout: wall-clock seconds before the process group is killed (CPU time is limited to this, rounded up,
            plus one second).
        memory_mb: address-space limit of the interpreter.
        max_output_mb: largest file (stdout and stderr are files) the program may write.
        python: the interpreter (default: this one, ``sys.executable``).
    """
    sentinel = f"__fusion_cache_done_{secrets.token_hex(8)}__"
    program = f"{source}\n\nprint({sentinel!r}, flush=True)\n"
    workdir = tempfile.mkdtemp(prefix="fusion-cache-sandbox-")
    try:
        script = os.path.join(workdir, "program.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(program)
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        cmd = [python or sys.executable, "-I", "-S", "-B", script]  # -S: stdlib only, no .pth files run
        if network_isolated():
            cmd = [shutil.which("unshare") or "unshare", "-n", *cmd]  # unshare execs python: same pid
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        limits = _limits(memory_mb << 20, int(timeout) + 1, max_output_mb << 20)
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: killpg reaches everything it started
                preexec_fn=limits,
                close_fds=True,
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc.pid)  # also after a normal exit: children it left behind
                proc.wait()
        seconds = time.perf_counter() - t0
        stdout = _tail(out_path)
        output = (stdout + "\n" + _tail(err_path)).strip()[-_OUTPUT_TAIL:]
        if code is None:
            return ProgramResult(False, "timeout", None, seconds, output)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return ProgramResult(False, f"killed:{name}", code, seconds, output)
        passed = code == 0 and sentinel in stdout
        return ProgramResult(passed, "passed" if passed else "failed", code, seconds, output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
