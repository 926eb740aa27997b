"""Run model-written Python in a sandboxed subprocess (the child side is grpo_core/sandbox_child.py).

Model-written code is hostile. Every run gets:
  - a scrubbed environment: PATH, LANG, HOME/TMPDIR (its work dir) and nothing else from the parent;
  - rlimits on CPU seconds, address space, file size, open files and processes, set before any of its code
    runs (a program can lower them, never raise them);
  - its own session and process group, SIGKILLed as a whole when the wall-clock limit is hit and again
    after every run, plus a sweep for any process that left the group (found by a per-run token in its
    environment), so a fork bomb or a left-behind child never survives the call;
  - where the OS allows namespaces (probed once; one warning line names what is missing):
      no network (a fresh network namespace, loopback down);
      no host process visible (a pid namespace with its own /proc);
      a total disk bound: one tmpfs of ``disk_mb`` holds its work dir, /tmp, /var/tmp, /dev/shm and
      /run/lock (without a mount namespace only the per-file bound holds);
  - when the trainer runs as root, an unprivileged uid/gid (``nobody``) with no supplementary groups, so it
    can write nowhere but its own dirs (as a normal user it runs under the trainer's own uid);
  - stdout/stderr written to files capped by the file-size limit and read back truncated to
    ``output_bytes``.

With ``tests`` (asserts), the verdict comes from a judge process the program cannot reach: the program's
process only answers calls into its namespace; the judge (another uid, not traceable, holding the tests and
the report descriptor the program never had) runs the tests on built-in values it decodes itself and
compares them. Only names the program binds at module level are asked for, so a program that defines
nothing scores 0 whatever it does.

The interpreter starts isolated (``-I -S -B``: no user site, no site-packages, no .pyc writes), so only the
standard library is importable. Many runs may go at once from threads; a process-wide semaphore bounds the
number of live sandboxes (``set_max_concurrency``). The wall-clock limit runs from when a slot is taken.
"""
from __future__ import annotations

import ast
import logging
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

NOBODY_UID = 65534
NOBODY_GID = 65534
_TOKEN_VAR = "GRPO_SANDBOX_TOKEN"
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class SandboxLimits:
    """Resource bounds of one sandboxed run."""

    timeout_s: float = 5.0  # wall-clock bound in seconds (the process group is SIGKILLed at it)
    cpu_s: Optional[int] = None  # RLIMIT_CPU in seconds; None = ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS in MiB (a 10 GB allocation fails with MemoryError)
    file_size_mb: int = 16  # RLIMIT_FSIZE in MiB: largest file (stdout/stderr included) it can write
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # RLIMIT_NPROC: processes/threads it may add under its uid
    output_bytes: int = 1 << 20  # stdout and stderr are each read back truncated to this many bytes
    disk_mb: int = 64  # total MiB it may write (work dir and temp dirs together; needs a mount namespace)

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "file_size_mb", "open_files", "processes", "output_bytes", "disk_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"SandboxLimits.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    """What a sandboxed run did. ``returncode`` is negative for a signal (e.g. -9 after the timeout kill)."""

    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    stdout_truncated: bool = False
    verdict: Optional[str] = None  # the test runner's private report (run_tests mode), None if absent/forged
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# --------------------------------------------------------------------------------------- concurrency bound

_slots_lock = threading.Lock()
_max_concurrency = max(1, os.cpu_count() or 1)
_slots = threading.BoundedSemaphore(_max_concurrency)
_active = 0
_peak_active = 0


def set_max_concurrency(n: int) -> None:
    """Bound the sandboxes running at once in this process (default: the CPU count). Call before any run."""
    global _slots, _max_concurrency
    if n < 1:
        raise ValueError(f"max concurrency must be >= 1, got {n}")
    with _slots_lock:
        _max_concurrency = n
        _slots = threading.BoundedSemaphore(n)


def max_concurrency() -> int:
    return _max_concurrency


def peak_concurrency(reset: bool = False) -> int:
    """The most sandboxes seen running at once in this process (for tests and benchmarks)."""
    global _peak_active
    with _slots_lock:
        peak = _peak_active
        if reset:
            _peak_active = _active
    return peak


# --------------------------------------------------------------------------------------- isolation probes

_ns_probe: Optional[int] = None
_ns_lock = threading.Lock()
_CLONE_NEWNS = 0x00020000
_CLONE_NEWPID = 0x20000000
# World-writable places: inside the mount namespace they are folders of the run's bounded tmpfs.
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
CHILD = str(Path(__file__).with_name("sandbox_child.py"))


