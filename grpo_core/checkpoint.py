"""Atomic, self-checking, resumable checkpoints: DeepSpeed ZeRO-3 state + trainer state + the policy in HF layout.

Layout under `<output_dir>/checkpoints/`:
    step_000010/ds/...             DeepSpeed engine checkpoint (model partitions, optimizer states)
    step_000010/trainer_state.json step, optimizer steps, data cursor, dynamic-sampling state, config, run id
    step_000010/rng_rank{r}.pt     every RNG of rank r (torch, numpy, python)
    step_000010/hf/                the policy in HF layout (config.json, safetensors, tokenizer)
    step_000010/COMPLETE           written after everything above is fsynced
    step_000010/MANIFEST.json      written last: size and sha256 of every file above
    latest                         name of the newest complete checkpoint, replaced atomically

A save goes to `.tmp-step_000010` first and is renamed into place only when complete, so a crash mid-save
leaves the previous checkpoint (and `latest`) untouched. Loading verifies the manifest; `--resume auto`
walks back from the newest checkpoint to the newest one that verifies, naming each one it skips and why.
Retention (`keep_last`) deletes only checkpoints this run wrote (same run id) and older than the new one,
after the new one is in place. A write that fails for lack of space or permission is one DiskError line
naming the path and the bytes needed; the partial save is removed and the previous checkpoint stays.
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from grpo_core.distributed import barrier
from grpo_core.errors import CheckpointError, DiskError

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


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


# ----------------------------------------------------------------------------------------------- manifest

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)  # hashlib releases the GIL on large blocks: files hash in parallel threads
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_all(root: Path, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        return list(pool.map(lambda n: _sha256(root / n), names))


def write_manifest(ckpt: Path, *, step: int, run_id: Optional[str]) -> dict:
    """MANIFEST.json with size and sha256 of every file of the checkpoint (written last)."""
    names = _files(ckpt)
    digests = _hash_all(ckpt, names)
    manifest = {"format": 1, "step": step, "run_id": run_id,
                "files": {n: {"size": (ckpt / n).stat().st_size, "sha256": d} for n, d in zip(names, digests)}}
    with open(ckpt / MANIFEST, "w", encoding="utf-8") as f:  # inside the temporary dir: the rename is atomic
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_manifest(ckpt: Path) -> Optional[dict]:
    try:
        return json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def verify_checkpoint(ckpt: Path) -> Optional[str]:
    """None when the checkpoint is whole, else why not (one phrase). A checkpoint written before manifests
    existed (COMPLETE, no MANIFEST.json) is accepted unverified."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "not a directory"
    if not (ckpt / MANIFEST).exists():
        try:  # a checkpoint from before manifests: its trainer state has no run id
            legacy = "run_id" not in json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            legacy = False
        if legacy and (ckpt / COMPLETE).exists():
            return None
        return f"incomplete ({MANIFEST} is missing)"
    manifest = read_manifest(ckpt)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is unreadable"
    files = manifest["files"]
    if "trainer_state.json" not in files:
        return "trainer_state.json is not in the manifest"
    for name, meta in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != meta.get("size"):
            return f"{name} has {size} bytes, the manifest says {meta.get('size')}"
    names = sorted(files)
    for name, digest in zip(names, _hash_all(ckpt, names)):
        if digest != files[name].get("sha256"):
            return f"{name} fails its sha256 check (damaged on disk)"
    return None


# ----------------------------------------------------------------------------------------------- finding

