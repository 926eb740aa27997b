"""Run model-written Python in a sandboxed subprocess.

Model-written code is hostile. Every run gets:
  - a fresh temporary working directory, removed afterwards (the captured output lives beside it, outside
    the program's reach);
  - a scrubbed environment: PATH, LANG, HOME/TMPDIR (the work dir) and nothing else from the parent;
  - rlimits on CPU seconds, address space, file size, open files and processes, set before any of its code
    runs (a program can lower them, never raise them);
  - its own session and process group, SIGKILLed as a whole when the wall-clock limit is hit and again
    after every run, plus a sweep for any process that left the group (found by a per-run token in its
    environment), so a fork bomb or a left-behind child never survives the call;
  - no network: a fresh network namespace (only a loopback that is down) when the OS allows one; where it
    does not, one warning line is logged at the first run;
  - when the trainer runs as root, an unprivileged uid/gid (``nobody``) with no supplementary groups, so it
    can write nowhere but its work dir (as a normal user it runs under the trainer's own uid);
  - stdout/stderr written to files capped by the file-size limit and read back truncated to
    ``output_bytes``.

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
_CLONE_NEWUSER = 0x10000000


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

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "file_size_mb", "open_files", "processes", "output_bytes"):
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
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
# World-writable places get a private, size-bounded tmpfs inside the sandbox's mount namespace.
_PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

_UNSHARE_SNIPPET = (
    "import os\n"
    "def _unshare(flags):\n"
    "    import ctypes\n"
    "    libc = ctypes.CDLL(None, use_errno=True)\n"
    f"    flags |= 0 if os.geteuid() == 0 else {_CLONE_NEWUSER}\n"
    "    return libc.unshare(flags) == 0\n"
)


def namespace_flags() -> int:
    """The namespaces (network, pid, mount) a sandbox can enter here, probed once. Where the OS allows none,
    one warning line says the code runs without network isolation."""
    global _ns_probe
    with _ns_lock:
        if _ns_probe is None:
            _ns_probe = 0
            for flags in (_CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWNS, _CLONE_NEWNET):
                code = _UNSHARE_SNIPPET + f"raise SystemExit(0 if _unshare({flags}) else 1)\n"
                try:
                    rc = subprocess.run([sys.executable, "-I", "-S", "-c", code], env=_base_env(), timeout=30,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
                except (OSError, subprocess.SubprocessError):
                    rc = 1
                if rc == 0:
                    _ns_probe = flags
                    break
            if not _ns_probe & _CLONE_NEWNET:
                logger.warning("sandbox: this OS does not allow a network namespace (unshare failed); sandboxed "
                               "code runs WITHOUT network isolation")
            elif not _ns_probe & _CLONE_NEWPID:
                logger.warning("sandbox: no pid/mount namespace here; leftover processes are killed by process "
                               "group and environment token only, and /tmp is shared")
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

# Runs in the child before any of the program's code: namespaces, rlimits, privileges, then the program.
# Config comes as KEY=VALUE words on argv (nothing secret); the verdict nonce comes on an inherited fd that is
# closed at once. It imports nothing heavy (no json/ast: the parent pre-splits the tests) to start fast.
_BOOTSTRAP = _UNSHARE_SNIPPET + r'''
import resource, sys
_cfg = dict(_a.split("=", 1) for _a in sys.argv[1:])
del sys.argv[1:]
sys.argv[0] = "solution.py"
_ns = int(_cfg["ns"])
if _ns and not _unshare(_ns):
    _ns = 0
if _ns & %(newns)d:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mount(None, b"/", None, %(rec_private)d, None)  # nothing mounted here reaches the host
    for _d in filter(None, _cfg["private_dirs"].split(":")):
        _libc.mount(b"tmpfs", _d.encode(), b"tmpfs", %(nosuid_nodev)d, b"size=16m,mode=1777")
    del ctypes, _libc
if _ns & %(newpid)d:
    # This process stays outside; its child is pid 1 of the new namespace (root, out of the program's reach)
    # and runs the program as its own child. When pid 1 exits or is killed, the kernel kills everything
    # left in the namespace, setsid'd or not.
    def _wait_for(pid):
        while True:
            got, status = os.wait()
            if got == pid:
                code = os.waitstatus_to_exitcode(status)
                os._exit(code if code >= 0 else 128 - code)
    _child = os.fork()
    if _child:
        _wait_for(_child)
    _child = os.fork()
    if _child:
        _wait_for(_child)  # pid 1 also reaps the program's orphans
for _name in [_k for _k in _cfg if _k.startswith("RLIMIT_")]:
    _value = int(_cfg[_name])
    _lim = getattr(resource, _name)
    _soft, _hard = resource.getrlimit(_lim)
    _value = _value if _hard == resource.RLIM_INFINITY else min(_value, _hard)
    resource.setrlimit(_lim, (_value, _value))
''' % {"newns": _CLONE_NEWNS, "newpid": _CLONE_NEWPID, "rec_private": _MS_REC | _MS_PRIVATE,
       "nosuid_nodev": _MS_NOSUID | _MS_NODEV} + r'''
_uid, _gid = int(_cfg["uid"]), int(_cfg["gid"])
if _uid >= 0:
    # The interpreter's own files may sit under a directory the unprivileged uid cannot search (e.g. a
    # pyenv under /root): keep each import directory reachable through a read-only descriptor opened now.
    _paths = []
    for _p in sys.path:
        try:
            _paths.append("/proc/self/fd/%d" % os.open(_p, os.O_RDONLY | os.O_DIRECTORY))
        except OSError:
            _paths.append(_p)
    _map = [(_p.rstrip("/") + "/", _q + "/") for _p, _q in zip(sys.path, _paths) if _p != _q and _p]
    sys.path[:] = _paths
    for _m in list(sys.modules.values()):  # packages imported at start-up (collections, encodings, ...)
        _mp = getattr(_m, "__path__", None)
        if isinstance(_mp, list):
            for _i, _d in enumerate(_mp):
                for _p, _q in _map:
                    if (_d + "/").startswith(_p):
                        _mp[_i] = _q + _d[len(_p):]
                        break
    sys.path_importer_cache.clear()
    os.setgroups([])
    os.setgid(_gid)
    os.setuid(_uid)
    if os.getuid() != _uid or os.geteuid() != _uid:
        os._exit(120)
_nonce = b""
_run = _cfg["mode"]
if _run == "tests":
    _nonce = os.read(int(_cfg["nonce_fd"]), 128)
    os.close(int(_cfg["nonce_fd"]))
    _verdict_fd = int(_cfg["verdict_fd"])
del resource
_write, _exit = os.write, os._exit
with open("solution.py", encoding="utf-8") as _f:
    _src = _f.read()
if _run == "script":
    del _cfg, _nonce
    _g = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "solution.py"}
    exec(compile(_src, "solution.py", "exec"), _g)
else:
    def _report(status, passed, total, _n=_nonce, _fd=_verdict_fd, _w=_write):
        try:
            _w(_fd, _n + (" %s %d %d\n" % (status, passed, total)).encode())
        except OSError:
            pass
    # Units from the parent, NUL-separated: "T<source>" is a test, "S<source>" a setup statement.
    with open("tests.txt", encoding="utf-8") as _f:
        _units = _f.read().split("\0")
    os.remove("tests.txt")
    _codes = [(compile(_u[1:], "tests.py", "exec"), _u[0] == "T") for _u in _units]
    _total = sum(_t for _, _t in _codes)
    del _cfg, _nonce, _verdict_fd, _units
    _g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(_src, "solution.py", "exec"), _g)
    except BaseException:
        _report("crash", 0, _total)
        _exit(1)
    _passed = 0
    for _code, _is_test in _codes:
        try:
            exec(_code, _g)
            _passed += _is_test
        except BaseException:
            if not _is_test:  # a failing setup statement: the rest cannot be judged
                break
    _report("done", _passed, _total)
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    _exit(0)
'''


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
    root = Path(tempfile.mkdtemp(prefix="grpo-sandbox-"))
    token = secrets.token_hex(16).encode()
    nonce = secrets.token_hex(16).encode()
    fds: list[int] = []
    proc = None
    try:
        work = root / "work"
        work.mkdir()
        (work / "solution.py").write_text(source, encoding="utf-8", errors="replace")
        if tests is not None:
            (work / "tests.txt").write_text("\0".join(_test_units(tests)), encoding="utf-8", errors="replace")
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
               "mode": "script" if tests is None else "tests", "nonce_fd": nonce_r, "verdict_fd": verdict_fd}
        env = _base_env()
        # Inside a mount namespace the work dir's path may be hidden under a private /tmp: the program reaches
        # it as its current directory.
        home = "/tmp" if private else str(work)
        env.update({"HOME": home, "TMPDIR": home, _TOKEN_VAR: token.decode()})
        pass_fds = (nonce_r, verdict_fd) if tests is not None else ()
        t0 = time.monotonic()
        with open(root / "stdin", "rb") as fin, open(root / "stdout", "wb") as fout, \
                open(root / "stderr", "wb") as ferr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, *(f"{k}={v}" for k, v in cfg.items())],
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
