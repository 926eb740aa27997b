"""Benchmark: our verifier vs Math-Verify, per class, side by side in one run.

Cases: tests/verifier_corpus/cases.jsonl (hand-written, by class: final_sentence, delimiters, multi_answer,
inequality, equation, matrix, number_format, precision, expression, long_nesting, basic, long_decimal,
labelled_parts, ordered_tuple, trailing_text, angle_units, markup_edge, interval_abs; each both ways) and
benchmarks/verifier_cases.jsonl (the older set: per-category basics, natural outputs, hostile inputs; its
classes are reported as ``bench/<category>``). Every case has a hand label ``expected``.

Per class and overall, for each verifier: accuracy against the labels, false positives (a must-not-match case
scored correct: reward hacking), timeouts, and single-core throughput (items/s of one process calling the
verifier sequentially; the slowest single call too). Plus our pool's start-up cost and 2-worker throughput.
Writes benchmarks/results/bench_verifier_cpu.json and a markdown table next to it, and prints the table.

Math-Verify is an optional peer that must not change this environment's sympy. Either
    python -m venv --system-site-packages /work/venv-mv && /work/venv-mv/bin/pip install math-verify
    python benchmarks/bench_verifier.py --math-verify-python /work/venv-mv/bin/python
or a ``pip install --target DIR math-verify`` directory via ``--math-verify-path DIR``. Math-Verify runs in a
separate child process (that interpreter), one call at a time under a hard kill timeout; its own 5 s
timeouts count as timeouts. Ours runs in this process with its default in-process guard.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import select
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_CASES = [os.path.join(ROOT, "tests", "verifier_corpus", "cases.jsonl"), os.path.join(HERE, "verifier_cases.jsonl")]
DEFAULT_OUT = os.path.join(HERE, "results", "bench_verifier_cpu.json")

# The Math-Verify child: reads one JSON [response, gold] per line, answers [correct, reason, seconds].
_MV_CHILD = r"""
import json, os, sys, time, resource
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway big-int must not take the machine
extra = os.environ.get("MV_EXTRA_PATH")
if extra:
    sys.path.append(extra)
out = os.fdopen(os.dup(1), "w")
devnull = os.open(os.devnull, os.O_WRONLY)  # Math-Verify logs every timeout to stdout/stderr
os.dup2(devnull, 1)
os.dup2(devnull, 2)
import importlib.metadata
from math_verify import parse, verify
out.write(json.dumps(["ready", importlib.metadata.version("math-verify")]) + "\n")
out.flush()
for line in sys.stdin:
    response, gold = json.loads(line)
    t0 = time.perf_counter()
    try:
        gold_text = gold if "\\boxed" in gold else "$" + gold + "$"
        ok, reason = bool(verify(parse(gold_text), parse(response))), "ok"
    except BaseException as exc:
        ok, reason = False, "error:" + type(exc).__name__
    seconds = time.perf_counter() - t0
    if seconds >= 4.9 and not ok:
        reason = "timeout"  # Math-Verify's own per-step timeout (5 s) fired and it answered False
    out.write(json.dumps([ok, reason, seconds]) + "\n")
    out.flush()
