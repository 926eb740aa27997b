"""Scoring responses: which scorer a row uses, running it (bounded in time), and turning results into rewards.

Scorers (reward.by_source / reward.default / reward.custom_function):
  math   the sympy verifier against the gold answer (TTRL majority vote for rows without one)
  ttrl   the verifier against the group's majority answer, whatever the gold
  code   grpo_core.rewards.code_reward(response, ground_truth tests) in the sandbox; the fraction of tests
         passed p gives reward incorrect + (correct - incorrect) * p; correct means p == 1
  custom "PATH.py:NAME" or "package.module:NAME" with verl's signature
         NAME(data_source, solution_str, ground_truth, extra_info=None) -> float | {"score": float, ...};
         the score is the reward; correct means score >= reward.correct (or the dict's "acc" when present);
         other numbers in the dict are logged as reward/extra/<key> means.

Custom functions always run in killable worker processes (max(1, reward.verifier_workers) of them, each in
its own session), never in the trainer: whatever the function does (raise, sys.exit, os._exit, hang, fork,
KeyboardInterrupt) cannot end, stall or mislabel the run, and its forked children never hold the trainer's
files or locks. A call that raises (or runs past reward.verifier_timeout_s, kills its worker, or returns
something else than a number or a dict with "score") scores reward.incorrect and counts in reward/errors; the
first error is printed once, and a function that has failed on each of its first reward.custom_error_limit
calls stops the run. `check_custom_function` imports and signature-checks a function in a throwaway worker
(the preflight, before anything is written).
Code rewards run in the sandbox from a bounded thread pool (each sandbox kills its own process group).
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from grpo_core.errors import UserError

BUILTIN_SCORERS = ("math", "code", "ttrl")
MAX_REWARD = 1e6  # bound on |reward| values: advantage normalisation squares differences of rewards


class RewardFunctionError(UserError):
    """A custom reward function cannot be loaded, has the wrong signature, or fails on every call."""

VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
LOAD_TIMEOUT_S = 120.0  # bound on importing a custom reward module (it may import torch or a tokenizer)


def check_scorer_spec(spec: str, custom_only: bool = False) -> Optional[str]:
    """None if `spec` names a scorer, else what is wrong with it (for a config error)."""
    if not isinstance(spec, str) or not spec:
        return "must name a scorer: math, code, ttrl, or a custom function 'PATH.py:NAME' / 'package.module:NAME'"
    if spec in BUILTIN_SCORERS and not custom_only:
        return None
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        kinds = "" if custom_only else "math, code, ttrl, or "
        return f"must be {kinds}'PATH.py:NAME' or 'package.module:NAME', got {spec!r}"
    if not target.endswith(".py") and not all(part.isidentifier() for part in target.split(".")):
        return f"{target!r} is neither a .py file nor a dotted module name"
    return None


_FUNCTIONS: dict[str, Callable] = {}


def load_function(spec: str) -> Callable:
    """Import the function a custom spec names (cached per process). Raises RewardFunctionError naming it."""
    fn = _FUNCTIONS.get(spec)
    if fn is not None:
        return fn
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise RewardFunctionError(f"custom reward file '{target}' does not exist")
            module_name = f"grpo_custom_reward_{abs(hash(str(path)))}"
            mod_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[module_name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except RewardFunctionError:
        raise
    except Exception as exc:
        raise RewardFunctionError(f"cannot import custom reward '{spec}': {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFunctionError(f"custom reward '{spec}': {target} has no function {name!r}")
    _FUNCTIONS[spec] = fn
    return fn


def signature_problem(spec: str, fn: Callable) -> Optional[str]:
    """None when `fn` can be called as verl calls it, NAME(data_source, solution_str, ground_truth,
    extra_info), else what is wrong."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: its first call tells
    try:
        sig.bind(*VERL_ARGS)
    except TypeError:
        name = spec.rpartition(":")[2]
        return (f"custom reward '{spec}': {name}{sig} cannot take verl's 4 arguments; define "
                f"{name}(data_source, solution_str, ground_truth, extra_info=None)")
    return None


