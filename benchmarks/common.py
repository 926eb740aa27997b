"""Shared benchmark utilities: machine/version/commit info, timing, peak memory, JSON rows, readable tables
and PNG plots. Used by every benchmarks/bench_<op>.py.

Timing and memory take a `device` ("cuda" by default): on CUDA, CUDA events and the allocator's peak
statistics; on "cpu" (a smoke test of a script, not a number to report), time.perf_counter and no memory
measurement (peak is None).
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
OOM = "OOM"


def git_commit() -> str:
    """HEAD commit of the repository ('+dirty' when the tree has changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_kernel_bench(bench: str, args, triton_providers: list[str]) -> dict | None:
    """Checks that a kernel benchmark can run on args.device and returns its meta (machine, versions, args),
    or prints why not to stderr and returns None. On CPU, Triton providers need TRITON_INTERPRET=1 set
    before python starts (grpo_kernels is imported at start-up), and memory is not measured."""
    problem = None
    if args.device == "cuda" and not torch.cuda.is_available():
        problem = f"bench_{bench}: --device cuda but no CUDA GPU is visible (use --device cpu for a smoke test)"
    elif args.device == "cpu" and triton_providers and os.environ.get("TRITON_INTERPRET") != "1":
        problem = (f"bench_{bench}: providers {' '.join(triton_providers)} run Triton kernels, which on CPU need "
                   "TRITON_INTERPRET=1 in the environment before python starts (grpo_kernels is imported at "
                   "start-up); set it, or leave those providers out")
    if problem:
        print(problem, file=sys.stderr)
        return None
    meta = machine_info(args.device)
    meta.update(bench=bench, args={k: str(v) for k, v in vars(args).items()})
    if args.device == "cpu":
        meta["memory"] = "not measured on cpu: peak and extra memory are None"
        meta["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return meta


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict:
    """Everything a benchmark number needs next to it: device, GPU, CPU, versions, commit, time.

    device: "cuda" or "cpu", the device the numbers are measured on (default: cuda when available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "host": platform.node(),
        "commit": git_commit(),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return info


def free_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_time_ms(fn: Callable[[object], object], setup: Callable[[], object] | None = None,
                 warmup: int = 2, reps: int = 10) -> float:
    """Median milliseconds of fn(state), timed with CUDA events; setup() (untimed) builds state each rep."""
    for _ in range(warmup):
        fn(setup() if setup else None)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        state = setup() if setup else None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        del state
    return statistics.median(times)


def cpu_time_ms(fn: Callable[[object], object], setup: Callable[[], object] | None = None,
                warmup: int = 2, reps: int = 10) -> float:
    """Median milliseconds of fn(state) on CPU, timed with time.perf_counter; setup() is untimed."""
    for _ in range(warmup):
        fn(setup() if setup else None)
    times = []
    for _ in range(reps):
        state = setup() if setup else None
        start = time.perf_counter()
        fn(state)
        times.append((time.perf_counter() - start) * 1e3)
        del state
    return statistics.median(times)


def time_ms(fn: Callable[[object], object], setup: Callable[[], object] | None = None, warmup: int = 2,
            reps: int = 10, device: str = "cuda") -> float:
    """Median milliseconds of fn(state) on `device` ("cuda": CUDA events; "cpu": perf_counter)."""
    timer = cuda_time_ms if device == "cuda" else cpu_time_ms
    return timer(fn, setup, warmup=warmup, reps=reps)


def peak_memory_bytes(fn: Callable[[object], object], setup: Callable[[], object] | None = None) -> int:
    """Peak CUDA memory allocated by fn(state) beyond what was allocated before it started."""
    state = setup() if setup else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del state
    return peak


def measure(fn, setup=None, warmup: int = 2, reps: int = 10,
            device: str = "cuda") -> tuple[float | str, float | str | None]:
    """(median ms, peak extra MiB), or (OOM, OOM) if the GPU ran out of memory.

    One untimed call runs first, so one-time work (Triton JIT and autotuning, torch.compile, cuBLAS
    workspaces) is neither in the peak nor in the time. On "cpu" the peak is None (not measured)."""
    try:
        fn(setup() if setup else None)
        peak = peak_memory_bytes(fn, setup) / 2**20 if device == "cuda" else None
        ms = time_ms(fn, setup, warmup=warmup, reps=reps, device=device)
        return ms, peak
    except torch.cuda.OutOfMemoryError:
        return OOM, OOM
    finally:
        free_cuda_memory()


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype = torch.bfloat16, reps: int = 10,
                  device: str = "cuda") -> float:
    """Measured dense GEMM rate [m, k] x [k, n] in TFLOP/s with plain torch.matmul (the roofline)."""
    lhs = torch.randn(m, k, device=device, dtype=dtype)
    rhs = torch.randn(k, n, device=device, dtype=dtype)
    ms = time_ms(lambda _: torch.matmul(lhs, rhs), warmup=3, reps=reps, device=device)
    return 2.0 * m * k * n / (ms * 1e-3) / 1e12


def device_label(meta: dict) -> str:
    """Short name of the measured device for titles and file names: the GPU, or 'cpu'."""
    return meta.get("gpu") if meta.get("device", "cuda") == "cuda" and meta.get("gpu") else "cpu"


def write_json(name: str, meta: dict, rows: Sequence[dict], out_dir: Path = RESULTS_DIR) -> Path:
    """Write {meta, rows} to out_dir/<name>_<gpu>_<time>.json and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = device_label(meta).replace(" ", "_").replace("/", "_")
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    path = out_dir / f"{name}_{gpu}_{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=1))
    return path


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Fixed-width text table; floats with 3 significant decimals."""

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "-" if value is None else str(value)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda items: "  ".join(s.rjust(w) for s, w in zip(items, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def plot_bars(rows: Sequence[dict], path: Path, *, group_key: Callable[[dict], str], series: Iterable[str],
              series_key: str, value_key: str, ylabel: str, title: str) -> Path:
    """Grouped bar chart (one group per shape, one bar per provider), OOM bars left empty and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(series)
    groups = list(dict.fromkeys(group_key(r) for r in rows))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(series)) * 0.5), 4.5))
    for j, name in enumerate(series):
        for i, group in enumerate(groups):
            match = [r for r in rows if group_key(r) == group and r[series_key] == name]
            if not match:
                continue
            value = match[0][value_key]
            x = i + (j - (len(series) - 1) / 2) * width
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                ax.bar(x, value, width, color=f"C{j}", label=name)
            else:  # OOM, or None (not measured)
                ax.text(x, 0, "n/a" if value is None else str(value), rotation=90, ha="center", va="bottom",
                        fontsize=7, color=f"C{j}")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if uniq:  # every bar may be OOM
        ax.legend(list(uniq.values()), list(uniq.keys()), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