"""


def load_cases(path: str) -> list[dict]:
    """Read a case file; large hostile responses are stored as repeat recipes and expanded here."""
    cases = []
    bench_file = os.path.basename(path) == "verifier_cases.jsonl"
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "build" in row:
                prefix, unit, times, suffix = row.pop("build")
                row["response"] = prefix + unit * times + suffix
            if "build2" in row:
                p, u1, n1, mid, u2, n2, s = row.pop("build2")
                row["response"] = p + u1 * n1 + mid + u2 * n2 + s
            if "class" not in row:
                row["class"] = ("bench/" if bench_file else "") + row.get("category", "other")
            cases.append(row)
    return cases


def run_ours(cases: list[dict]) -> list[dict]:
    from grpo_core.verify import judge

    out = []
    for c in cases:
        t0 = time.perf_counter()
        r = judge(c["response"], c["gold"])
        out.append({"correct": r.correct, "reason": r.reason, "seconds": time.perf_counter() - t0})
    return out


def pool_throughput(cases: list[dict], workers: int, repeats: int) -> dict:
    """verify_batch-style throughput (results include canonical answers) of the pool vs in-process, on the
    non-hostile cases (the 1 MB hostile strings would mostly measure pipe transfer)."""
    import sympy

    from grpo_core.verify import VerifierPool, verify_batch
    from grpo_core.verify.api import _parse_cached

    normal = [c for c in cases if "hostile" not in c["class"] and len(c["response"]) < 20_000]
    responses = [c["response"] for c in normal] * repeats
    golds = [c["gold"] for c in normal] * repeats
    _parse_cached.cache_clear()
    sympy.core.cache.clear_cache()
    t0 = time.perf_counter()
    verify_batch(responses, golds, workers=0)
    in_process = len(responses) / (time.perf_counter() - t0)
    with VerifierPool(workers=workers, timeout_s=2.0) as pool:
        startup = pool.startup_s
        t1 = time.perf_counter()
        pool.map(responses, golds)
        elapsed = time.perf_counter() - t1
        t2 = time.perf_counter()
        pool._workers[0] = pool._replace(pool._workers[0])  # cost of replacing a killed worker
        respawn = time.perf_counter() - t2
    return {
        "workers": workers,
        "startup_s": startup,
        "respawn_s": respawn,
        "items": len(responses),
        "items_per_s": len(responses) / elapsed,
        "in_process_items_per_s": in_process,
    }


class _MathVerifyChild:
    def __init__(self, python: str, extra_path: str | None):
        self.python, self.extra_path = python, extra_path
        self.version = None
        self._start()

    def _start(self):
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the peer must import its own environment, not this checkout
        if self.extra_path:
            env["MV_EXTRA_PATH"] = self.extra_path
        self.proc = subprocess.Popen(
            [self.python, "-c", _MV_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        line = self._readline(180)
        if line is None:
            raise RuntimeError("the Math-Verify child did not start (is math-verify installed for that python?)")
        self.version = json.loads(line)[1]

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line or None

    def judge(self, response: str, gold: str, hard_timeout_s: float) -> dict:
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps([response, gold]) + "\n")
        self.proc.stdin.flush()
        line = self._readline(hard_timeout_s)
        if line is not None:
            ok, reason, seconds = json.loads(line)
            return {"correct": ok, "reason": reason, "seconds": seconds}
        self.proc.kill()
        self.proc.wait()
        self._start()
        return {"correct": False, "reason": "timeout", "seconds": time.perf_counter() - t0}

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def run_math_verify(cases, python, extra_path, hard_timeout_s) -> tuple[list[dict], str]:
    child = _MathVerifyChild(python, extra_path)
    child.judge(r"\boxed{1}", "1", 60)  # warm-up: lazy imports are not billed to a case
    out = [child.judge(c["response"], c["gold"], hard_timeout_s) for c in cases]
    version = child.version
    child.close()
    return out, version


def _stats(cases, results) -> dict:
    n = len(cases)
    total = sum(r["seconds"] for r in results)
    slowest = max(range(n), key=lambda i: results[i]["seconds"])
    return {
        "n": n,
        "accuracy": sum(r["correct"] == c["expected"] for c, r in zip(cases, results)) / n,
        "false_positives": sum(r["correct"] and not c["expected"] for c, r in zip(cases, results)),
        "false_negatives": sum(c["expected"] and not r["correct"] for c, r in zip(cases, results)),
        "timeouts": sum(r["reason"] == "timeout" for r in results),
        "items_per_s_single_core": n / total if total else float("inf"),
        "slowest_s": results[slowest]["seconds"],
        "slowest_case": f"{cases[slowest]['class']}:{(cases[slowest].get('name') or cases[slowest]['response'])[:60]}",
    }


def summarize(cases, results) -> dict:
    s = _stats(cases, results)
    times = sorted(r["seconds"] for r in results)
    s.update({
        "median_ms": 1000 * times[len(times) // 2],
        "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
        "reasons": dict(collections.Counter(r["reason"].split(":")[0] for r in results)),
        "wrong_cases": [
            {"class": c["class"], "response": (c.get("name") or c["response"])[-160:], "gold": c["gold"][:80],
             "expected": c["expected"], "reason": r["reason"]}
            for c, r in zip(cases, results) if r["correct"] != c["expected"]
        ],
    })
    return s


def by_class(cases, ours, mv) -> dict:
    groups = collections.OrderedDict()
    for i, c in enumerate(cases):
        groups.setdefault(c["class"], []).append(i)
    table = collections.OrderedDict()
    for cls, idx in groups.items():
        sub = [cases[i] for i in idx]
        row = {"n": len(idx), "must_match": sum(c["expected"] for c in sub), "ours": _stats(sub, [ours[i] for i in idx])}
        if mv is not None:
            row["math_verify"] = _stats(sub, [mv[i] for i in idx])
            row["agree"] = sum(ours[i]["correct"] == mv[i]["correct"] for i in idx) / len(idx)
        table[cls] = row
    return table


def markdown(report: dict) -> str:
    has_mv = "math_verify" in report
    m = report["machine"]
    lines = [
        f"# Verifier benchmark: ours vs Math-Verify {report.get('math_verify', {}).get('version', '(not run)')}",
        "",
        f"Machine: {m['processor']}, {m['cores']} cores (1-min load average {m.get('load_1min_start', '?')} at the "
        f"start, {m.get('load_1min_end', '?')} at the end: throughput is noisy above about 1 per core), "
        f"Python {m['python']}, sympy {m['sympy']}. Commit {report['commit']}.",
        "Throughput is items/s of ONE process calling the verifier sequentially (one core).",
        "",
        "| class | n | match/no-match | ours acc | ours FP | ours TO | ours items/s"
        + (" | MV acc | MV FP | MV TO | MV items/s |" if has_mv else " |"),
        "|---|---|---|---|---|---|---" + ("|---|---|---|---|" if has_mv else "|"),
    ]
    rows = list(report["by_class"].items()) + [("**all**", {"n": report["n_cases"], "must_match": report["n_must_match"],
                                                           "ours": report["ours"], "math_verify": report.get("math_verify")})]
    for cls, row in rows:
        o = row["ours"]
        line = (f"| {cls} | {row['n']} | {row['must_match']}/{row['n'] - row['must_match']} | {o['accuracy']:.3f} | "
                f"{o['false_positives']} | {o['timeouts']} | {o['items_per_s_single_core']:.0f}")
        if has_mv:
            v = row["math_verify"]
            line += (f" | {v['accuracy']:.3f} | {v['false_positives']} | {v['timeouts']} | "
                     f"{v['items_per_s_single_core']:.1f} |")
        else:
            line += " |"
        lines.append(line)
    o = report["ours"]
    lines += ["", f"Ours: slowest call {o['slowest_s'] * 1000:.0f} ms ({o['slowest_case']}), median {o['median_ms']:.2f} ms."]
    if has_mv:
        v = report["math_verify"]
        lines.append(f"Math-Verify: slowest call {v['slowest_s']:.2f} s ({v['slowest_case']}), median {v['median_ms']:.2f} ms.")
        lines.append(f"Single-core throughput ratio ours / Math-Verify: {report['throughput_ratio']:.0f}x.")
    p = report["ours_pool"]
    lines.append(f"Our pool ({p['workers']} workers): start-up {p['startup_s']:.2f} s, respawn {p['respawn_s']:.2f} s, "
                 f"{p['items_per_s']:.0f} items/s on {p['items']} non-hostile items.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--math-verify-python", default=os.environ.get("MATH_VERIFY_PYTHON"),
                        help="a python interpreter that has math-verify installed (e.g. /work/venv-mv/bin/python)")
    parser.add_argument("--math-verify-path", default=os.environ.get("MATH_VERIFY_PATH"),
                        help="directory with math-verify installed via pip --target (optional)")
    parser.add_argument("--hard-timeout-s", type=float, default=30.0, help="kill a Math-Verify call after this")
    parser.add_argument("--pool-workers", type=int, default=2)
    parser.add_argument("--pool-repeats", type=int, default=2)
    args = parser.parse_args()

    import sympy

    cases = [c for path in args.cases for c in load_cases(path)]
    from grpo_core.verify.api import _parse_cached

    run_ours(cases)  # warm-up pass: sympy's lazy imports / first-use costs are not billed to a case
    _parse_cached.cache_clear()  # but measure without our parse cache hits from the warm-up ...
    sympy.core.cache.clear_cache()  # ... and without sympy's own cache of the warm-up's expressions
    load_start = os.getloadavg()[0]
    ours = run_ours(cases)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "sympy": sympy.__version__,
            "load_1min_start": round(load_start, 2),  # the end's is added once every measurement has run
        },
        "commit": _commit(),
        "case_files": [os.path.relpath(p, ROOT) for p in args.cases],
        "n_cases": len(cases),
        "n_must_match": sum(c["expected"] for c in cases),
        "ours": summarize(cases, ours),
        "ours_pool": pool_throughput(cases, args.pool_workers, args.pool_repeats),
    }
    mv = None
    if args.math_verify_python or args.math_verify_path:
        python = args.math_verify_python or sys.executable
        mv, version = run_math_verify(cases, python, args.math_verify_path, args.hard_timeout_s)
        report["math_verify"] = summarize(cases, mv)
        report["math_verify"]["version"] = version
        report["throughput_ratio"] = (report["ours"]["items_per_s_single_core"]
                                      / report["math_verify"]["items_per_s_single_core"])
    report["by_class"] = by_class(cases, ours, mv)
    report["machine"]["load_1min_end"] = round(os.getloadavg()[0], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(table)
    print(table)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE, check=True
        ).stdout.strip()
    except Exception:
        return None


if __name__ == "__main__":
    main()
