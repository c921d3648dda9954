"""Run generated Python programs in a fresh, limited subprocess jail, and judge HumanEval answers in a way the
program cannot forge.

    from fusion_cache.eval.sandbox import run_check, run_program
    run_program("assert 1 + 1 == 2\\n", timeout=5.0)   # ProgramResult(passed=True, status="passed", ...)
    run_check("def f(x):\\n    return x + 1\\n", "def check(c):\\n    assert c(1) == 2\\n", "f")  # passed: tests ran

Every program runs in a new ``python -I -S`` interpreter (isolated mode: no site-packages, no PYTHON* variables) as
the last process of a jail set up by this module run as a script (`_jail_main`, stdlib only). What holds depends on
the kernel; `isolation` says what held here (docs/eval.md, "The sandbox", states it for each case):

- namespaces (Linux, root or user namespaces enabled): new PID, mount, network, IPC and UTS namespaces. The jail's
  init (pid 1, trusted code) waits for the program, kills every process left in the namespace when it ends or times
  out (a ``setsid`` grandchild included: the kernel kills a PID namespace with its init), and the program sees a
  filesystem of read-only binds of the interpreter's directories (``/usr``, the Python prefix, ``/dev/null``...)
  and a fresh ``/proc``, where only its temporary directory is writable; nothing else of the host (no ``/home``,
  ``/root``, ``/work``, ``/tmp``). No network (an empty namespace: not even loopback). Unprivileged: started as root
  it runs as uid/gid 65534 (nobody) with no groups; started as another user, as that user inside a user namespace
  with every capability dropped (bounding set cleared). ``no_new_privs`` is set either way.
- fallback (no namespaces): the jail's supervisor is a child subreaper that kills every descendant (orphans are
  reparented to it) when the program ends or times out; started as root the program still runs as nobody when the
  interpreter is reachable for it. The filesystem is the host's (writable wherever the uid may write, e.g. /tmp)
  and the network is open. A program started as a non-root user can signal its supervisors (same uid).

Where this process may make a cgroup v2 child (root, or a delegated subtree), every jail also runs in its own
cgroup, made and removed by the parent: ``cgroup.kill`` ends every process of the jail whatever session, process
group or parent it moved to, also when the supervisors were killed first (``descendants`` ends in "+ cgroup").

Always: resource limits set before exec (address space ``RLIMIT_AS``, CPU seconds, file size: stdout and stderr are
files, so a program that prints without end gets EFBIG; no core files), a temporary working directory deleted
afterwards, an environment of PATH/LANG/HOME/TMPDIR only, a wall-clock timeout.

Verdicts. `run_program` passes a program that exits with status 0 and printed the run's sentinel after its last
line: that catches an accidental early ``os._exit(0)``, but the sentinel is in the program's own source, so a
program written to cheat can print it. `run_check` (what HumanEval uses) cannot be forged: the candidate runs in the
jail and only answers calls, over a pipe, with plain data (None, bool, int, float, str, bytes, complex and lists,
tuples, dicts, sets of them); the tests run in a separate trusted process (`_RUNNER`), which calls the candidate
through a proxy, compares the plain values itself, and whose exit status is the verdict. The candidate cannot reach
that process (another uid or PID namespace), and nothing it returns can make a comparison lie.

This contains programs written to misbehave as far as the kernel features above allow; it is not a substitute for a
VM when running models trained to attack their evaluator.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import secrets
import shutil
import signal
import stat
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
NOBODY = 65534  # uid and gid a program started by root runs as
_HERE = os.path.abspath(__file__)


@dataclass(frozen=True)
class ProgramResult:
    """The outcome of one program.

    Attributes:
        passed: the verdict (`run_program`: exit status 0 and the sentinel; `run_check`: the trusted runner's).
        status: "passed", "failed" (non-zero exit or no sentinel: an exception, MemoryError past the memory limit,
            EFBIG past the output limit, an early exit, a failed test), "timeout", or "killed:<signal>".
        returncode: the interpreter's exit status (negative: the signal that ended it); None on timeout.
        seconds: wall time of the run.
        output: the last characters of the program's stdout and stderr (for debugging a failure).
        isolation: what held for this run (`isolation`'s keys), None when the jail did not report.
    """

    passed: bool
    status: str
    returncode: int | None
    seconds: float
    output: str
    isolation: dict | None = None


# ------------------------------------------------------------------------------------------------ the jail
# Linux constants (sched.h, mount.h, prctl.h, capability.h)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = (
    24,
    36,
    38,
    47,
    4,
)
_RO_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")  # what an interpreter needs
_RO_FILES = ("/etc/ld.so.cache",)
_DEVICES = ("null", "zero", "urandom", "random")


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = lambda v: v.encode() if isinstance(v, str) else v  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _locked_flags(path: str) -> int:
    """The nosuid/nodev/noexec flags a bind of ``path`` must keep (a user namespace may not clear them)."""
    f = os.statvfs(path).f_flag
    return (
        (MS_NOSUID if f & os.ST_NOSUID else 0)
        | (MS_NODEV if f & os.ST_NODEV else 0)
        | (MS_NOEXEC if f & os.ST_NOEXEC else 0)
    )


def _bind(libc, source: str, root: str, *, writable: bool = False) -> None:
    """Bind ``source`` at the same path under ``root``, read-only unless ``writable``; a symbolic link is copied."""
    target = root + source
    if os.path.islink(source):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.readlink(source), target)
        return
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()  # noqa: SIM115 - a mount point
    _mount(libc, source, target, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | _locked_flags(target) | (0 if writable else MS_RDONLY)
    _mount(libc, None, target, None, flags)


def _build_root(libc, spec: dict) -> None:
    """The program's filesystem (namespace mode): read-only binds of what the interpreter needs, its work dir
    writable, a fresh /proc; then chroot into it."""
    root = spec["root"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in [*_RO_DIRS, *spec["python_dirs"]]:
        if os.path.lexists(path) and not any(path.startswith(d + "/") for d in _RO_DIRS if os.path.isdir(d)):
            _bind(libc, path, root)
    for path in _RO_FILES:
        if os.path.isfile(path):
            _bind(libc, path, root)
    os.makedirs(root + "/dev", exist_ok=True)
    for name in _DEVICES:
        if os.path.exists(f"/dev/{name}"):
            target = f"{root}/dev/{name}"
            open(target, "w").close()  # noqa: SIM115 - a mount point
            _mount(libc, f"/dev/{name}", target, None, MS_BIND)
    _bind(libc, spec["workdir"], root, writable=True)
    os.makedirs(root + "/proc", exist_ok=True)
    _mount(libc, "proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(libc, None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)


def _reachable_by_nobody(path: str) -> bool:
    """Whether uid nobody can execute ``path`` (every directory on the way searchable by others)."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts)):
        if not os.stat("/".join(parts[:i])).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def _drop_privileges(libc, spec: dict, userns: bool, to_nobody: bool) -> None:
    """In the program's process, before exec: no groups and uid nobody (started as root), or every capability
    dropped (a user namespace); no_new_privs either way."""
    if to_nobody:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    elif userns:
        last = (
            int(open("/proc/sys/kernel/cap_last_cap").read()) if os.path.exists("/proc/sys/kernel/cap_last_cap") else 40
        )
        for cap in range(last + 1):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _limits(spec: dict) -> None:
    if resource is None:  # pragma: no cover
        return
    for name, value in (
        ("RLIMIT_AS", spec["memory_bytes"]),
        ("RLIMIT_CPU", spec["cpu_seconds"]),
        ("RLIMIT_FSIZE", spec["file_bytes"]),
        ("RLIMIT_CORE", 0),
    ):
        limit = getattr(resource, name, None)
        if limit is not None:
            with contextlib.suppress(ValueError, OSError):  # a hard limit below ours already applies
                resource.setrlimit(limit, (value, value))


class _Timeout(Exception):
    pass


def _children() -> list[int]:
    """This process's children (as a subreaper, also the orphans of its descendants)."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            out += [int(p) for p in open(f"/proc/self/task/{tid}/children").read().split()]
    return out


def _kill_descendants(namespace: bool) -> None:
    """Kill every process below this one: the whole PID namespace from its init, else each child (the subreaper's
    orphans included) until none is left."""
    if namespace and os.getpid() == 1:  # (never elsewhere: -1 would be every process of the uid)
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)  # from a namespace's init: every process in the namespace but itself
    for _ in range(1000):
        kids = _children()
        if not kids:
            break
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in kids:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _init_main(libc, spec: dict, namespace: bool, userns: bool, status_fd: int) -> int:
    """The jail's supervisor (pid 1 of the namespaces, or a subreaper): set up, run the program, reap, report."""
    report = {"namespaces": namespace, "filesystem": False, "network": namespace, "unprivileged": userns}
    if namespace:
        try:
            _build_root(libc, spec)
            report["filesystem"] = True
        except OSError as e:
            report["filesystem_error"] = str(e)
            if spec["require_filesystem"]:
                os.write(status_fd, (json.dumps({"isolation": report, "setup_failed": str(e)}) + "\n").encode())
                return 125
    else:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    root = os.geteuid() == 0 and not userns
    to_nobody = root and (report["filesystem"] or _reachable_by_nobody(spec["argv"][0]))
    report["unprivileged"] = report["unprivileged"] or to_nobody
    report["descendants"] = "pid namespace" if namespace else "subreaper"
    if spec.get("in_cgroup"):
        report["descendants"] += " + cgroup"
    os.write(status_fd, (json.dumps({"isolation": report}) + "\n").encode())
    pid = os.fork()
    if pid == 0:  # the program
        try:
            os.close(status_fd)
            os.chdir(spec["workdir"])
            _drop_privileges(libc, spec, userns, to_nobody)
            _limits(spec)
            os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except BaseException as e:  # noqa: BLE001 - report anything and never return into the supervisor
            os.write(2, f"sandbox: cannot start the program: {e}\n".encode())
        os._exit(127)

    def alarm(*_):
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, spec["timeout"])
    result = {"timeout": True}
    try:
        while True:
            done, status = os.waitpid(-1, 0)  # reap everything; the program's end is what counts
            if done == pid:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if os.WIFSIGNALED(status):
                    result = {"signal": os.WTERMSIG(status)}
                else:
                    result = {"exit": os.WEXITSTATUS(status)}
                break
    except _Timeout:
        pass
    _kill_descendants(namespace)
    os.write(status_fd, (json.dumps(result) + "\n").encode())
    return 0


def _jail_main(spec: dict) -> int:
    """Entry of ``python sandbox.py --jail SPEC``: enter new namespaces when the kernel allows, fork the supervisor
    (pid 1 of the new PID namespace) and wait for it."""
    libc = _libc()
    status_fd = spec["status_fd"]
    spec["in_cgroup"] = _join_cgroup(spec.get("cgroup"))  # before any fork: every descendant is in it
    uid, gid = os.geteuid(), os.getegid()
    userns = uid != 0
    flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWUSER if userns else 0)
    namespace = spec["namespaces"] and libc.unshare(flags) == 0
    if namespace and userns:
        try:
            # the identity map: inside, the program is the same non-zero uid, so exec drops every capability the
            # namespace gave (a map to uid 0 would make it root of the namespace, able to setuid(0) and more)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError:
            namespace = False  # a namespace without a mapping is of no use: continue as the fallback would
    if not namespace:
        userns = False
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _init_main(libc, spec, namespace, userns, status_fd)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if not namespace:
        _kill_descendants(False)  # orphans of a supervisor that was killed
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


