"""File modes of what a run writes: like every other tool, follow the process umask (0644 under umask 022).

Two writers create files 0600 regardless of the umask: `tempfile.mkstemp` (our atomic parquet/JSONL
writes) and safetensors' `save_file`. A checkpoint or dataset that only its writer can read breaks a
teammate's evaluation or a serving job under another user, so those files are re-moded after writing.
"""
from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read from /proc where it can be, without changing it; else set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a regular file we just wrote the mode a plain open() would have given it: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~current_umask())
