"""What a run tells its user up front: the run header (what will happen: phases and steps) and the run's
provenance (library versions, threads, git commit, seed), which also goes into summary.json.

Provenance matters because the numbers do: on CPU the result of a seeded run depends on the float
reduction order, which the intra-op thread count (torch.get_num_threads(), OMP_NUM_THREADS) and the library
versions set; a run is reproduced bit for bit only with the same values of everything listed here.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from grpo_core.config import Config

_REPO = Path(__file__).resolve().parents[1]


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(repo: Path = _REPO) -> Optional[str]:
    """The commit of the grpo-core checkout this code runs from, "+dirty" when tracked files differ from it;
    None when it is not a git checkout (an installed wheel) or git is missing."""
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def provenance(cfg: Config, world_size: Optional[int] = None) -> dict:
    """Everything besides the config that a seeded run's numbers depend on (JSON-serialisable)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "grpo_core_version": _version("grpo-core"),
        "git_commit": git_commit(),
        "seed": cfg.trainer.seed,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "torch_num_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "gpu": gpu,
        "world_size": world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1),
        "platform": platform.platform(),
    }


def run_plan(cfg: Config, resume: str = "none") -> list[str]:
    """The phases the run will go through, in order, one line each (what the header prints)."""
    t, out = cfg.trainer, Path(cfg.trainer.output_dir)
    lines = []
    if not cfg.model.path:
        lines.append(f"build the project's tiny tokenizer + {cfg.model.tiny_family} model ({out / 'base_model'})")
    if not cfg.data.train_files:
        lines.append(f"write synthetic tasks {','.join(cfg.data.synthetic_kinds)} (level {cfg.data.synthetic_level}): "
                     f"{cfg.data.synthetic_train_size} train / {cfg.data.synthetic_eval_size} held-out "
                     f"({out / 'data'})")
    has_eval = bool(cfg.data.eval_files) or (not cfg.data.train_files and cfg.data.synthetic_eval_size > 0)
    if resume != "none":
        lines.append(f"resume ({resume}): continue from the newest complete checkpoint if there is one "
                     "(warm start and evaluation before RL are then skipped)")
    if cfg.warm_start.steps > 0:
        ws = cfg.warm_start
        until = (f", stopping once greedy accuracy on {ws.check_prompts} training prompts reaches "
                 f"{ws.target_accuracy:g} (checked every {ws.check_every} steps)" if ws.target_accuracy > 0 else "")
        lines.append(f"supervised warm start: {'up to ' if until else ''}{ws.steps} steps x {ws.batch_size} "
                     f"worked solutions (not RL){until}")
    n_eval = f"up to {t.eval_max_prompts} prompts, greedy + sampled"
    if has_eval:
        lines.append(f"held-out evaluation before RL ({n_eval})")
    opt_steps = t.ppo_epochs * t.mini_batches
    rl = (f"RL: {t.max_steps} steps x {t.train_batch_prompts} prompts x {cfg.rollout.group_size} samples "
          f"(<= {cfg.rollout.max_new_tokens} new tokens), {opt_steps} optimizer step{'s' if opt_steps > 1 else ''} "
          f"per RL step, {cfg.algorithm.advantage} advantages, {cfg.rollout.engine} rollouts")
    if has_eval and t.eval_every:
        rl += f"; held-out evaluation every {t.eval_every} steps"
    if cfg.checkpoint.save_every:
        rl += f"; checkpoint every {cfg.checkpoint.save_every} steps (keep {cfg.checkpoint.keep_last})"
    lines.append(rl)
    final = out / "checkpoints" / f"step_{t.max_steps:06d}"
    lines.append(("held-out evaluation after RL, " if has_eval else "") +
                 f"final checkpoint {final}{'/hf' if cfg.checkpoint.export_hf else ''}, summary.json"
                 + (", curves.png" if cfg.logging.plot else ""))
    return lines


def format_header(cfg: Config, prov: dict, resume: str = "none") -> str:
    commit = prov["git_commit"] or "not a git checkout"
    threads = f"{prov['torch_num_threads']} torch threads (OMP_NUM_THREADS={prov['OMP_NUM_THREADS'] or 'unset'})"
    lines = [
        f"grpo-core {prov['grpo_core_version'] or '?'} (git {commit}) | seed {prov['seed']} | output {cfg.trainer.output_dir}",
        f"torch {prov['torch']}, deepspeed {prov['deepspeed']}, triton {prov['triton']}, python {prov['python']} | "
        f"{threads}, {prov['cpu_count']} CPUs ({prov['cpu'] or '?'})" + (f", GPU {prov['gpu']}" if prov["gpu"] else "")
        + f", {prov['world_size']} rank{'s' if prov['world_size'] != 1 else ''}",
        "plan:",
    ]
    lines += [f"  {i}. {line}" for i, line in enumerate(run_plan(cfg, resume), 1)]
    return "\n".join(lines)


def print_header(cfg: Config, prov: dict, resume: str = "none", file=None) -> None:
    """Print the header on rank 0 (from the launcher's RANK, so before torch.distributed is up)."""
    from grpo_core.progress import is_main_process

    if is_main_process():
        print(format_header(cfg, prov, resume), file=file or sys.stdout, flush=True)


def quiet_known_warnings() -> None:
    """Filter exactly the warnings a clean run would otherwise print hundreds of times, and nothing else.

    DeepSpeed's ZeRO-3 all-gathers partitioned parameters and reduce-scatters gradients through
    `torch.distributed.all_gather_into_tensor` / `reduce_scatter_tensor` (deepspeed/comm/torch.py picks them
    whenever torch has them). torch 2.13 deprecated both names in favour of `all_gather_single` /
    `reduce_scatter_single` (same collectives, renamed), with a FutureWarning on every call: ~300 lines per
    100 demo steps that split the progress bar. Not our call site and nothing to act on for a user, so those
    two messages, from torch.distributed, are ignored; every other warning still shows.
    """
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"torch\.distributed\.",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