# ------------------------------------------------------------------------------------------------ the cgroup
# A cgroup v2 child per jail, made and removed by the parent (trusted, and outliving every process of the jail):
# ``cgroup.kill`` (Linux 5.14+) kills every process in it at once, wherever it moved to (a new session, a new
# process group, orphaned), and a process cannot leave a cgroup without write access to another one's
# ``cgroup.procs`` (root's files; the program runs as nobody, or without capabilities in a user namespace, and in
# the namespace jail /sys is not even visible).


def _cgroup2_base() -> str | None:
    """The directory of this process's cgroup v2 (``0::/path`` in /proc/self/cgroup under a cgroup2 mount, the
    unified hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified), or None without one."""
    try:
        own = next(line[3:].strip() for line in open("/proc/self/cgroup") if line.startswith("0::"))
        mounts = [line.split() for line in open("/proc/self/mounts")]
    except (OSError, StopIteration):
        return None
    for fields in mounts:
        if len(fields) > 2 and fields[2] == "cgroup2":
            base = os.path.join(fields[1], own.lstrip("/"))
            if os.path.exists(os.path.join(base, "cgroup.procs")):
                return base
    return None


def _make_cgroup() -> str | None:
    """A new cgroup v2 child with ``cgroup.kill``, or None where this process may not make one (no cgroup2 mount,
    no write access to it, a kernel before 5.14): the jail then relies on the PID namespace or the subreaper."""
    base = _cgroup2_base()
    if base is None:
        return None
    path = os.path.join(base, f"fusion-cache-jail-{secrets.token_hex(6)}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    if not os.path.exists(os.path.join(path, "cgroup.kill")):
        _remove_cgroup(path)
        return None
    return path


def _join_cgroup(path: str | None) -> bool:
    """Move this process (and so everything it forks) into the jail's cgroup; False where that is refused."""
    if not path:
        return False
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")  # "0": the writing process
        return True
    except OSError:
        return False


def _kill_cgroup(path: str) -> None:
    """Kill every process in the cgroup and wait (up to 2 s) until it is empty."""
    with contextlib.suppress(OSError):
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    for _ in range(200):
        try:
            if "populated 0" in open(os.path.join(path, "cgroup.events")).read():
                return
        except OSError:
            return
        time.sleep(0.01)


def _remove_cgroup(path: str) -> None:
    _kill_cgroup(path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


# ------------------------------------------------------------------------------------------------ the parent side
def _python_dirs(python: str) -> list[str]:
    """Directories the interpreter needs besides the system ones: its own and its prefix (e.g. a pyenv install)."""
    real = os.path.realpath(python)
    dirs = {os.path.dirname(real), sys.base_prefix}
    return sorted(d for d in dirs if d and d != "/")


@dataclass
class _Jail:
    """A started jail: its process, its status pipe and its files."""

    proc: subprocess.Popen
    status_r: int
    workdir: str
    root: str
    t0: float
    cgroup: str | None = None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.cgroup:  # every process of the jail, a ``setsid`` descendant included
            _kill_cgroup(self.cgroup)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def status(self) -> tuple[dict | None, dict | None]:
        """(isolation report, final status) as the supervisor wrote them."""
        data = b""
        os.set_blocking(self.status_r, False)
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self.status_r, 65536):
                data += chunk
        os.close(self.status_r)
        report = final = None
        for line in data.decode("utf-8", "replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                doc = json.loads(line)
                if "isolation" in doc:
                    report = doc["isolation"]
                else:
                    final = doc
        return report, final

    def cleanup(self) -> None:
        if self.cgroup:
            _remove_cgroup(self.cgroup)
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.root)


def _start_jail(
    argv_tail: list[str],
    workdir: str,
    *,
    timeout: float,
    memory_mb: int,
    max_output_mb: int,
    python: str | None,
    stdin=subprocess.DEVNULL,
    pass_fds: tuple[int, ...] = (),
    namespaces: bool = True,
) -> _Jail:
    """Start ``python -I -S -B <argv_tail>`` in a jail over ``workdir`` (stdout and stderr go to files there)."""
    python = os.path.realpath(python or sys.executable)
    root = tempfile.mkdtemp(prefix="fusion-cache-jail-")
    if os.geteuid() == 0:
        os.chown(workdir, NOBODY, NOBODY)  # the program's uid must be able to write it
    status_r, status_w = os.pipe()
    cgroup = _make_cgroup()
    spec = {
        "cgroup": cgroup,
        "workdir": workdir,
        "root": root,
        "argv": [python, "-I", "-S", "-B", *argv_tail],
        "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir},
        "python_dirs": _python_dirs(python),
        "timeout": timeout + 0.5,  # the supervisor's own limit, just after the parent's
        "memory_bytes": memory_mb << 20,
        "cpu_seconds": int(timeout) + 1,
        "file_bytes": max_output_mb << 20,
        "status_fd": status_w,
        "namespaces": namespaces,
        "require_filesystem": False,
    }
    out = open(os.path.join(workdir, "stdout"), "wb")  # noqa: SIM115 - closed below
    err = open(os.path.join(workdir, "stderr"), "wb")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", _HERE, "--jail", json.dumps(spec)],
            stdin=stdin,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group: the parent's killpg reaches the supervisors
            pass_fds=(status_w, *pass_fds),
            close_fds=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
    except BaseException:
        if cgroup:
            _remove_cgroup(cgroup)
        raise
    finally:
        out.close()
        err.close()
        os.close(status_w)
    return _Jail(proc, status_r, workdir, root, time.perf_counter(), cgroup)


def _tail(path: str) -> str:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - 4 * _OUTPUT_TAIL))
            return f.read().decode("utf-8", "replace")[-_OUTPUT_TAIL:]
    except OSError:
        return ""