def load_checked(spec: str, check_signature: bool) -> Optional[str]:
    """Import the function a spec names (in this process) -> None, or the problem in one line. Catches
    everything the module's import can do short of ending the process (SystemExit, KeyboardInterrupt
    included)."""
    try:
        fn = load_function(spec)
    except RewardFunctionError as exc:
        return str(exc)
    except BaseException as exc:  # noqa: B902 - a module that raises SystemExit / KeyboardInterrupt at import
        return f"cannot import custom reward '{spec}': {type(exc).__name__}: {exc}"
    return signature_problem(spec, fn) if check_signature else None


def call_custom(spec: str, data_source: str, solution_str: str, ground_truth: Any, extra_info: Optional[dict]):
    """One custom call -> ("ok", score, extras) or ("error", message, {}). Never raises: a function that
    raises SystemExit or KeyboardInterrupt is an error of that call like any other."""
    try:
        out = load_function(spec)(data_source, solution_str, ground_truth, extra_info)
        return ("ok", *_normalize(out))
    except BaseException as exc:  # noqa: B902
        return "error", _error_text(exc), {}


def _error_text(exc: BaseException) -> str:
    """A failed call in one line: the error and where the function raised it (the full traceback when
    GRPO_DEBUG=1, which `--debug` sets)."""
    if os.environ.get("GRPO_DEBUG") == "1":
        return "".join(traceback.format_exception(exc, limit=8))
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"


def _normalize(out: Any) -> tuple[float, dict]:
    extras: dict = {}
    if isinstance(out, dict):
        if "score" not in out:
            raise TypeError(f"custom reward returned a dict without 'score' (keys: {sorted(out)})")
        extras = {str(k): float(v) for k, v in out.items()
                  if k != "score" and isinstance(v, (int, float)) and math.isfinite(float(v))}
        out = out["score"]
    if isinstance(out, bool) or not isinstance(out, (int, float)) and not hasattr(out, "__float__"):
        raise TypeError(f"custom reward returned {type(out).__name__}; expected a float or a dict with 'score'")
    score = float(out)
    if not math.isfinite(score):
        raise ValueError(f"custom reward returned a non-finite score {score}")
    if abs(score) > MAX_REWARD:  # the group statistics of such rewards overflow to NaN advantages
        raise ValueError(f"custom reward returned {score:g}, outside [-{MAX_REWARD:g}, {MAX_REWARD:g}]; scale it down")
    return score, extras


# ----------------------------------------------------------------------------------------- killable pool

def _detach_worker() -> None:
    """A worker leads its own session (so a terminal's Ctrl-C reaches only the trainer, and the pool can kill
    the worker together with anything the function forked) and dies with the trainer (Linux)."""
    try:
        os.setsid()
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pool_worker(conn) -> None:
    _detach_worker()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, spec, args = msg
        if index < 0:  # a load request: args = (check_signature,)
            conn.send((index, load_checked(spec, *args)))
        else:
            conn.send((index, call_custom(spec, *args)))


