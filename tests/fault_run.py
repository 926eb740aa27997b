"""Runs `python -m grpo_core ...` with a fault injected from outside the production code (the trainer has no
test hooks): GRPO_TEST_KILL_AFTER_STEP=N SIGKILLs the process right after step N is logged (and checkpointed,
if due). Usable under torchrun as the script: `torchrun ... tests/fault_run.py train ...`."""
import os
import signal
import sys

from grpo_core import trainer
from grpo_core.cli import main

_kill_after = int(os.environ.get("GRPO_TEST_KILL_AFTER_STEP", "-1"))
_stop_requested = trainer.Trainer._stop_requested


def _stop_requested_or_die(self):
    # The loop asks at every step boundary: after step N's log, evaluation and checkpoint.
    if self.step == _kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return _stop_requested(self)


trainer.Trainer._stop_requested = _stop_requested_or_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
