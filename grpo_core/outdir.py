"""Output-directory ownership: one run per directory, and a previous run's files are never lost.

A run takes an exclusive lock on `<output_dir>/.grpo-lock` (an `flock` held for the life of the process, so
the kernel releases it when the process dies, plus the holder's host, pid and start time in the file for the
messages). A second run on the same directory is refused in one line naming the holder. A lock left by a
dead process on this host is taken over (with a note); one left by another host cannot be checked from here
and is refused with the path to delete.

A run recognises its own directory by the marker file `<output_dir>/.grpo-run`, written once the directory
is claimed (never by folder names alone). A directory that holds a previous run (metrics, checkpoints, models
written by a run) is only continued with `--resume`; a fresh start there is refused unless `--force`, which
moves the old run's artefacts (the names in RUN_ARTEFACTS, nothing else) into
`<output_dir>/previous-<UTC time>/` (nothing is deleted). Files of the user's are never moved or written: an
unmarked directory whose entries carry the names a run writes (`data/`, `base_model/`, ...) but no trained
run (checkpoints, metrics) is refused whatever the flags.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from grpo_core.errors import OutputDirError

LOCK_NAME = ".grpo-lock"
MARKER_NAME = ".grpo-run"  # written by a run into the output directory it claimed: "a grpo run wrote here"
ARCHIVE_PREFIX = "previous-"
# What a run writes into its output directory; any of these marks the directory as holding a run.
RUN_ARTEFACTS = ("checkpoints", "metrics.jsonl", "summary.json", "warm_start_model", "base_model", "data", "tb",
                 "curves.png")
# Of those, what only a run that trained writes (the rest is derived at start-up from the config and seed).
TRAINED_ARTEFACTS = ("checkpoints", "metrics.jsonl", "summary.json")


def _proc_start_ticks(pid: int) -> Optional[int]:
    """Start time of a process in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start_ticks: Optional[int] = None) -> bool:
    """Whether process `pid` (on this host) still runs, and is the same process when start_ticks is known."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start_ticks is not None:
        now = _proc_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False  # the pid was reused by another process
    return True


def _holder_text(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started', '?')})"


class RunLock:
    """The exclusive lock of one output directory; `release()` (also at exit) frees it."""

    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: Optional[int] = None
        self.took_over: Optional[dict] = None  # the dead holder whose lock this run took over

    def acquire(self) -> "RunLock":
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            if not info.get("pid"):  # the run that wrote it has released it, yet a process holds the flock
                raise OutputDirError(
                    f"output_dir {self.dir} is locked by a process that is not a grpo run (one that inherited the "
                    f"lock, e.g. a child left behind by an earlier run); find it with `fuser -v {self.path}`, end "
                    f"it, and start again") from None
            raise OutputDirError(
                f"output_dir {self.dir} is in use by another run: {_holder_text(info)}; wait for it to finish, "
                f"stop it, or set another trainer.output_dir") from None
        info = _read_info(fd)
        host = socket.gethostname()
        if info.get("pid") and info.get("pid") != os.getpid():
            if info.get("host") != host:
                os.close(fd)
                raise OutputDirError(
                    f"output_dir {self.dir} is locked by a run on another host: {_holder_text(info)}; this host "
                    f"cannot check whether it still runs: if it does not, delete {self.path} and start again")
            if pid_alive(int(info["pid"]), info.get("start_ticks")):
                os.close(fd)  # alive but the flock was ours: a filesystem without flock; trust the pid
                raise OutputDirError(
                    f"output_dir {self.dir} is in use by another run: {_holder_text(info)}; wait for it to "
                    f"finish, stop it, or set another trainer.output_dir")
            self.took_over = info
        me = {"host": host, "pid": os.getpid(), "start_ticks": _proc_start_ticks(os.getpid()),
              "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        import atexit

        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Empty the lock file (an empty file is a free lock; it is not deleted, so a process that opened it
        meanwhile cannot end up locking an unlinked file) and drop the flock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _read_info(fd: int) -> dict:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def run_artefacts(output_dir: str | Path) -> list[str]:
    """Names of the entries in output_dir that a run wrote (empty: a fresh directory)."""
    d = Path(output_dir)
    return [name for name in RUN_ARTEFACTS if (d / name).exists()]


def has_checkpoint(output_dir: str | Path) -> bool:
    from grpo_core.checkpoint import checkpoint_root, list_checkpoints

    return bool(list_checkpoints(checkpoint_root(output_dir)))


def write_marker(output_dir: str | Path) -> None:
    marker = Path(output_dir) / MARKER_NAME
    if not marker.exists():
        marker.write_text(json.dumps({"grpo_run": True, "created": _dt.datetime.now(_dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC")}) + "\n", encoding="utf-8")


def archive_previous_run(output_dir: str | Path) -> Path:
    """Move the previous run's artefacts (RUN_ARTEFACTS and the run's own hidden temporaries; never anything
    else) into previous-<UTC time>/."""
    d = Path(output_dir)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    dest = d / f"{ARCHIVE_PREFIX}{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = d / f"{ARCHIVE_PREFIX}{stamp}-{n}"
    dest.mkdir()
    for entry in sorted(d.iterdir()):
        if entry.name in RUN_ARTEFACTS or entry.name.startswith(".summary.json"):
            os.rename(entry, dest / entry.name)  # same filesystem: a rename, nothing copied or deleted
    return dest


def claim_output_dir(output_dir: str | Path, *, resume: str, force: bool, say=print) -> RunLock:
    """Rank 0, before any other write: lock output_dir and check it may be written.

    - in use by a live run -> OutputDirError naming the holder;
    - holds a previous run and resume is none -> OutputDirError offering --resume auto, a new dir or --force;
      with --force the old run is archived into previous-<time>/;
    - resume auto but no checkpoint to resume (a run killed before its first save): the leftovers are archived
      and the run starts fresh.
    """
    d = Path(output_dir)
    if d.exists() and not d.is_dir():
        raise OutputDirError(f"trainer.output_dir {d} exists and is not a directory")
    try:
        lock = RunLock(d).acquire()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise  # disk full or read-only: reported as such, naming the path
        raise OutputDirError(f"trainer.output_dir {d} cannot be created or locked: {e.strerror} ({e.filename or d}); "
                             f"set another trainer.output_dir") from None
    try:
        _check_previous(d, lock, resume=resume, force=force, say=say)
        write_marker(d)
        return lock
    except BaseException:
        lock.release()
        raise


def _check_previous(d: Path, lock: RunLock, *, resume: str, force: bool, say) -> None:
    if lock.took_over:
        say(f"[grpo] note: took over the lock of a run that ended without releasing it "
            f"({_holder_text(lock.took_over)})")
    used = run_artefacts(d)
    if not used:
        return
    ran_here = (d / MARKER_NAME).exists()  # a run claimed this directory before (its marker)
    trained = [n for n in used if n in TRAINED_ARTEFACTS]
    if not ran_here and not trained:
        raise OutputDirError(
            f"output_dir {d} holds a previous run ({', '.join(used)}) not marked by grpo ({MARKER_NAME} is "
            f"missing), or files of yours with the names a run writes; nothing was moved or written: set another "
            f"trainer.output_dir")
    if resume in (None, "", "none"):
        if not trained and ran_here and not force:
            # A start that failed before its first step (e.g. a bad model file) left only derived files:
            # keep them aside rather than make the corrected run fight them.
            dest = archive_previous_run(d)
            say(f"[grpo] note: the previous start in {d} stopped before its first step; moved its files "
                f"({', '.join(used)}) into {dest}")
            return
        if not force:
            raise OutputDirError(
                f"output_dir {d} holds a previous run ({', '.join(used)}); continue it with --resume auto, "
                f"set a new trainer.output_dir, or pass --force to move the old run into "
                f"{d}/{ARCHIVE_PREFIX}<time>/ and start fresh")
        dest = archive_previous_run(d)
        say(f"[grpo] --force: moved the previous run in {d} ({', '.join(used)}) into {dest}")
    elif resume == "auto" and not has_checkpoint(d):
        if not ran_here:
            raise OutputDirError(
                f"output_dir {d} holds {', '.join(used)} but no checkpoint to resume and no {MARKER_NAME} marker "
                f"of a grpo run; set another trainer.output_dir, or pass --force (without --resume) to move "
                f"those into {d}/{ARCHIVE_PREFIX}<time>/")
        dest = archive_previous_run(d)
        say(f"[grpo] --resume auto: no checkpoint in {d} to resume; moved the previous run's files into "
            f"{dest} and starting fresh")
