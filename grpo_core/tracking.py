"""Run outputs on rank 0: metrics.jsonl (one object per step), tensorboard scalars, a progress bar, a PNG."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional


class MetricsLogger:
    """Writes every step's flat metrics dict to `<output_dir>/metrics.jsonl` and tensorboard (rank 0 only)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, tensorboard: bool, progress_bar: bool,
                 total_steps: int, initial_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if initial_step == 0 and self.path.exists():
            self.path.unlink()
        elif initial_step > 0 and self.path.exists():
            self._truncate_after(initial_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tb"), purge_step=initial_step or None)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="grpo", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows a killed run wrote after its last checkpoint, so the file reads as one run."""
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", -1) <= step or row.get("phase") == "eval" and row.get("step", -1) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict, *, phase: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "phase": phase, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k if phase == "train" else f"{phase}/{k}", v, step)
            self._tb.flush()
        if self._bar is not None and phase == "train":
            self._bar.update(1)
            shown = {k: metrics[k] for k in ("reward/mean", "accuracy", "entropy/mean") if k in metrics}
            self._bar.set_postfix({k.split("/")[0]: f"{v:.3f}" for k, v in shown.items()})

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def plot_curves(metrics_path: str | Path, out_png: str | Path, title: Optional[str] = None) -> None:
    """PNG of train reward/accuracy per step with held-out accuracy points on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("phase") == "train"]
    evals = [r for r in rows if r.get("phase") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    for key, label in (("reward/mean", "train reward"), ("accuracy", "train accuracy")):
        axes[0].plot(steps, [r.get(key) for r in train], label=label)
    if evals:
        axes[0].plot([r["step"] for r in evals], [r.get("accuracy") for r in evals], "o-", label="held-out accuracy")
    axes[0].set_xlabel("RL step")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    for key in ("entropy/mean", "clip/high_frac", "nsr/rescue_frac"):
        if any(key in r for r in train):
            axes[1].plot(steps, [r.get(key) for r in train], label=key)
    axes[1].set_xlabel("RL step")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(str(out_png) + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