def _verdict(final: dict | None, code: int | None) -> tuple[str, int | None]:
    """(status, returncode) of a jailed program from its supervisor's final report."""
    if final is None or code is None or final.get("timeout"):
        return "timeout", None
    if "signal" in final:
        sig = int(final["signal"])
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed:{name}", -sig
    return "exited", int(final.get("exit", 1))


@functools.cache
def isolation() -> dict:
    """What the jail achieves on this machine (probed once with a trivial program): ``namespaces`` (PID, mount,
    network, IPC, UTS), ``filesystem`` (the read-only view with only the work directory writable), ``network``
    (none), ``unprivileged`` (uid nobody, or no capabilities in a user namespace), ``descendants`` ("pid
    namespace" or "subreaper", plus " + cgroup" where a cgroup v2 child holds the jail)."""
    r = run_program("pass\n", timeout=20.0)
    return r.isolation or {"namespaces": False, "filesystem": False, "network": False, "unprivileged": False}


def network_isolated() -> bool:
    """Whether programs run without network (an empty network namespace)."""
    return bool(isolation().get("network"))


def run_program(
    source: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    max_output_mb: int = 16,
    python: str | None = None,
    namespaces: bool = True,
) -> ProgramResult:
    """Execute ``source`` in the jail with limits (module docstring); passed: exit status 0 and the sentinel printed
    after the program's last line (an accidental early exit fails; see `run_check` for a verdict that cannot be
    forged).

    Args:
        source: the whole program.
        timeout: wall-clock seconds before every process of the jail is killed (CPU time is limited to this,
            rounded up, plus one second).
        memory_mb: address-space limit of the interpreter.
        max_output_mb: largest file (stdout and stderr are files) the program may write.
        python: the interpreter (default: this one, ``sys.executable``).
        namespaces: False runs the fallback jail even where namespaces are allowed (to test it).
    """
    sentinel = f"__fusion_cache_done_{secrets.token_hex(8)}__"
    workdir = tempfile.mkdtemp(prefix="fusion-cache-sandbox-")
    with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
        f.write(f"{source}\n\nprint({sentinel!r}, flush=True)\n")
    os.chmod(workdir, 0o755)
    jail = _start_jail([os.path.join(workdir, "program.py")], workdir, timeout=timeout, memory_mb=memory_mb,
                       max_output_mb=max_output_mb, python=python, namespaces=namespaces)  # fmt: skip
    try:
        code = jail.wait(timeout + 2.0)  # the supervisor enforces ``timeout``; this is the backstop
        jail.kill()  # the jail's processes, whatever is left of them
        report, final = jail.status()
        seconds = time.perf_counter() - jail.t0
        stdout = _tail(os.path.join(workdir, "stdout"))
        output = (stdout + "\n" + _tail(os.path.join(workdir, "stderr"))).strip()[-_OUTPUT_TAIL:]
        status, rc = _verdict(final, code)
        if status != "exited":
            return ProgramResult(False, status, rc, seconds, output, report)
        passed = rc == 0 and sentinel in stdout
        return ProgramResult(passed, "passed" if passed else "failed", rc, seconds, output, report)
    finally:
        jail.cleanup()


