"""Ablations on the CPU demo task: the same recipe (configs/demo_cpu.yaml) under several algorithm settings
and seeds, each a real `python -m grpo_core train` subprocess; then held-out accuracy, entropy, clip and NSR
rescue fraction curves side by side in one PNG and a Markdown table of final numbers (mean ± std over seeds).

Settings (the recipe's other keys unchanged; "baseline" = DAPO: clip-higher, dynamic sampling, token-mean):
    dapo          baseline: NSR off, Hidden-Align off
    nsr           baseline + near-boundary stochastic rescue (scaled rule)
    hidden_align  baseline + Hidden-Align (the recipe's coefficient)
    edas          baseline + error-diversity advantage shaping
    gspo          baseline with GSPO's sequence-level ratio (eps 3e-4 / 4e-4, seq-mean-token-mean)
    drgrpo        baseline with Dr. GRPO advantages and seq-sum-constant aggregation
    demo          the recipe as shipped (NSR + Hidden-Align)

    python benchmarks/ablations.py --seeds 0 1 2                               # the full study (hours on CPU)
    python benchmarks/ablations.py --configs dapo gspo --seeds 0 --max-steps 2 \
        --warm-start-steps 10 --set trainer.eval_max_prompts=20                 # a smoke test (a minute or two)
    python benchmarks/ablations.py --report-only                               # redraw from finished runs

Runs go to --runs-dir/<config>/seed<k>/ (metrics.jsonl, summary.json; the console in seed<k>.train.log beside it); a
run whose summary.json exists is reused unless --rerun, which passes `--force` so the trainer archives the old run
into previous-<time>/ (nothing is deleted). Outputs: ablations.png, ablations.md and ablations.json in --out-dir.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info  # noqa: E402

RECIPE = REPO_ROOT / "configs" / "demo_cpu.yaml"
# "off" is quoted: --set values are parsed as YAML, where a bare off is the boolean false.
BASELINE = ["algorithm.nsr='off'", "algorithm.hidden_align_coef=0"]
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "dapo": ("DAPO baseline", BASELINE),
    "nsr": ("+NSR", ["algorithm.nsr=scaled", "algorithm.hidden_align_coef=0"]),
    "hidden_align": ("+Hidden-Align", ["algorithm.nsr='off'"]),
    "edas": ("+EDAS", BASELINE + ["algorithm.edas=true"]),
    "gspo": ("GSPO", BASELINE + ["algorithm.policy_loss=gspo", "algorithm.eps_low=3e-4", "algorithm.eps_high=4e-4",
                                 "algorithm.loss_agg=seq-mean-token-mean"]),
    "drgrpo": ("Dr.GRPO", BASELINE + ["algorithm.advantage=drgrpo", "algorithm.loss_agg=seq-sum-constant"]),
    "demo": ("demo (NSR + Hidden-Align)", []),
}
DEFAULT_CONFIGS = ["dapo", "nsr", "hidden_align", "edas", "gspo", "drgrpo"]


def _updated(read: Callable[[dict], Optional[float]]) -> Callable[[dict], Optional[float]]:
    """Update-side metrics are undefined on a step that trained on no group (dynamic sampling kept none; the
    trainer then logs 0 for them): read them as missing there."""
    return lambda row: None if row.get("groups/kept", 1.0) == 0 else read(row)


def _clip_frac(row: dict) -> Optional[float]:
    if "clip/low_frac" not in row and "clip/high_frac" not in row:
        return None
    return row.get("clip/low_frac", 0.0) + row.get("clip/high_frac", 0.0)


# name -> (phase of the metrics.jsonl rows, how to read the value, axis label)
CURVES: dict[str, tuple[str, Callable[[dict], Optional[float]], str]] = {
    "eval_accuracy": ("eval", lambda r: r.get("accuracy"), "held-out accuracy (greedy)"),
    "entropy": ("train", _updated(lambda r: r.get("entropy/mean")), "token entropy (nats)"),
    "clip_frac": ("train", _updated(_clip_frac), "clipped token fraction (low + high)"),
    "rescue_frac": ("train", _updated(lambda r: r.get("nsr/rescue_frac")), "NSR rescued token fraction"),
}


# --------------------------------------------------------------------------------------------- running

def train_command(config: str, seed: int, run_dir: Path, a) -> list[str]:
    """The `python -m grpo_core train` command line of one (config, seed) run."""
    if config not in CONFIGS:
        raise ValueError(f"unknown ablation config {config!r}; known: {', '.join(CONFIGS)}")
    sets = [f"trainer.output_dir={run_dir}", f"trainer.seed={seed}", "logging.progress_bar=false",
            "logging.tensorboard=false", "logging.plot=false", *CONFIGS[config][1]]
    if a.max_steps is not None:
        sets.append(f"trainer.max_steps={a.max_steps}")
    if a.warm_start_steps is not None:
        sets.append(f"warm_start.steps={a.warm_start_steps}")
    if a.eval_every is not None:
        sets.append(f"trainer.eval_every={a.eval_every}")
    sets += list(a.set)
    cmd = [sys.executable, "-m", "grpo_core", "train", str(a.recipe)]
    if run_dir.is_dir() and any(run_dir.iterdir()):  # a rerun, or a run that failed: archive it, never delete
        cmd.append("--force")
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_log(run_dir: Path) -> Path:
    """Where a run's console output goes."""
    return run_dir.with_name(f"{run_dir.name}.train.log")