def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Step directories under `root` that were renamed into place (complete when written), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and ((p / MANIFEST).exists() or (p / COMPLETE).exists()):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def select_checkpoint(output_dir: str | Path, resume: str,
                      say: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint to resume from. `none`: None. `auto`: the newest checkpoint in output_dir that verifies,
    walking back and saying in one line which ones were skipped and why (CheckpointError when there are
    checkpoints but none verifies). A path: that checkpoint, which must verify."""
    if resume in (None, "", "none"):
        return None
    if resume != "auto":
        p = Path(resume)
        if not p.exists():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        problem = verify_checkpoint(p)
        if problem:
            raise CheckpointError(f"--resume {resume}: cannot resume from this checkpoint: {problem}")
        return p
    found = list_checkpoints(checkpoint_root(output_dir))
    skipped = []
    for ckpt in reversed(found):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            if skipped:
                say(f"[grpo] --resume auto: skipped {'; '.join(skipped)}; resuming from {ckpt.name}")
            return ckpt
        skipped.append(f"{ckpt.name} ({problem})")
    if skipped:
        raise CheckpointError(f"--resume auto: no checkpoint in {checkpoint_root(output_dir)} verifies: "
                              f"{'; '.join(skipped)}; pass --force without --resume to move this run aside and "
                              f"start fresh")
    return None


def find_checkpoint(output_dir: str | Path, resume: str) -> Optional[Path]:
    """`auto`: the newest checkpoint in output_dir that verifies; `none`: None; else a path that must verify."""
    return select_checkpoint(output_dir, resume, say=lambda _msg: None)


# ----------------------------------------------------------------------------------------------- saving

def save_checkpoint(output_dir: str | Path, step: int, *, engine, trainer_state: dict, rank: int,
                    export_hf: Optional[Callable[[Path], None]], keep_last: int,
                    run_id: Optional[str] = None) -> Path:
    """Collective: every rank calls it. `export_hf(dir)` (rank 0's part runs inside) writes the HF layout."""
    root = checkpoint_root(output_dir)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    run_id = run_id if run_id is not None else trainer_state.get("run_id")
    try:
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(str(tmp / "ds"), tag="state")
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if export_hf is not None:
            export_hf(tmp / "hf")  # collective (gathers ZeRO-3 partitions); rank 0 writes
        barrier()
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "run_id": run_id}, indent=1),
                                                    encoding="utf-8")
            (tmp / COMPLETE).write_text(str(step), encoding="utf-8")
            _fsync_tree(tmp)
            write_manifest(tmp, step=step, run_id=run_id)
            _fsync_tree(tmp)
            if final.exists():  # e.g. a damaged checkpoint that --resume auto walked back from: kept aside
                stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
                aside = final.with_name(f"{name}.replaced-{stamp}")
                os.rename(final, aside)
                print(f"[grpo] note: {final} existed; kept it as {aside.name}", flush=True)
            os.replace(tmp, final)
            _atomic_write_text(root / "latest", name)
            _retain(root, final, keep_last, run_id)
    except (OSError, RuntimeError) as e:
        problem = _disk_problem(e)
        if problem is None:
            raise
        written = _tree_bytes(tmp)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskError(_disk_message(problem, e, root, written)) from None
    barrier()
    return final


def _disk_problem(e: BaseException) -> Optional[str]:
    """'no space left' / 'permission denied' / ... when e is a failed write, else None."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        return os.strerror(e.errno).lower()
    text = str(e)
    if isinstance(e, RuntimeError) and any(s in text for s in ("inline_container", "unexpected pos",
                                                               "file write failed", "PytorchStreamWriter")):
        return "a write failed part-way (disk full?)"
    return None


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for n in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, n))
            except OSError:
                pass
    return total


def _disk_message(problem: str, e: BaseException, root: Path, written: int) -> str:
    path = getattr(e, "filename", None) or root
    previous = list_checkpoints(root)
    need = None
    if previous:
        manifest = read_manifest(previous[-1]) or {}
        need = sum(f.get("size", 0) for f in manifest.get("files", {}).values()) or _tree_bytes(previous[-1])
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        free = None
    parts = [f"cannot write checkpoint to {path}: {problem}"]
    if need:
        parts.append(f"a checkpoint needs about {_fmt_bytes(need)}")
    else:
        parts.append(f"{_fmt_bytes(written)} were written before the failure")
    if free is not None:
        parts.append(f"{_fmt_bytes(free)} free")
    keep = f"the previous checkpoint {previous[-1]} is intact" if previous else "no checkpoint was lost"
    return "; ".join(parts) + f"; {keep}; free space (or lower checkpoint.keep_last) and resume with --resume auto"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _retain(root: Path, newest: Path, keep_last: int, run_id: Optional[str]) -> None:
    """Delete this run's checkpoints older than the newest beyond keep_last; never another run's, never a
    newer one. Stale temporaries of interrupted saves go too."""
    newest_step = int(_STEP_RE.match(newest.name).group(1))
    ours = []
    for p in list_checkpoints(root):
        step = int(_STEP_RE.match(p.name).group(1))
        if step >= newest_step or run_id is None:
            continue
        manifest = read_manifest(p) or {}
        if manifest.get("run_id") == run_id:
            ours.append(p)
    for old in ours[:max(0, len(ours) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))


def load_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng_rank{rank}.pt"
    if path.exists():
        set_rng_state(torch.load(path, weights_only=False))
