"""Errors the user fixes (a path, a file, a setting, the disk): `grpo` prints them as one line and exits 2.

A traceback is kept for genuine bugs (and for every error with `--debug`)."""
from __future__ import annotations

import contextlib

# Exit codes of `grpo train` / `eval` / `data`.
EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad config, data, model dir, checkpoint, output dir, disk
EXIT_PREEMPTED = 75  # stopped by SIGTERM / SIGUSR1 after saving a checkpoint (EX_TEMPFAIL: run it again)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (SIGINT), after saving a checkpoint when a step had run


class UserError(Exception):
    """A problem with what the user gave or the machine (not a bug): one line naming the file, key or path and
    the fix."""


class PreflightError(UserError):
    """A path, extra or device the run needs is missing; found before any heavy start-up or any write."""


class OutputDirError(UserError):
    """The output directory is in use by another run or holds a previous run."""


class CheckpointError(UserError):
    """A checkpoint cannot be resumed (damaged, missing, or from a different config)."""


class DiskError(UserError):
    """Writing failed for lack of space, quota or permission."""


class NonFiniteError(UserError):
    """Non-finite weights at load, or too many consecutive non-finite optimizer steps."""


@contextlib.contextmanager
def naming(path):
    """Give an OSError raised in the block `path` as its filename when it has none (write() and close()
    failures carry no name), so that "disk full" says where. A native library's I/O error (safetensors',
    tokenizers': a bare exception whose text ends in "(os error N)") becomes the OSError it is."""
    import os
    import re

    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