def run_all(a) -> dict[str, dict[int, Path]]:
    """Run every missing (config, seed), up to a.jobs at a time; returns {config: {seed: run_dir}}."""
    runs = {c: {s: Path(a.runs_dir) / c / f"seed{s}" for s in a.seeds} for c in a.configs}
    todo = [(c, s, d) for c, by_seed in runs.items() for s, d in by_seed.items()
            if a.rerun or not (d / "summary.json").exists()]
    running: list[tuple[str, int, subprocess.Popen, float, Path]] = []
    failed = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while todo or running:
        while todo and len(running) < a.jobs:
            c, s, d = todo.pop(0)
            d.parent.mkdir(parents=True, exist_ok=True)
            # the log sits beside the run dir: an archived rerun (--force) must not move the live log
            log = open(run_log(d), "w", encoding="utf-8")
            print(f"[ablations] start {c} seed {s} -> {d}", flush=True)
            proc = subprocess.Popen(train_command(c, s, d, a), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                    env=env)
            log.close()
            running.append((c, s, proc, time.time(), d))
        time.sleep(1.0)
        for item in list(running):
            c, s, proc, t0, d = item
            if proc.poll() is None:
                continue
            running.remove(item)
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {run_log(d)})"
            print(f"[ablations] {c} seed {s}: {status} in {time.time() - t0:.0f} s", flush=True)
            if proc.returncode != 0:
                failed.append((c, s))
    if failed:
        print(f"[ablations] failed runs: {failed}", file=sys.stderr)
    return runs


# --------------------------------------------------------------------------------------------- analysis

def load_run(run_dir: Path) -> dict:
    """{"train": [rows], "eval": [rows], "summary": dict | None} of one finished (or partial) run."""
    rows = []
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    summary_path = Path(run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    return {"train": [r for r in rows if r.get("phase", "train") == "train"],
            "eval": [r for r in rows if r.get("phase") == "eval"], "summary": summary}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std (0 for one value), count) of the finite values; (nan, nan, 0) for none."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def curve(seed_runs: list[dict], name: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std across seeds of one curve, per step (steps where at least one seed has a finite value)."""
    phase, read, _ = CURVES[name]
    by_step: dict[int, list[float]] = {}
    for run in seed_runs:
        for row in run[phase]:
            v = read(row)
            if _finite(v):
                by_step.setdefault(int(row["step"]), []).append(float(v))
    steps = sorted(by_step)
    stats = [mean_std(by_step[s]) for s in steps]
    return steps, [m for m, _, _ in stats], [sd for _, sd, _ in stats]


def _tail_mean(rows: list[dict], read: Callable[[dict], Optional[float]], tail: int) -> float:
    vals = [float(v) for v in (read(r) for r in rows) if _finite(v)]
    return statistics.fmean(vals[-tail:]) if vals else math.nan


def final_numbers(seed_runs: list[dict], tail: int = 5) -> dict[str, tuple[float, float, int]]:
    """Per metric (mean, std, seeds) across seeds: held-out accuracy before RL (the step-0 eval) and at the end
    (the last eval), its gain, and the train metrics averaged over each run's last `tail` steps."""
    per_seed: dict[str, list[float]] = {k: [] for k in ("eval_before", "eval_final", "eval_gain", "reward", "entropy",
                                                         "clip_frac", "rescue_frac", "wall_s")}
    for run in seed_runs:
        evals = [r for r in run["eval"] if _finite(r.get("accuracy"))]
        before = next((r["accuracy"] for r in evals if r["step"] == 0), math.nan)
        final = evals[-1]["accuracy"] if evals and evals[-1]["step"] > 0 else math.nan
        per_seed["eval_before"].append(before)
        per_seed["eval_final"].append(final)
        per_seed["eval_gain"].append(final - before)
        per_seed["reward"].append(_tail_mean(run["train"], lambda r: r.get("reward/mean"), tail))
        for key in ("entropy", "clip_frac", "rescue_frac"):
            per_seed[key].append(_tail_mean(run["train"], CURVES[key][1], tail))
        per_seed["wall_s"].append((run["summary"] or {}).get("wall_seconds", math.nan))
    return {k: mean_std(v) for k, v in per_seed.items()}


TABLE_COLUMNS = [("eval_before", "held-out acc. before RL", 3), ("eval_final", "held-out acc. after RL", 3),
                 ("eval_gain", "gain", 3), ("reward", "train reward (last steps)", 3),
                 ("entropy", "entropy", 3), ("clip_frac", "clip frac.", 4), ("rescue_frac", "rescue frac.", 4),
                 ("wall_s", "wall s", 0)]


