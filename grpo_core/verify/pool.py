"""A small pool of killable worker processes for verifying a batch with a hard per-item time bound.

Why not multiprocessing.Pool / concurrent.futures: neither can kill the one worker stuck in a C-level
sympy/gmpy call and go on. Here each worker owns a Pipe and runs one item at a time; the parent waits on
all pipes with the earliest deadline as timeout. A worker past its deadline is killed (SIGKILL) and
replaced, its item scored incorrect with reason "timeout"; a worker that dies (EOF on its pipe) is replaced
and its item scored with reason "worker_died". Workers come from the forkserver context (spawn where
forkserver is unavailable), never plain fork: the trainer process holds CUDA/NCCL state and threads.
The forkserver preloads the verifier, so starting a replacement is a fork, not a fresh import of sympy.

Inside a worker the in-process SIGALRM guard is armed at 0.75 x the pool timeout, so most slow items end
with a soft "timeout" and the worker survives; the kill is the backstop.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import multiprocessing as mp
import os
import time
from multiprocessing.connection import wait

from grpo_core.verify.api import DEFAULT_CONFIG, VerifyConfig, VerifyResult, judge

_READY = "ready"
_TEST_SLEEP = "__grpo_verify_test_sleep__:"
_TEST_EXIT = "__grpo_verify_test_exit__"
_PIPELINE_DEPTH = 2
_PIPELINE_MAX_CHARS = 16_000


def _worker_main(conn, config: VerifyConfig, test_hooks: bool) -> None:
    """Worker loop: receive (index, response, gold), send back (index, VerifyResult); None stops it."""
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, response, gold = msg
        if test_hooks and isinstance(response, str):
            # TEST-ONLY hooks (enabled by VerifierPool(_test_hooks=True)): simulate a worker that hangs
            # outside any guard, or one that dies, to exercise the kill / replace paths.
            if response.startswith(_TEST_SLEEP):
                time.sleep(float(response[len(_TEST_SLEEP) :]))
            elif response.startswith(_TEST_EXIT):
                os._exit(3)
        conn.send((index, judge(response, gold, config, with_canonical=True)))


class _Worker:
    __slots__ = ("proc", "conn", "queue", "head_start")

    def __init__(self, proc, conn):
        self.proc, self.conn = proc, conn
        self.queue: collections.deque[int] = collections.deque()  # item indices sent, oldest first
        self.head_start = 0.0  # when the oldest queued item can have started running


class VerifierPool:
    """Reusable pool of ``workers`` verifier processes with a hard per-item wall-clock bound ``timeout_s``.

    Use as a context manager or call close(). ``startup_s`` records how long starting the workers took.
    ``_test_hooks`` is TEST-ONLY: it makes workers honour magic responses that sleep or exit.
    """

    def __init__(
        self, workers: int = 2, timeout_s: float = 2.0, config: VerifyConfig | None = None, *, _test_hooks: bool = False
    ):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"VerifierPool workers must be an int >= 1, got {workers!r}")
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"VerifierPool timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        base = config or DEFAULT_CONFIG
        soft = 0.75 * self.timeout_s if base.timeout_s <= 0 else min(base.timeout_s, 0.75 * self.timeout_s)
        self._config = dataclasses.replace(base, timeout_s=soft)
        self._test_hooks = _test_hooks
        methods = mp.get_all_start_methods()
        self._ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload(["grpo_core.verify.api"])
        self.restarts = 0
        t0 = time.perf_counter()
        self._workers = [self._spawn() for _ in range(workers)]
        for w in self._workers:
            self._await_ready(w)
        self.startup_s = time.perf_counter() - t0
        self._closed = False

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child_conn, self._config, self._test_hooks), daemon=True)
        proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn)

    @staticmethod
    def _await_ready(w: _Worker, timeout: float = 120.0) -> None:
        if not w.conn.poll(timeout) or w.conn.recv() != _READY:
            raise RuntimeError("verifier worker failed to start")

    def _replace(self, w: _Worker) -> _Worker:
        try:
            w.proc.kill()
        except Exception:
            pass
        w.proc.join(timeout=5)
        w.conn.close()
        self.restarts += 1
        fresh = self._spawn()
        self._await_ready(fresh)
        return fresh

    def map(self, responses: list[str], golds: list[str]) -> list[VerifyResult]:
        """Verify ``responses[i]`` against ``golds[i]`` for all i; results in input order.

        Each worker holds up to _PIPELINE_DEPTH small items so it never idles on a round trip; the
        deadline of a worker's oldest item runs from when the previous result arrived. When a worker is
        killed, its not-yet-started items go back to the queue.
        """
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        if len(responses) != len(golds):
            raise ValueError(f"responses and golds differ in length: {len(responses)} vs {len(golds)}")
        results: list[VerifyResult | None] = [None] * len(responses)
        pending = collections.deque(range(len(responses)))
        while pending or any(w.queue for w in self._workers):
            self._dispatch(pending, responses, golds)
            busy = [w for w in self._workers if w.queue]
            if not busy:
                continue
            wait_s = max(0.0, min(w.head_start for w in busy) + self.timeout_s - time.monotonic())
            ready = set(wait([w.conn for w in busy], timeout=wait_s))
            for slot, w in enumerate(self._workers):
                if not w.queue:
                    continue
                if w.conn in ready:
                    try:
                        while w.queue and w.conn.poll():
                            index, result = w.conn.recv()
                            results[index] = result
                            w.queue.popleft()
                            w.head_start = time.monotonic()
                        continue
                    except (EOFError, OSError):
                        reason = "worker_died"
                elif time.monotonic() >= w.head_start + self.timeout_s:
                    reason = "timeout"
                else:
                    continue
                head = w.queue.popleft()
                results[head] = _failed(responses[head], reason)
                pending.extendleft(reversed(w.queue))  # never started: retry on a live worker
                w.queue.clear()
                self._workers[slot] = self._replace(w)
        return results  # type: ignore[return-value]

    def _dispatch(self, pending, responses, golds) -> None:
        for slot, w in enumerate(self._workers):
            while pending and len(w.queue) < _PIPELINE_DEPTH:
                i = pending[0]
                # A large message to a busy worker could block on a full pipe while it hangs: only queue
                # behind another item when the message is small.
                if w.queue and len(responses[i]) + len(golds[i]) > _PIPELINE_MAX_CHARS:
                    break
                try:
                    w.conn.send((i, responses[i], golds[i]))
                except (BrokenPipeError, OSError):
                    if not w.queue:  # died while idle: replace now; the item stays pending
                        self._workers[slot] = self._replace(w)
                    break  # otherwise the EOF on recv reports the item it was running
                pending.popleft()
                if not w.queue:
                    w.head_start = time.monotonic()
                w.queue.append(i)

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except Exception:
                pass
        for w in self._workers:
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=2)
            w.conn.close()

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _failed(response, reason: str) -> VerifyResult:
    from grpo_core.verify.api import extract_answer

    return VerifyResult(False, extract_answer(response) if isinstance(response, str) else None, None, reason)


_SHARED: dict = {}


def verify_batch(
    responses: list[str], golds: list[str], workers: int = 2, timeout_s: float = 2.0, config: VerifyConfig | None = None
) -> list[VerifyResult]:
    """Verify a batch; ``workers=0`` runs in-process (bounded by the size limits and the SIGALRM guard).

    With workers >= 1, a process-wide VerifierPool per (workers, timeout_s, config) is created on first use
    and reused by later calls (closed at interpreter exit), so the start-up cost is paid once.
    """
    if len(responses) != len(golds):
        raise ValueError(f"responses and golds differ in length: {len(responses)} vs {len(golds)}")
    if workers == 0:
        cfg = config or DEFAULT_CONFIG
        return [judge(r, g, cfg, with_canonical=True) for r, g in zip(responses, golds)]
    key = (workers, float(timeout_s), config)
    pool = _SHARED.get(key)
    if pool is None:
        pool = _SHARED[key] = VerifierPool(workers, timeout_s, config)
    return pool.map(responses, golds)


@atexit.register
def _close_shared() -> None:
    for pool in _SHARED.values():
        pool.close()
    _SHARED.clear()
