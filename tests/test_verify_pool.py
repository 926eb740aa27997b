"""Tests of the killable verifier pool: ordering, reuse, timeout kill, worker death, in-process path."""

import time

import pytest

from grpo_core.verify import VerifierPool, VerifyResult, judge, verify_batch
from grpo_core.verify.pool import _TEST_EXIT, _TEST_SLEEP

RESPONSES = [
    r"\boxed{\frac{1}{2}}",
    r"\boxed{3}",
    r"x>2 is \boxed{(2,\infty)}",
    "no answer here at all " * 10,
    r"\boxed{9^9^9^9}",
    r"\boxed{(B)}",
    r"\boxed{2x+2}",
]
GOLDS = ["0.5", "4", "x>2", "1", "1", "B", "2(x+1)"]


@pytest.fixture(scope="module")
def pool():
    # _test_hooks is TEST-ONLY: workers honour the sleep / exit magic responses.
    with VerifierPool(workers=2, timeout_s=1.0, _test_hooks=True) as p:
        yield p


def test_pool_matches_in_process_and_keeps_order(pool):
    out = pool.map(RESPONSES, GOLDS)
    expected = [judge(r, g, with_canonical=True) for r, g in zip(RESPONSES, GOLDS)]
    assert all(isinstance(o, VerifyResult) for o in out)
    assert out == expected
    assert [o.correct for o in out] == [True, False, True, False, False, True, True]
    assert pool.startup_s > 0


def test_pool_is_reusable(pool):
    for _ in range(3):
        out = pool.map([r"\boxed{%d}" % i for i in range(50)], [str(i) for i in range(50)])
        assert all(o.correct for o in out)
    assert pool.map([], []) == []


def test_pool_kills_and_replaces_hung_worker(pool):
    restarts = pool.restarts
    responses = [r"\boxed{1}", _TEST_SLEEP + "30", r"\boxed{2}", _TEST_SLEEP + "30", r"\boxed{3}"]
    t0 = time.perf_counter()
    out = pool.map(responses, ["1", "1", "2", "1", "3"])
    elapsed = time.perf_counter() - t0
    assert [o.reason for o in out] == ["correct", "timeout", "correct", "timeout", "correct"]
    assert not out[1].correct
    assert pool.restarts == restarts + 2
    assert elapsed < 5.0  # two 1 s timeouts in parallel slots plus respawns, not 60 s of sleeping
    assert pool.map([r"\boxed{7}"], ["7"])[0].correct  # the replacement works


def test_pool_replaces_dead_worker(pool):
    restarts = pool.restarts
    out = pool.map([_TEST_EXIT, r"\boxed{5}", _TEST_EXIT + "again"], ["1", "5", "1"])
    assert [o.reason for o in out] == ["worker_died", "correct", "worker_died"]
    assert pool.restarts == restarts + 2
    assert all(o.correct for o in pool.map([r"\boxed{4}"] * 4, ["4"] * 4))


def test_pool_hostile_inputs_bounded(pool):
    hostile = [
        r"\boxed{" + "{" * 10000 + "}" * 10000 + "}",
        "a" * 1_000_000,
        r"\boxed{(x+1)^{100000}}",
        r"\boxed{__import__('os').system('true')}",
    ]
    t0 = time.perf_counter()
    out = pool.map(hostile, ["1"] * len(hostile))
    assert time.perf_counter() - t0 < 4.0
    assert not any(o.correct for o in out)


def test_pool_close_stops_workers():
    p = VerifierPool(workers=1, timeout_s=1.0)
    procs = [w.proc for w in p._workers]
    assert p.map([r"\boxed{1}"], ["1"])[0].correct
    p.close()
    p.close()  # idempotent
    assert not any(proc.is_alive() for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        p.map(["1"], ["1"])


def test_verify_batch_in_process_and_pooled_agree():
    in_proc = verify_batch(RESPONSES, GOLDS, workers=0)
    pooled = verify_batch(RESPONSES, GOLDS, workers=1, timeout_s=2.0)
    assert in_proc == pooled
    assert verify_batch(RESPONSES, GOLDS, workers=1, timeout_s=2.0) == pooled  # shared pool reused


def test_bad_arguments():
    with pytest.raises(ValueError, match="differ in length"):
        verify_batch(["a"], [], workers=0)
    with pytest.raises(ValueError, match="workers"):
        VerifierPool(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierPool(workers=1, timeout_s=0)
