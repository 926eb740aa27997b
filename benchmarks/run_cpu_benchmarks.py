"""`make bench`: the benchmarks that are meaningful on a CPU-only machine, each as its own subprocess.

    bench_verifier.py           our verifier's accuracy and throughput on verifier_cases.jsonl
                                -> benchmarks/results/bench_verifier_cpu.json
    bench_e2e.py --cpu          end-to-end GRPO steps of the real Trainer on the tiny demo model: phase times,
                                tokens/s, peak RSS -> benchmarks/results/bench_e2e_cpu.json (+ .png)

The kernel benchmarks (bench_logprob_entropy.py, bench_policy_loss.py) and the real-shape end-to-end runs
need a CUDA GPU and are not run here; the ablation study (ablations.py) takes hours on CPU and is run on its
own. Exit status: 0 when every benchmark succeeded, else 1 (the others still run).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def commands(a) -> list[tuple[str, list[str]]]:
    e2e = [sys.executable, str(HERE / "bench_e2e.py"), "--cpu", "--steps", str(a.e2e_steps),
           "--prompts", str(a.e2e_prompts), "--group-size", str(a.e2e_group_size),
           "--max-new-tokens", str(a.e2e_max_new_tokens)]
    verifier = [sys.executable, str(HERE / "bench_verifier.py")]
    jobs = [("bench_verifier", verifier), ("bench_e2e --cpu", e2e)]
    return [(name, cmd) for name, cmd in jobs if name.split()[0] not in a.skip]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", nargs="*", default=[], choices=["bench_verifier", "bench_e2e"])
    p.add_argument("--e2e-steps", type=int, default=4, help="trainer steps (the first is left out of the medians)")
    p.add_argument("--e2e-prompts", type=int, default=8, help="prompt groups per step")
    p.add_argument("--e2e-group-size", type=int, default=8)
    p.add_argument("--e2e-max-new-tokens", type=int, default=24)
    a = p.parse_args(argv)
    failed = []
    for name, cmd in commands(a):
        print(f"==> {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"<== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