# ------------------------------------------------------------------------------------------------ run_check
# Plain data across the pipe between the candidate and the tests: JSON, with lists as arrays and every other
# container tagged; anything else is refused (the candidate's value cannot carry behaviour into the test process).
_CODEC = r"""
import base64 as _b64

def _enc(v, depth=0):
    if depth > 200:
        raise TypeError("value nested too deeply")
    t = type(v)
    if v is None or t in (bool, int, float, str):
        return v
    if t is list:
        return [_enc(x, depth + 1) for x in v]
    if t is tuple:
        return {"t": [_enc(x, depth + 1) for x in v]}
    if t is dict:
        return {"d": [[_enc(k, depth + 1), _enc(x, depth + 1)] for k, x in v.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "f": [_enc(x, depth + 1) for x in v]}
    if t is bytes:
        return {"b": _b64.b64encode(v).decode()}
    if t is complex:
        return {"c": [v.real, v.imag]}
    raise TypeError(f"a value of type {t.__name__} cannot be returned (plain data only)")

def _dec(v, depth=0):
    if depth > 200:
        raise ValueError("value nested too deeply")
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is list:
        return [_dec(x, depth + 1) for x in v]
    if type(v) is dict and len(v) == 1:
        (tag, x), = v.items()
        if tag == "t" and type(x) is list:
            return tuple(_dec(y, depth + 1) for y in x)
        if tag == "d" and type(x) is list and all(type(p) is list and len(p) == 2 for p in x):
            return {_dec(a, depth + 1): _dec(b, depth + 1) for a, b in x}
        if tag in ("s", "f") and type(x) is list:
            items = [_dec(y, depth + 1) for y in x]
            return set(items) if tag == "s" else frozenset(items)
        if tag == "b" and type(x) is str:
            return _b64.b64decode(x, validate=True)
        if tag == "c" and type(x) is list and len(x) == 2 and all(type(y) in (int, float) for y in x):
            return complex(x[0], x[1])
    raise ValueError("not a plain value")
"""