def _kill_worker(proc) -> None:
    """SIGKILL a worker's session (the worker and whatever its function forked), then the worker itself."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.kill()
    except Exception:
        pass


class CallPool:
    """Worker processes running custom reward calls, one at a time each, with a hard per-call wall-clock
    bound: a worker past it is SIGKILLed and replaced, its call reported as ("error", "timeout ...")."""

    def __init__(self, workers: int, timeout_s: float):
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"CallPool needs workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
        self.timeout_s = float(timeout_s)
        methods = mp.get_all_start_methods()
        self._ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._workers = [self._spawn() for _ in range(workers)]
        self.restarts = 0
        self._closed = False

    def _spawn(self):
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_pool_worker, args=(child,), daemon=True)
        try:
            proc.start()
        except Exception as exc:  # e.g. the forkserver was killed, or no process can be started
            raise RewardFunctionError(f"cannot start a custom-reward worker process ({type(exc).__name__}: "
                                      f"{exc})") from None
        finally:
            child.close()
        return [proc, parent, None, 0.0]  # process, pipe, running index, start time

    def load(self, spec: str, check_signature: bool = False, timeout_s: float = LOAD_TIMEOUT_S) -> Optional[str]:
        """Import `spec` in one worker -> None, or the problem in one line (a module that ends its process or
        hangs while being imported included)."""
        w = self._workers[0]
        try:
            w[1].send((-1, spec, (check_signature,)))
            if w[1].poll(timeout_s):
                return w[1].recv()[1]
            problem = f"importing it did not finish within {timeout_s:g} s"
        except (EOFError, OSError):
            w[0].join(timeout=5)
            problem = f"the process importing it ended (exit code {w[0].exitcode}; sys.exit or os._exit at import?)"
        self._replace(w)
        return f"cannot import custom reward '{spec}': {problem}"

    def map(self, spec: str, items: Sequence[tuple]) -> list[tuple]:
        if self._closed:
            raise RuntimeError("CallPool is closed")
        results: list = [None] * len(items)
        pending = collections.deque(range(len(items)))
        while pending or any(w[2] is not None for w in self._workers):
            for w in self._workers:
                if w[2] is None and pending:
                    i = pending.popleft()
                    try:
                        w[1].send((i, spec, items[i]))
                    except (BrokenPipeError, OSError):
                        pending.appendleft(i)
                        self._replace(w)
                        continue
                    w[2], w[3] = i, time.monotonic()
            busy = [w for w in self._workers if w[2] is not None]
            if not busy:
                continue
            wait_s = max(0.0, min(w[3] for w in busy) + self.timeout_s - time.monotonic())
            ready = set(wait([w[1] for w in busy], timeout=wait_s))
            for w in busy:
                if w[1] in ready:
                    try:
                        index, result = w[1].recv()
                        results[index] = result
                        w[2] = None
                        continue
                    except (EOFError, OSError):
                        w[0].join(timeout=5)
                        reason = (f"the function ended its worker process (exit code {w[0].exitcode}); a reward "
                                  f"function must return a score, not exit")
                elif time.monotonic() >= w[3] + self.timeout_s:
                    reason = f"timeout: killed after reward.verifier_timeout_s={self.timeout_s:g}s"
                else:
                    continue
                results[w[2]] = ("error", reason, {})
                self._replace(w)
        return results

    def _replace(self, w) -> None:
        _kill_worker(w[0])
        w[0].join(timeout=5)
        w[1].close()
        w[:] = self._spawn()
        self.restarts += 1

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for w in self._workers:
            try:
                w[1].send(None)
            except Exception:
                pass
        for w in self._workers:
            w[0].join(timeout=2)
            _kill_worker(w[0])  # and anything its function forked and left running
            w[0].join(timeout=2)
            w[1].close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def custom_specs(cfg) -> dict[str, str]:
    """{custom spec: the config key naming it} of a config (built-in scorers left out)."""
    r = cfg.reward
    found: dict[str, str] = {}
    for key, spec in [("reward.custom_function", r.custom_function), ("reward.default", r.default),
                      *((f"reward.by_source.{k}", v) for k, v in r.by_source.items())]:
        if spec and spec not in BUILTIN_SCORERS:
            found.setdefault(spec, key)
    return found


def check_custom_functions(cfg, pool: Optional[CallPool] = None, check_signature: bool = True) -> None:
    """Import every custom reward function of `cfg` in a worker process (a throwaway one unless `pool` is
    given) and check it takes verl's arguments; RewardFunctionError naming the key on the first problem."""
    specs = custom_specs(cfg)
    if not specs:
        return
    own = pool is None
    pool = pool or CallPool(1, cfg.reward.verifier_timeout_s)
    try:
        for spec, key in specs.items():
            problem = pool.load(spec, check_signature)
            if problem:
                raise RewardFunctionError(f"config key '{key}': {problem}")
    finally:
        if own:
            pool.close()


# ----------------------------------------------------------------------------------------- the scorer

@dataclass
class ScoreResult:
    """One scored response. `score` is None for verifier-scored rows (their reward comes from `correct` and the
    format/overlong terms), else the reward before overlong shaping."""

    correct: bool
    answer: Optional[str]
    canonical: Optional[str]
    reason: str
    scorer: str = "math"
    data_source: str = ""
    score: Optional[float] = None
    extras: dict = field(default_factory=dict)
    error: bool = False


