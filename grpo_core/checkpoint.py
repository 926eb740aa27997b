"""Atomic, resumable checkpoints: DeepSpeed ZeRO-3 state + trainer state + the policy in HF layout.

Layout under `<output_dir>/checkpoints/`:
    step_000010/ds/...             DeepSpeed engine checkpoint (model partitions, optimizer states)
    step_000010/trainer_state.json step, optimizer steps, data cursor, dynamic-sampling state, config
    step_000010/rng_rank{r}.pt     every RNG of rank r (torch, numpy, python)
    step_000010/hf/                the policy in HF layout (config.json, safetensors, tokenizer)
    step_000010/COMPLETE           written last, after everything above is fsynced
    latest                         name of the newest complete checkpoint, replaced atomically

A save goes to `.tmp-step_000010` first and is renamed into place only when complete, so a crash mid-save
leaves the previous checkpoint (and `latest`) untouched. Old checkpoints beyond `keep_last` are deleted only
after the new one is in place.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from grpo_core.distributed import barrier

COMPLETE = "COMPLETE"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, step: int, *, engine, trainer_state: dict, rank: int,
                    export_hf: Optional[Callable[[Path], None]], keep_last: int,
                    crash_hook: Optional[Callable[[str], None]] = None) -> Path:
    """Collective: every rank calls it. `export_hf(dir)` (rank 0's part runs inside) writes the HF layout.
    `crash_hook(stage)` is a test seam that may raise or kill the process at a named stage."""
    root = checkpoint_root(output_dir)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp / "ds"), tag="state")
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if export_hf is not None:
        export_hf(tmp / "hf")  # collective (gathers ZeRO-3 partitions); rank 0 writes
    if crash_hook is not None:
        crash_hook("before_complete")
    barrier()
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(str(step), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # a previous run's checkpoint of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        if crash_hook is not None:
            crash_hook("before_latest")
        _atomic_write_text(root / "latest", name)
        _retain(root, keep_last)
    barrier()
    return final


def _retain(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).exists())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def find_checkpoint(output_dir: str | Path, resume: str) -> Optional[Path]:
    """`auto`: the newest complete checkpoint in output_dir; `none`: None;
    else a path that must be a complete checkpoint."""
    if resume in (None, "", "none"):
        return None
    if resume != "auto":
        p = Path(resume)
        if not (p / COMPLETE).exists():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} file)")
        return p
    # The newest directory with a COMPLETE marker wins; `latest` is a pointer for people and tools, and may
    # lag by one checkpoint if a crash hit between the rename and its update.
    done = sorted(p for p in checkpoint_root(output_dir).glob("step_*") if (p / COMPLETE).exists())
    return done[-1] if done else None


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))


def load_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng_rank{rank}.pt"
    if path.exists():
        set_rng_state(torch.load(path, weights_only=False))