def _child_argv(cfg: dict) -> list[str]:
    return [sys.executable, "-I", "-S", "-B", CHILD, *(f"{k}={v}" for k, v in cfg.items())]


def namespace_flags() -> int:
    """The namespaces (network, pid + mount with a private /proc and tmpfs) a sandbox can use here, probed
    once. Where the OS allows less, one warning line says what runs without isolation."""
    global _ns_probe
    with _ns_lock:
        if _ns_probe is None:
            _ns_probe = 0
            for flags in (_CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWNS, _CLONE_NEWNET):
                cfg = {"probe": 1, "ns": flags, "mode": "script", "disk_kb": 1024, "private_dirs": "/tmp"}
                try:
                    rc = subprocess.run(_child_argv(cfg), env=_base_env(), timeout=30, cwd="/",
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
                except (OSError, subprocess.SubprocessError):
                    rc = 1
                if rc == 0:
                    _ns_probe = flags
                    break
            if not _ns_probe & _CLONE_NEWNET:
                logger.warning("sandbox: this OS does not allow a network namespace (unshare failed); sandboxed "
                               "code runs WITHOUT network isolation")
            if not _ns_probe & _CLONE_NEWPID:
                logger.warning("sandbox: no pid/mount namespace here: sandboxed code can see host processes in "
                               "/proc, shares /tmp, and its disk use is bounded per file only")
        return _ns_probe


def network_isolation_available() -> bool:
    """Whether sandboxed code runs in a fresh network namespace (no interfaces up) on this machine."""
    return bool(namespace_flags() & _CLONE_NEWNET)


def drops_privileges() -> bool:
    """True when sandboxed code runs as the unprivileged ``nobody`` uid (the trainer runs as root)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _base_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


# --------------------------------------------------------------------------------------- the child side

# --------------------------------------------------------------------------------------- the parent side

def _test_units(tests: str) -> list[str]:
    """The tests as units for the runner: "T<source>" per top-level assert, "S<source>" per other statement
    (setup, run in order); without any top-level assert the whole block is one test. Raises SyntaxError."""
    tree = ast.parse(tests)
    if not any(isinstance(node, ast.Assert) for node in tree.body):
        return ["T" + tests]
    return [("T" if isinstance(node, ast.Assert) else "S") + ast.unparse(node) for node in tree.body]


def _rlimits(limits: SandboxLimits) -> list[tuple[str, int]]:
    cpu = limits.cpu_s if limits.cpu_s is not None else int(math.ceil(limits.timeout_s)) + 1
    mib = 1 << 20
    nproc = limits.processes
    if not drops_privileges():
        # RLIMIT_NPROC counts every process/thread of the uid: as a normal user the sandbox shares the
        # trainer's uid, so the bound sits above what that uid already runs.
        nproc += _tasks_of_uid(os.getuid())
    return [("RLIMIT_CPU", cpu), ("RLIMIT_AS", limits.memory_mb * mib), ("RLIMIT_FSIZE", limits.file_size_mb * mib),
            ("RLIMIT_NOFILE", limits.open_files), ("RLIMIT_NPROC", nproc), ("RLIMIT_CORE", 0)]


def _tasks_of_uid(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the child's exit, up to timeout_s; True if it exited. A pidfd wakes us the moment it exits
    (Popen.wait with a timeout polls with sleeps of up to 50 ms)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def _kill_group(pgid: int) -> None:
    for _ in range(50):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.002)


def _sweep(token: bytes) -> int:
    """SIGKILL every process whose environment carries this run's token (ones that left the group)."""
    killed = 0
    needle = f"{_TOKEN_VAR}=".encode() + token
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def _read_capped(path: Path, cap: int) -> tuple[str, bool]:
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError:
        return "", False
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def _rmtree(path: Path) -> None:
    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def run_python(source: str, *, stdin: str = "", limits: Optional[SandboxLimits] = None,
               tests: Optional[str] = None) -> SandboxResult:
    """Run ``source`` as a Python program in the sandbox.

    With ``tests`` (Python statements), the program's code runs first, then each top-level statement of
    ``tests`` in the same namespace; the runner's count of passed ``assert`` statements comes back in
    ``result.verdict`` as "STATUS PASSED TOTAL" (None when the program crashed the runner or tampered with
    the report channel). Without ``tests`` the program runs as ``__main__`` reading ``stdin``.
    """
    limits = limits or SandboxLimits()
    ns = namespace_flags()
    slots = _slots
    slots.acquire()
    global _active, _peak_active
    with _slots_lock:
        _active += 1
        _peak_active = max(_peak_active, _active)
    try:
        return _run(source, stdin, limits, tests, ns)
    finally:
        with _slots_lock:
            _active -= 1
        slots.release()


def _run(source: str, stdin: str, limits: SandboxLimits, tests: Optional[str], ns: int) -> SandboxResult:
    """One sandboxed run (see the module docstring); the child side is sandbox_child.py."""
    root = Path(tempfile.mkdtemp(prefix="grpo-sandbox-"))
    token = secrets.token_hex(16).encode()
    nonce = secrets.token_hex(16).encode()
    fds: list[int] = []
    proc = None
    try:
        work = root / "work"
        work.mkdir()
        (work / "solution.py").write_text(source, encoding="utf-8", errors="replace")
        if tests is not None:  # handed to the judge as a descriptor of an unlinked file: no path to it
            (root / "tests").write_text("\0".join(_test_units(tests)), encoding="utf-8", errors="replace")
            fds.append(os.open(root / "tests", os.O_RDONLY))
            os.unlink(root / "tests")
        (root / "stdin").write_text(stdin, encoding="utf-8", errors="replace")
        uid = gid = None
        if drops_privileges():
            uid, gid = NOBODY_UID, NOBODY_GID
            os.chmod(root, 0o711)  # nobody may pass through to work/ but not list or read the rest
            for p in [work, *work.iterdir()]:
                os.chown(p, uid, gid)
        verdict_path = root / "verdict"
        verdict_fd = os.open(verdict_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fds.append(verdict_fd)
        nonce_r, nonce_w = os.pipe()
        fds += [nonce_r, nonce_w]
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        fds.remove(nonce_w)
        private = [d for d in _PRIVATE_DIRS if ns & _CLONE_NEWNS and os.path.isdir(d)]
        cfg = {"ns": ns, "private_dirs": ":".join(private), **dict(_rlimits(limits)),
               "uid": -1 if uid is None else uid, "gid": -1 if gid is None else gid,
               "mode": "script" if tests is None else "tests", "nonce_fd": nonce_r, "verdict_fd": verdict_fd,
               "disk_kb": limits.disk_mb * 1024}
        if tests is not None:
            cfg["tests_fd"] = fds[0]
        env = _base_env()
        # Inside a mount namespace the work dir is /tmp/work on the run's own tmpfs.
        home = "/tmp/work" if private else str(work)
        env.update({"HOME": home, "TMPDIR": home, _TOKEN_VAR: token.decode()})
        pass_fds = (nonce_r, verdict_fd, fds[0]) if tests is not None else ()
        t0 = time.monotonic()
        with open(root / "stdin", "rb") as fin, open(root / "stdout", "wb") as fout, \
                open(root / "stderr", "wb") as ferr:
            proc = subprocess.Popen(
                _child_argv(cfg),
                cwd=work, env=env, stdin=fin, stdout=fout, stderr=ferr, pass_fds=pass_fds,
                close_fds=True, start_new_session=True)
        for fd in list(fds):
            os.close(fd)
            fds.remove(fd)
        timed_out = not _wait_exit(proc, limits.timeout_s)
        if timed_out:
            _kill_group(proc.pid)
            proc.wait()
        wall = time.monotonic() - t0
        _kill_group(proc.pid)  # children left behind by a program that exited
        swept = _sweep(token)
        stdout, truncated = _read_capped(root / "stdout", limits.output_bytes)
        stderr, _ = _read_capped(root / "stderr", limits.output_bytes)
        verdict = None
        if tests is not None and not timed_out:
            lines = _read_capped(verdict_path, 4096)[0].splitlines()
            if len(lines) == 1 and lines[0].startswith(nonce.decode() + " "):
                verdict = lines[0][len(nonce) + 1:]
        return SandboxResult(returncode=proc.returncode, stdout=stdout, stderr=stderr, timed_out=timed_out,
                             wall_s=wall, stdout_truncated=truncated, verdict=verdict,
                             extra={"swept": swept} if swept else {})
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if proc is not None and proc.poll() is None:
            _kill_group(proc.pid)
            proc.kill()
            proc.wait()
        _rmtree(root)
