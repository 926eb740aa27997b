"""Benchmark: our verifier vs Math-Verify on benchmarks/verifier_cases.jsonl.

Reports accuracy against the hand-labelled `expected` of every case, per-category agreement, single-process
throughput (items/s on one core) and the slowest call of each verifier, plus our pool's start-up cost and
2-worker throughput. Writes benchmarks/results/bench_verifier_cpu.json and prints a table.

Math-Verify is an optional peer: install it OUTSIDE the project environment, e.g.
    pip install --target /tmp/mv math-verify
    python benchmarks/bench_verifier.py --math-verify-path /tmp/mv
Its directory is appended to sys.path only inside a separate child process (so it cannot shadow the
installed sympy/torch of this process), and every Math-Verify call runs under a hard kill timeout there.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CASES = os.path.join(HERE, "verifier_cases.jsonl")
DEFAULT_OUT = os.path.join(HERE, "results", "bench_verifier_cpu.json")


def load_cases(path: str) -> list[dict]:
    """Read the case file; large hostile responses are stored as repeat recipes and expanded here."""
    cases = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "build" in row:
                prefix, unit, times, suffix = row.pop("build")
                row["response"] = prefix + unit * times + suffix
            if "build2" in row:
                p, u1, n1, mid, u2, n2, s = row.pop("build2")
                row["response"] = p + u1 * n1 + mid + u2 * n2 + s
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

    normal = [c for c in cases if c["category"] != "hostile"]
    responses = [c["response"] for c in normal] * repeats
    golds = [c["gold"] for c in normal] * repeats
    _parse_cached.cache_clear()
    sympy.core.cache.clear_cache()
    t0 = time.perf_counter()
    verify_batch(responses, golds, workers=0)
    in_process = len(responses) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
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


def _mv_child(conn, mv_path: str) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway big-int must not take the machine
    devnull = os.open(os.devnull, os.O_WRONLY)  # Math-Verify logs every timeout to stdout/stderr
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.path.append(mv_path)
    from math_verify import parse, verify

    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        response, gold = msg
        t0 = time.perf_counter()
        try:
            gold_text = gold if "\\boxed" in gold else "$" + gold + "$"
            ok = bool(verify(parse(gold_text), parse(response)))
            reason = "ok"
        except BaseException as exc:  # noqa: BLE001 - report, do not die
            ok, reason = False, f"error:{type(exc).__name__}"
        conn.send((ok, reason, time.perf_counter() - t0))


def run_math_verify(cases: list[dict], mv_path: str, hard_timeout_s: float) -> tuple[list[dict], str]:
    ctx = mp.get_context("spawn")

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_mv_child, args=(child, mv_path), daemon=True)
        proc.start()
        if not parent.poll(120) or parent.recv() != "ready":
            raise RuntimeError("math-verify child failed to start")
        return proc, parent

    proc, conn = start()
    out = []
    for c in cases:
        conn.send((c["response"], c["gold"]))
        t0 = time.perf_counter()
        if conn.poll(hard_timeout_s):
            try:
                ok, reason, seconds = conn.recv()
                out.append({"correct": ok, "reason": reason, "seconds": seconds})
                continue
            except EOFError:
                out.append({"correct": False, "reason": "died", "seconds": time.perf_counter() - t0})
        else:
            out.append({"correct": False, "reason": "hard_timeout", "seconds": time.perf_counter() - t0})
        proc.kill()
        proc.join()
        proc, conn = start()
    conn.send(None)
    proc.join(timeout=5)
    version = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.append({mv_path!r}); import importlib.metadata as m; "
            "print(m.version('math-verify'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out, version


def summarize(cases, results) -> dict:
    n = len(cases)
    acc = sum(r["correct"] == c["expected"] for c, r in zip(cases, results)) / n
    total = sum(r["seconds"] for r in results)
    slowest = max(range(n), key=lambda i: results[i]["seconds"])
    name = cases[slowest].get("name") or cases[slowest]["response"][:60]
    normal = [r["seconds"] for c, r in zip(cases, results) if c["category"] != "hostile"]
    times = sorted(r["seconds"] for r in results)
    return {
        "accuracy": acc,
        "items_per_s_single_core": n / total,
        "items_per_s_single_core_non_hostile": len(normal) / sum(normal),
        "median_ms": 1000 * times[n // 2],
        "p99_ms": 1000 * times[min(n - 1, int(0.99 * n))],
        "total_s": total,
        "slowest_s": results[slowest]["seconds"],
        "slowest_case": f"{cases[slowest]['category']}:{name}",
        "reasons": dict(collections.Counter(r["reason"].split(":")[0] for r in results)),
        "wrong_cases": [
            {
                "category": c["category"],
                "response": (c.get("name") or c["response"])[:120],
                "gold": c["gold"][:80],
                "expected": c["expected"],
            }
            for c, r in zip(cases, results)
            if r["correct"] != c["expected"]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument(
        "--math-verify-path",
        default=os.environ.get("MATH_VERIFY_PATH"),
        help="directory with math-verify installed via pip --target (optional)",
    )
    parser.add_argument("--hard-timeout-s", type=float, default=20.0, help="kill a Math-Verify call after this")
    parser.add_argument("--pool-workers", type=int, default=2)
    parser.add_argument("--pool-repeats", type=int, default=3)
    args = parser.parse_args()

    import sympy

    cases = load_cases(args.cases)
    from grpo_core.verify.api import _parse_cached

    run_ours(cases)  # warm-up pass: sympy's lazy imports / first-use costs are not billed to a case
    _parse_cached.cache_clear()  # but measure without our parse cache hits from the warm-up ...
    sympy.core.cache.clear_cache()  # ... and without sympy's own cache of the warm-up's expressions
    ours = run_ours(cases)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "sympy": sympy.__version__,
        },
        "commit": _commit(),
        "n_cases": len(cases),
        "ours": summarize(cases, ours),
        "ours_pool": pool_throughput(cases, args.pool_workers, args.pool_repeats),
    }
    mv = None
    if args.math_verify_path:
        mv, version = run_math_verify(cases, args.math_verify_path, args.hard_timeout_s)
        report["math_verify"] = summarize(cases, mv)
        report["math_verify"]["version"] = version
    report["by_category"] = _by_category(cases, ours, mv)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    _print(report)


def _by_category(cases, ours, mv) -> dict:
    table = collections.OrderedDict()
    for i, c in enumerate(cases):
        row = table.setdefault(c["category"], {"n": 0, "ours_ok": 0, "mv_ok": 0, "agree": 0})
        row["n"] += 1
        row["ours_ok"] += ours[i]["correct"] == c["expected"]
        if mv is not None:
            row["mv_ok"] += mv[i]["correct"] == c["expected"]
            row["agree"] += mv[i]["correct"] == ours[i]["correct"]
    return table


def _print(report: dict) -> None:
    has_mv = "math_verify" in report
    print(
        f"machine: {report['machine']['processor']} ({report['machine']['cores']} cores), "
        f"python {report['machine']['python']}, sympy {report['machine']['sympy']}"
    )
    print(f"{'category':<12}{'n':>5}{'ours acc':>10}" + (f"{'MV acc':>10}{'agree':>8}" if has_mv else ""))
    for cat, row in report["by_category"].items():
        line = f"{cat:<12}{row['n']:>5}{row['ours_ok'] / row['n']:>10.2f}"
        if has_mv:
            line += f"{row['mv_ok'] / row['n']:>10.2f}{row['agree'] / row['n']:>8.2f}"
        print(line)
    for key in ("ours", "math_verify"):
        if key in report:
            s = report[key]
            print(
                f"{key:<12} accuracy {s['accuracy']:.3f}  {s['items_per_s_single_core']:.1f} items/s (1 core, all), "
                f"{s['items_per_s_single_core_non_hostile']:.1f} items/s (non-hostile)  median {s['median_ms']:.2f} ms  "
                f"p99 {s['p99_ms']:.0f} ms  slowest {s['slowest_s'] * 1000:.0f} ms [{s['slowest_case']}]"
            )
            print(f"{'':<12} reasons {s['reasons']}")
    p = report["ours_pool"]
    print(
        f"ours pool    {p['workers']} workers: start-up {p['startup_s']:.2f} s, respawn {p['respawn_s']:.2f} s, {p['items_per_s']:.0f} items/s "
        f"(in-process with canonical: {p['in_process_items_per_s']:.0f} items/s; {p['items']} non-hostile items)"
    )


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
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE, check=True
        ).stdout.strip()
    except Exception:
        return None


if __name__ == "__main__":
    main()