class Scorer:
    """Verifies responses (in-process or in a pool of killable workers) and turns results into rewards.
    Prompts without a gold answer get the group's majority canonical answer as pseudo-gold (TTRL).

    Correctness accepts a bare short response as the answer (reward.bare_answer_max_chars); the format
    reward and TTRL votes count only answers stated explicitly (\\boxed{} or "the answer is"), so a
    short piece of junk neither earns the format reward nor votes for a pseudo-label.

    Each row goes to the scorer of its data_source (reward.by_source), else reward.custom_function, else
    reward.default. `rewards()` also accumulates the metrics `take_metrics()` returns.
    """

    def __init__(self, cfg):
        from grpo_core.rewards import RewardSettings
        from grpo_core.verify import ExtractConfig
        from grpo_core.verify.api import VerifyConfig

        self.cfg = cfg
        r = cfg.reward
        self.settings = RewardSettings.from_config(r, cfg.rollout.max_new_tokens)
        self.verify_config = VerifyConfig(extract=ExtractConfig(bare_max_chars=r.bare_answer_max_chars))
        self.explicit_config = VerifyConfig(extract=ExtractConfig(bare_max_chars=0, use_final_sentence=False))
        self.default_spec = r.custom_function or r.default
        self.by_source = dict(r.by_source)
        specs = {self.default_spec, *self.by_source.values()}
        self._pool = None
        self._call_pool = None
        if specs - set(BUILTIN_SCORERS):
            # Custom functions run in worker processes only (see the module docstring); the import is checked
            # now, naming the key, not at the first rollout.
            self._call_pool = CallPool(max(1, r.verifier_workers), r.verifier_timeout_s)
            try:
                check_custom_functions(cfg, pool=self._call_pool, check_signature=False)
            except BaseException:
                self._call_pool.close()
                raise
        if r.verifier_workers > 0 and specs & {"math", "ttrl"}:
            from grpo_core.verify.pool import VerifierPool

            self._pool = VerifierPool(workers=r.verifier_workers, timeout_s=r.verifier_timeout_s,
                                      config=self.verify_config)
        self._code_threads = max(1, r.verifier_workers or (os.cpu_count() or 1))
        self._custom_calls = collections.Counter()
        self._custom_ok = collections.Counter()
        self._printed_traceback = False
        self._fatal: Optional[str] = None  # a stop decided on this rank, raised on all ranks by take_metrics
        self._lock = threading.Lock()
        self._reset_stats()

    # ----------------------------------------------------------------------------------- routing
    def scorer_for(self, data_source: str) -> str:
        return self.by_source.get(data_source, self.default_spec)

    def _judge(self, texts: list[str], golds: list[str]) -> list:
        if not texts:
            return []
        if self._pool is not None:
            return self._pool.map(texts, golds)
        from grpo_core.verify.api import judge

        return [judge(t, g, self.verify_config, with_canonical=True) for t, g in zip(texts, golds)]

    def score(self, texts: list[str], golds: list[Optional[str]], group_ids: list[int],
              rows: Optional[Sequence[Any]] = None) -> list[ScoreResult]:
        """Score each response. `rows` (the data Samples, one per response) give data_source, the raw gold
        and extra_info for routing and custom functions; without them every response uses reward.default."""
        n = len(texts)
        if len(golds) != n or len(group_ids) != n or (rows is not None and len(rows) != n):
            raise ValueError(f"Scorer.score needs one gold, group id and row per response ({n} texts)")
        sources = [getattr(r, "data_source", "") or "" for r in rows] if rows is not None else [""] * n
        kinds = [self.scorer_for(s) if rows is not None else self.default_spec for s in sources]
        results: list[Optional[ScoreResult]] = [None] * n
        by_kind: dict[str, list[int]] = collections.defaultdict(list)
        for i, k in enumerate(kinds):
            by_kind[k].append(i)
        for kind, idx in by_kind.items():
            if kind in ("math", "ttrl"):
                self._score_verified(kind, idx, texts, golds, group_ids, results)
            elif kind == "code":
                self._score_code(idx, texts, [self._gold(rows, golds, i) for i in idx], results)
            else:
                self._score_custom(kind, idx, texts, sources, rows, golds, results)
        for res, src in zip(results, sources):
            res.data_source = src
        return results  # type: ignore[return-value]

    @staticmethod
    def _gold(rows, golds, i):
        if rows is not None and hasattr(rows[i], "gold"):
            return rows[i].gold
        return golds[i]

    @staticmethod
    def _extra_info(rows, i):
        """The row's extra_info dict, None when the row has none (as verl passes it)."""
        if rows is None or not getattr(rows[i], "extra_info_present", True):
            return None
        return getattr(rows[i], "extra_info", None)

    def _score_verified(self, kind, idx, texts, golds, group_ids, results) -> None:
        sub_texts = [texts[i] for i in idx]
        sub_golds = [golds[i] if kind == "math" else None for i in idx]
        if any(g is None for g in sub_golds):
            from grpo_core.rewards import majority_vote_labels
            from grpo_core.verify import canonical_answer

            canon = [canonical_answer(t, self.explicit_config) for t in sub_texts]
            labels = majority_vote_labels(canon, [group_ids[i] for i in idx])
            sub_golds = [g if g is not None else (lab if lab is not None else "") for g, lab in zip(sub_golds, labels)]
        for i, v in zip(idx, self._judge(sub_texts, [g or "" for g in sub_golds])):
            results[i] = ScoreResult(correct=bool(v.correct), answer=v.answer, canonical=v.canonical,
                                     reason=v.reason, scorer=kind)

    def _score_code(self, idx, texts, tests, results) -> None:
        from grpo_core.rewards import code_reward

        timeout = self.cfg.reward.code_timeout_s

        def one(args):
            text, test = args
            try:
                return code_reward(text, test if isinstance(test, str) else _json(test), timeout), None
            except Exception as exc:  # bad tests in the data: an error, scored incorrect
                return 0.0, f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(min(self._code_threads, max(1, len(idx)))) as ex:
            outs = list(ex.map(one, [(texts[i], t) for i, t in zip(idx, tests)]))
        lo, hi = self.settings.incorrect_value, self.settings.correct_value
        for i, (frac, err) in zip(idx, outs):
            if err is not None:
                self._note_error("code", err)
            results[i] = ScoreResult(correct=frac == 1.0, answer=None, canonical=None,
                                     reason="error" if err else ("correct" if frac == 1.0 else "wrong"),
                                     scorer="code", score=lo + (hi - lo) * frac, error=err is not None,
                                     extras={"code_pass_frac": frac})

    def _score_custom(self, spec, idx, texts, sources, rows, golds, results) -> None:
        items = [(sources[i], texts[i], self._gold(rows, golds, i), self._extra_info(rows, i)) for i in idx]
        outs = self._call_pool.map(spec, items)
        acc_key = "acc"
        for i, (status, value, extras) in zip(idx, outs):
            with self._lock:
                self._custom_calls[spec] += 1
            if status == "ok":
                with self._lock:
                    self._custom_ok[spec] += 1
                correct = bool(extras[acc_key]) if acc_key in extras else value >= self.settings.correct_value
                results[i] = ScoreResult(correct=correct, answer=None, canonical=None,
                                         reason="correct" if correct else "wrong", scorer=spec, score=value,
                                         extras=extras)
            else:
                self._note_error(spec, value)
                results[i] = ScoreResult(correct=False, answer=None, canonical=None, reason="error", scorer=spec,
                                         score=self.settings.incorrect_value, error=True)
        if self._custom_ok[spec] == 0 and self._custom_calls[spec] >= self.cfg.reward.custom_error_limit:
            message = (f"custom reward '{spec}' failed on all of its first {self._custom_calls[spec]} calls "
                       f"(reward.custom_error_limit); fix the function (first error printed above)")
            import torch.distributed as dist  # lazy: the worker processes that import this module stay light

            if not (dist.is_initialized() and dist.get_world_size() > 1):
                raise RewardFunctionError(message)
            # Several ranks: stop them together at the next take_metrics() (a collective), never one alone,
            # which would leave the others waiting in the next collective.
            self._fatal = self._fatal or message

    def _note_error(self, spec: str, message: str) -> None:
        with self._lock:
            first = not self._printed_traceback
            self._printed_traceback = True
        if first:
            sep = "\n" if "\n" in message.rstrip() else " "
            print(f"[grpo] reward '{spec}' failed (scored reward.incorrect; counted in reward/errors; this message "
                  f"is printed once):{sep}{message.rstrip()}", file=sys.stderr, flush=True)

    def never_succeeded(self) -> Optional[str]:
        """The stop message when a custom function was called and failed on every call (a run too short to
        reach reward.custom_error_limit must not end as if it had trained), else None."""
        for spec, calls in self._custom_calls.items():
            if calls and not self._custom_ok[spec]:
                return (f"custom reward '{spec}' failed on all of its {calls} calls, so every reward was "
                        f"reward.incorrect and nothing was learned; fix the function (first error printed above)")
        return None

    # ----------------------------------------------------------------------------------- rewards
    def rewards(self, results: list, lengths: list[int], finish_reasons: list[str],
                texts: Optional[list[str]] = None) -> list[float]:
        """Reward per response. The format reward needs the response texts (explicit answer forms)."""
        from grpo_core.rewards import compute_reward_components
        from grpo_core.verify import extract_answer

        if not results:
            return []
        if self.settings.format_value and texts is None:
            raise ValueError("Scorer.rewards needs the response texts when reward.format_reward is set")
        explicit = ([extract_answer(t, self.explicit_config) for t in texts] if self.settings.format_value
                    else [r.answer for r in results])
        parts = compute_reward_components([r.correct for r in results], explicit, lengths, self.settings)
        verified = parts["total"].tolist()
        overlong = parts["overlong"].tolist()
        out = [v if getattr(r, "score", None) is None else r.score + o
               for r, v, o in zip(results, verified, overlong)]
        self._record(results, out)
        return out

    def _reset_stats(self) -> None:
        self._stats = {"errors": 0, "n": 0, "extras": collections.defaultdict(lambda: [0.0, 0]),
                       "sources": collections.defaultdict(lambda: [0.0, 0.0, 0])}

    def _record(self, results, rewards) -> None:
        st = self._stats
        for r, rew in zip(results, rewards):
            st["n"] += 1
            st["errors"] += int(getattr(r, "error", False))
            for k, v in (getattr(r, "extras", None) or {}).items():
                st["extras"][k][0] += v
                st["extras"][k][1] += 1
            src = st["sources"][getattr(r, "data_source", "") or "default"]
            src[0] += rew
            src[1] += float(r.correct)
            src[2] += 1

    def take_metrics(self) -> dict[str, float]:
        """Metrics of the responses rewarded since the last call, summed over ranks (collective when
        distributed: every rank must call it): reward/errors (count), reward/extra/<key> (means), and per
        data source reward/by_source/<src> and accuracy/by_source/<src>."""
        from grpo_core import distributed as gdist

        st = self._stats
        self._reset_stats()
        local = {"errors": st["errors"], "n": st["n"], "extras": {k: list(v) for k, v in st["extras"].items()},
                 "sources": {k: list(v) for k, v in st["sources"].items()}, "fatal": self._fatal}
        parts = gdist.all_gather_objects(local)
        fatal = next((p["fatal"] for p in parts if p.get("fatal")), None)
        if fatal is not None:
            raise RewardFunctionError(fatal)
        total = {"errors": 0, "n": 0, "extras": collections.defaultdict(lambda: [0.0, 0]),
                 "sources": collections.defaultdict(lambda: [0.0, 0.0, 0])}
        for p in parts:
            total["errors"] += p["errors"]
            total["n"] += p["n"]
            for k, (s, c) in p["extras"].items():
                total["extras"][k][0] += s
                total["extras"][k][1] += c
            for k, (s, a, c) in p["sources"].items():
                cur = total["sources"][k]
                cur[0] += s
                cur[1] += a
                cur[2] += c
        if not total["n"]:
            return {}
        out = {"reward/errors": float(total["errors"])}
        for k, (s, c) in sorted(total["extras"].items()):
            out[f"reward/extra/{k}"] = s / c
        if len(total["sources"]) > 1 or self.by_source:
            for k, (s, a, c) in sorted(total["sources"].items()):
                out[f"reward/by_source/{k}"] = s / c
                out[f"accuracy/by_source/{k}"] = a / c
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._call_pool is not None:
            self._call_pool.close()


def _json(value: Any) -> str:
    import json

    return json.dumps(value)