# The candidate's side, in the jail: define the candidate, then answer calls (one JSON line each way).
_HOST = (
    _CODEC
    + r"""
import json, os, sys
_resp = os.fdopen(int(sys.argv[1]), "w")
_entry = sys.argv[2]
_ns = {"__name__": "__main__"}
with open("candidate.py", encoding="utf-8") as _f:
    exec(compile(_f.read(), "candidate.py", "exec"), _ns)
_fn = _ns[_entry]
for _line in sys.stdin:
    _args, _kwargs = _dec(json.loads(_line))
    try:
        _out = {"value": _enc(_fn(*_args, **_kwargs))}
    except BaseException as _e:
        _out = {"error": type(_e).__name__, "message": str(_e)[:500]}
    _resp.write(json.dumps(_out) + "\n")
    _resp.flush()
"""
)

# The tests' side, trusted: the prompt's helpers, a proxy for the candidate, the tests; its exit status is the verdict.
_RUNNER = (
    _CODEC
    + r"""
import builtins, json, os, sys
_req = os.fdopen(int(sys.argv[1]), "w")
_resp = os.fdopen(int(sys.argv[2]), "r")
with open(sys.argv[3], encoding="utf-8") as _f:
    _spec = json.load(_f)

def _candidate(*args, **kwargs):
    _req.write(json.dumps(_enc([list(args), kwargs])) + "\n")
    _req.flush()
    line = _resp.readline(64 << 20)
    if not line.endswith("\n"):
        raise RuntimeError("the candidate gave no answer (it crashed, exited or answered too much)")
    out = json.loads(line)
    if type(out) is not dict:
        raise RuntimeError("the candidate's answer is not an object")
    if "error" in out:
        cls = getattr(builtins, str(out.get("error")), None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            cls = RuntimeError
        raise cls(str(out.get("message")))
    return _dec(out.get("value"))

_ns = {"__name__": "__main__"}
exec(compile(_spec["prelude"], "prompt.py", "exec"), _ns)
_ns[_spec["entry_point"]] = _candidate  # tests may name the function itself (HumanEval/33), as in one program
exec(compile(_spec["test"], "test.py", "exec"), _ns)
_ns[_spec.get("check", "check")](_candidate)
"""
)


