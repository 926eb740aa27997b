"""Throughput of the sandboxed code reward (grpo_core.rewards.code_reward), side by side with a bare
subprocess running the same program and tests without any isolation (the floor a sandbox adds to).

  python benchmarks/bench_code_reward.py [--calls 48] [--threads 1,2,4] [--out benchmarks/results/code_reward_cpu.json]

Programs: a correct one, a wrong one and one that raises (each 1/3 of the calls), all against 3 asserts.
Calls run from a thread pool; the sandbox's own bound (set_max_concurrency) is set to the thread count.
The load average before and after is recorded: on a shared machine the numbers move with the load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, machine_info  # noqa: E402
from grpo_core import sandbox  # noqa: E402
from grpo_core.rewards import code_reward, extract_code  # noqa: E402

TESTS = "assert f(-2) == -4\nassert f(1) == 5\nassert f(5) == 17\n"
PROGRAMS = ["```python\ndef f(x): return x*3+2\n```", "```python\ndef f(x): return x+2\n```",
            "```python\ndef f(x): return x/0\n```"]
EXPECTED = [1.0, 0.0, 0.0]


def bare(response: str, tests: str, timeout_s: float) -> float:
    """No isolation at all: the program and its asserts in one plain subprocess (pass/fail only)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "main.py"
        path.write_text(extract_code(response) + "\n" + tests)
        try:
            rc = subprocess.run([sys.executable, "-I", "-S", "-B", str(path)], capture_output=True,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return 0.0
    return 1.0 if rc == 0 else 0.0


def measure(fn, calls: int, threads: int) -> dict:
    jobs = [PROGRAMS[i % 3] for i in range(calls)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        scores = list(pool.map(lambda r: fn(r, TESTS, 5.0), jobs))
    wall = time.perf_counter() - t0
    ok = all(s == EXPECTED[i % 3] for i, s in enumerate(scores))
    return {"calls": calls, "threads": threads, "wall_s": round(wall, 3), "calls_per_s": round(calls / wall, 2),
            "scores_right": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=48)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "code_reward_cpu.json")
    args = ap.parse_args(argv)
    meta = machine_info("cpu")
    meta["load_avg_before"] = os.getloadavg()
    meta["isolation"] = {"namespaces": hex(sandbox.namespace_flags()), "runs_as_nobody": sandbox.drops_privileges()}
    code_reward(PROGRAMS[0], TESTS)  # probe namespaces, warm the page cache
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        sandbox.set_max_concurrency(threads)
        for name, fn in (("sandboxed code_reward", code_reward), ("bare subprocess (no isolation)", bare)):
            row = measure(fn, args.calls, threads)
            row["runner"] = name
            rows.append(row)
            print(f"{name:32s} threads={threads}: {row['calls_per_s']:6.2f} calls/s "
                  f"({row['calls']} calls in {row['wall_s']:.1f} s, scores right: {row['scores_right']})")
    for threads in sorted({r["threads"] for r in rows}):
        pair = {r["runner"]: r["calls_per_s"] for r in rows if r["threads"] == threads}
        ratio = pair["sandboxed code_reward"] / pair["bare subprocess (no isolation)"]
        print(f"threads={threads}: sandboxed / bare throughput = {ratio:.2f}")
    meta["load_avg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out} (load average before {meta['load_avg_before']}, after {meta['load_avg_after']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
