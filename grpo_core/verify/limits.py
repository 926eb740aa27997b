"""Size bounds, the per-call wall-clock guard and the exceptions shared by the verifier modules.

Everything the verifier does on model text is bounded *before* sympy sees it: the response is scanned
only with linear-time string operations, the answer span is capped, the parser caps nesting depth, and
numeric constructions whose result would be astronomically large (``9^9^9^9``, ``100000!``) are refused.
On top of that, :func:`time_guard` arms a SIGALRM timer when called on the main thread of the main
interpreter, so a symbolic step that is still slow is interrupted; elsewhere the size bounds are the
only bound in-process, and :class:`grpo_core.verify.pool.VerifierPool` gives a hard bound by killing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

MAX_RESPONSE_CHARS = 1_000_000
"""Responses longer than this are cut to their last MAX_RESPONSE_CHARS characters (final answer is at the end)."""
MAX_ANSWER_CHARS = 1000
"""An extracted answer span longer than this is rejected (no answer)."""
MAX_LITERAL_CHARS = 120_000
"""A span that is one plain number literal may be this long (a 100,000-digit integer compares in ~0.1 s)."""
MAX_DEPTH = 250
"""Deepest bracket / brace / \\frac nesting the parser follows; deeper input is refused (TooBig)."""
MAX_INEXACT_DEPTH = 100
"""Nesting deeper than this is accepted only when the value is exact and rational (``\\frac{1}{\\frac{1}{..}}``):
a deep irrational (``\\sqrt{\\sqrt{..2..}}`` 120 times, within 1e-36 of 1) would pass any numeric comparison."""
MAX_RESULT_DIGITS = 120_000
"""Numeric powers / products whose exact result would exceed ~this many decimal digits are refused."""
MAX_FACTORIAL_ARG = 1000
"""Largest integer n for which n! is evaluated."""
MAX_SYMBOLIC_EXPONENT = 1000
"""Largest |integer exponent| allowed on a non-numeric base (keeps expansion and evaluation cheap)."""


class VerifyError(Exception):
    """Base of the verifier's own errors; all of them mean "cannot judge", i.e. not equivalent."""


class ParseError(VerifyError):
    """The answer text is not in the supported grammar."""


class TooBig(VerifyError):
    """The answer would need an unbounded amount of work (huge number, deep nesting, long span)."""


class Deadline(BaseException):
    """Raised by the SIGALRM handler. A BaseException so that sympy's own ``except Exception`` blocks
    cannot swallow it."""


def _can_use_alarm() -> bool:
    if not hasattr(signal, "setitimer"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    # Do not clobber a timer someone else armed (e.g. pytest-timeout, the caller's own alarm).
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0.0:
        return False
    return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)


@contextlib.contextmanager
def time_guard(seconds: float) -> Iterator[bool]:
    """Interrupt the body with :class:`Deadline` after ``seconds`` of wall-clock time, when possible.

    Yields whether a timer was armed. The timer re-fires every 50 ms after the first expiry, so a
    Deadline swallowed by a bare ``except:`` somewhere deep inside a library is raised again.
    """
    if seconds is None or seconds <= 0 or not _can_use_alarm():
        yield False
        return

    def _on_alarm(signum, frame):
        raise Deadline()

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield True
    finally:
        # The alarm may fire once more right here; retry until the timer is off and the handler restored,
        # so no stray Deadline can surface later in the caller's code.
        while True:
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.0, 0.0)
                signal.signal(signal.SIGALRM, previous)
                break
            except Deadline:
                continue
