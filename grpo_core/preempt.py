"""Preemption: SIGTERM (what SLURM and Kubernetes send before killing), SIGUSR1 (SLURM `--signal`) and SIGINT
(Ctrl-C) set a flag; the training loop finishes the current step, saves a checkpoint, writes the summary and
exits with a distinct code (errors.EXIT_PREEMPTED, or EXIT_INTERRUPTED for Ctrl-C) and one line.

A second Ctrl-C stops at once (KeyboardInterrupt, reported in one line without a traceback); the last
checkpoint is kept.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class StopRequest:
    def __init__(self):
        self.signal_name: Optional[str] = None
        self._installed = False

    def install(self) -> None:
        """Install the handlers (main thread only; elsewhere a no-op)."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        for name in SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)
        self._installed = True

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if name == "SIGINT":
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            return
        self.signal_name = name
        if os.environ.get("RANK", "0") == "0":  # one line per run, not one per rank
            print(f"[grpo] {name} received: finishing the current step, then saving a checkpoint and exiting "
                  f"(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def reset(self) -> None:
        self.signal_name = None


STOP = StopRequest()