def _fmt(stat: tuple[float, float, int], digits: int) -> str:
    mean, std, n = stat
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(finals: dict[str, dict], labels: dict[str, str], tail: int = 5) -> str:
    """One row per config: mean ± sample std across seeds (just the mean for a single seed)."""
    head = ["config", "seeds", *(title for _, title, _ in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for config, stats in finals.items():
        seeds = max(n for _, _, n in stats.values())
        cells = [labels.get(config, config), str(seeds), *(_fmt(stats[k], d) for k, _, d in TABLE_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Train metrics are each run's mean over its last {tail} steps; ± is the sample standard "
                 "deviation across seeds.")
    return "\n".join(lines) + "\n"


def plot_ablation(runs: dict[str, list[dict]], labels: dict[str, str], path: Path, title: str = "") -> Path:
    """One panel per curve in CURVES, one line (mean across seeds, ±std band) per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.8))
    for ax, (name, (_, _, ylabel)) in zip(axes, CURVES.items()):
        for j, (config, seed_runs) in enumerate(runs.items()):
            steps, mean, std = curve(seed_runs, name)
            if not steps:
                continue
            style = "o-" if name == "eval_accuracy" else "-"
            ax.plot(steps, mean, style, color=f"C{j}", label=labels.get(config, config), lw=1.4, ms=3)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=f"C{j}", alpha=0.15, lw=0)
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_safe(stats: dict[str, tuple[float, float, int]]) -> dict:
    """{metric: {"mean", "std", "seeds"}} with NaN (no value) written as null, so the file is strict JSON."""
    clean = lambda v: v if math.isfinite(v) else None  # noqa: E731
    return {k: {"mean": clean(m), "std": clean(sd), "seeds": n} for k, (m, sd, n) in stats.items()}


def report(runs_dirs: dict[str, dict[int, Path]], out_dir: Path, tail: int, meta: dict) -> dict:
    runs = {c: [load_run(d) for _, d in sorted(by_seed.items()) if (d / "metrics.jsonl").exists()]
            for c, by_seed in runs_dirs.items()}
    runs = {c: r for c, r in runs.items() if r}
    if not runs:
        raise SystemExit("ablations: no finished runs to report (no metrics.jsonl under the runs directory)")
    labels = {c: CONFIGS[c][0] if c in CONFIGS else c for c in runs}
    finals = {c: final_numbers(r, tail) for c, r in runs.items()}
    machine = meta.get("gpu") or meta.get("cpu_model") or "cpu"
    title = f"grpo-core ablations on the CPU demo task ({machine}, commit {meta['commit'][:12]})"
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_ablation(runs, labels, out_dir / "ablations.png", title)
    table = markdown_table(finals, labels, tail)
    (out_dir / "ablations.md").write_text(f"**{title}**\n\n{table}", encoding="utf-8")
    (out_dir / "ablations.json").write_text(json.dumps(
        {"meta": meta, "configs": {c: {"label": labels[c], "overrides": CONFIGS.get(c, ("", []))[1],
                                       "seeds": sorted(runs_dirs[c]), "final": _json_safe(finals[c])}
                              for c in runs}},
        indent=1), encoding="utf-8")
    print(table)
    print(f"wrote {png}, {out_dir / 'ablations.md'} and {out_dir / 'ablations.json'}")
    return finals


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=sorted(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--recipe", default=str(RECIPE), help="base YAML recipe")
    p.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps (shrink for a smoke test)")
    p.add_argument("--warm-start-steps", type=int, default=None, help="override warm_start.steps")
    p.add_argument("--eval-every", type=int, default=None, help="override trainer.eval_every")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each trainer uses all cores it is given)")
    p.add_argument("--tail", type=int, default=5, help="train metrics in the table: mean over the last N steps")
    p.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "ablations"))
    p.add_argument("--out-dir", default=str(RESULTS_DIR / "ablations"))
    p.add_argument("--rerun", action="store_true", help="rerun runs that already have a summary.json")
    p.add_argument("--report-only", action="store_true", help="do not train; report what is in --runs-dir")
    a = p.parse_args(argv)
    if a.jobs < 1 or a.tail < 1:
        p.error("--jobs and --tail must be >= 1")
    if a.max_steps is not None and a.max_steps < 1:
        p.error("--max-steps must be >= 1")
    if not Path(a.recipe).is_file():
        p.error(f"--recipe {a.recipe} does not exist")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report_only:
        runs = {c: {s: Path(a.runs_dir) / c / f"seed{s}" for s in a.seeds} for c in a.configs}
    else:
        runs = run_all(a)
    meta = machine_info()
    from benchmarks.bench_e2e import cpu_model

    meta.update({"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "recipe": str(a.recipe),
                 "argv": list(sys.argv[1:] if argv is None else argv)})
    report(runs, Path(a.out_dir), a.tail, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