def run_check(
    candidate: str,
    test: str,
    entry_point: str,
    *,
    prelude: str = "",
    timeout: float = 5.0,
    memory_mb: int = 1024,
    max_output_mb: int = 16,
    python: str | None = None,
) -> ProgramResult:
    """Run ``test``'s ``check(candidate)`` against the function ``entry_point`` that ``candidate`` defines, with a
    verdict the candidate cannot forge (module docstring).

    Args:
        candidate: the untrusted source (for HumanEval: prompt + completion); runs in the jail, answering calls.
        test: trusted source defining ``check(candidate)`` (HumanEval's tests); runs outside the jail.
        entry_point: the function of ``candidate`` the tests call.
        prelude: trusted source run before ``test`` in the tests' process (HumanEval: the prompt, whose helpers
            such as ``poly`` the tests use).
        timeout, memory_mb, max_output_mb, python: as for `run_program` (the limits apply to both processes).

    Returns:
        passed when the tests' process exited with status 0; its output ends with the tests' traceback.
    """
    workdir = tempfile.mkdtemp(prefix="fusion-cache-sandbox-")
    trusted = tempfile.mkdtemp(prefix="fusion-cache-tests-")  # 0700: out of the candidate's reach
    with open(os.path.join(workdir, "candidate.py"), "w", encoding="utf-8") as f:
        f.write(candidate)
    with open(os.path.join(workdir, "host.py"), "w", encoding="utf-8") as f:
        f.write(_HOST)
    os.chmod(workdir, 0o755)
    runner = os.path.join(trusted, "runner.py")
    with open(runner, "w", encoding="utf-8") as f:
        f.write(_RUNNER)
    with open(os.path.join(trusted, "spec.json"), "w", encoding="utf-8") as f:
        json.dump({"prelude": prelude, "test": test, "entry_point": entry_point}, f)
    req_r, req_w = os.pipe()  # tests -> candidate
    resp_r, resp_w = os.pipe()  # candidate -> tests
    t0 = time.perf_counter()
    jail = None
    tests = None
    try:
        jail = _start_jail([os.path.join(workdir, "host.py"), str(resp_w), entry_point], workdir, timeout=timeout,
                           memory_mb=memory_mb, max_output_mb=max_output_mb, python=python, stdin=req_r,
                           pass_fds=(resp_w,))  # fmt: skip
        os.close(req_r)
        os.close(resp_w)
        req_r = resp_w = -1
        limits = {"memory_bytes": memory_mb << 20, "cpu_seconds": int(timeout) + 1, "file_bytes": max_output_mb << 20}
        with open(os.path.join(trusted, "out"), "wb") as out:
            tests = subprocess.Popen(
                [os.path.realpath(python or sys.executable), "-I", "-S", "-B", runner, str(req_w), str(resp_r),
                 os.path.join(trusted, "spec.json")],
                cwd=trusted, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, pass_fds=(req_w, resp_r),
                start_new_session=True, preexec_fn=lambda: _limits(limits),
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": trusted},
            )  # fmt: skip
        os.close(req_w)
        os.close(resp_r)
        req_w = resp_r = -1
        try:
            code = tests.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        for group in (tests.pid,):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        tests.wait()
        jail.kill()
        report, _ = jail.status()
        seconds = time.perf_counter() - t0
        output = "\n".join(
            x
            for x in (
                _tail(os.path.join(workdir, "stdout")),
                _tail(os.path.join(workdir, "stderr")),
                _tail(os.path.join(trusted, "out")),
            )
            if x  # fmt: skip
        ).strip()[-_OUTPUT_TAIL:]
        if code is None:
            return ProgramResult(False, "timeout", None, seconds, output, report)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return ProgramResult(False, f"killed:{name}", code, seconds, output, report)
        return ProgramResult(code == 0, "passed" if code == 0 else "failed", code, seconds, output, report)
    finally:
        for fd in (req_r, req_w, resp_r, resp_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if tests is not None and tests.poll() is None:
            tests.kill()
            tests.wait()
        if jail is not None:
            if jail.proc.poll() is None:
                jail.kill()
            jail.cleanup()
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(trusted, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--jail":
    sys.exit(_jail_main(json.loads(sys.argv[2])))
