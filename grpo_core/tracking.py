"""Run outputs on rank 0: metrics.jsonl (one object per step), tensorboard scalars, a progress bar, a PNG."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from grpo_core.errors import naming


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

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="RL steps", unit="step",
                             dynamic_ncols=True)

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
        with naming(self.path), open(self.path, "a", encoding="utf-8") as f:
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


# One panel per quantity: (title, y-axis label, scale applied to the values, [(metric key, legend label)]).
# Fractions of tokens are small (often < 1 %): each gets its own panel, in percent, on its own y range, so
# they never sit flat on zero next to a quantity of order 1. Panels whose keys never appear are left out.
CURVE_PANELS: tuple[tuple[str, str, float, tuple[tuple[str, str], ...]], ...] = (
    ("reward", "mean reward per response", 1.0, (("reward/mean", "train (rollouts)"),)),
    ("accuracy", "fraction correct", 1.0, (("accuracy", "train (rollouts, sampled)"),)),
    ("entropy", "nats per token", 1.0, (("entropy/mean", "policy entropy"),)),
    ("response length", "tokens", 1.0, (("response_len/mean", "mean"), ("response_len/max", "max"))),
    ("clipped tokens", "% of response tokens", 100.0,
     (("clip/low_frac", "ratio < 1 - eps_low"), ("clip/high_frac", "ratio > 1 + eps_high"))),
    ("NSR rescued tokens", "% of response tokens", 100.0, (("nsr/rescue_frac", "rescued"),)),
    ("Hidden-Align", "cosine to group anchor", 1.0, (("hidden_align/cos", "mean cosine"),)),
    ("KL to the old policy", "nats per token", 1.0, (("kl_old/approx", "approx. KL"), ("loss/kl_ref_agg", "KL to ref"))),
    ("gradient norm", "L2 norm (before clipping)", 1.0, (("grad_norm", "grad norm"),)),
    ("step time", "seconds per step", 1.0,
     (("time/rollout_s", "rollout"), ("time/update_s", "update"), ("time/old_logprob_s", "old logprobs"))),
)


def _series(rows: list[dict], key: str, scale: float) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that carry a finite number under key."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v * scale)
    return xs, ys


def curve_figure(rows: list[dict], title: Optional[str] = None):
    """The matplotlib Figure of a run's metric rows (as in metrics.jsonl): one panel per quantity
    (CURVE_PANELS) with its unit on the y axis; held-out accuracy (phase "eval" rows) joins the accuracy
    panel. Each drawn axis carries its panel name as title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in rows if r.get("phase") == "train"]
    evals = [r for r in rows if r.get("phase") == "eval"]
    panels = []
    for name, ylabel, scale, keys in CURVE_PANELS:
        lines = [(label, *_series(train, key, scale)) for key, label in keys]
        if name == "accuracy":
            for key, label in (("accuracy", "held-out (greedy)"), ("accuracy_sampled", "held-out (sampled)")):
                lines.append((label, *_series(evals, key, scale)))
        lines = [ln for ln in lines if ln[1]]
        if lines:
            panels.append((name, ylabel, lines))
    ncols = 3 if len(panels) > 4 else max(1, min(2, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.3 * nrows), squeeze=False)
    for ax, (name, ylabel, lines) in zip(axes.flat, panels):
        for label, xs, ys in lines:
            held_out = label.startswith("held-out")
            ax.plot(xs, ys, "o-" if held_out or len(xs) == 1 else "-", label=label, markersize=4,
                    linewidth=1.8 if held_out else 1.2)
        if name == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if not panels:
        axes.flat[0].set_visible(True)
        axes.flat[0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(metrics_path: str | Path, out_png: str | Path, title: Optional[str] = None) -> None:
    """Write curve_figure() of a metrics.jsonl to a PNG (atomically: temp file, then rename)."""
    import matplotlib.pyplot as plt

    fig = curve_figure(read_metrics(metrics_path), title)
    tmp = Path(str(out_png) + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
