"""Process-group set-up and the few collectives the trainer needs (gloo on CPU, NCCL on GPU).

Works alone (one process, no launcher), under torchrun, and under the deepspeed launcher. Misconfiguration
(half-set launcher variables, a rank outside the world) is reported in one clear line at start-up.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.cpp_extension


class LaunchError(RuntimeError):
    """The launcher environment is inconsistent."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_launch_env(env: dict | None = None) -> tuple[int, int, int]:
    """Validate RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; return (rank, world, local_rank)."""
    env = dict(os.environ if env is None else env)
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    present = [k for k in keys if k in env]
    if not present:
        return 0, 1, 0
    missing = [k for k in keys if k not in env]
    if missing and int(env.get("WORLD_SIZE", "1")) > 1:
        raise LaunchError(f"launcher environment incomplete: {', '.join(missing)} not set (use torchrun or deepspeed)")
    try:
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise LaunchError(f"launcher environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e})") from None
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"launcher environment: RANK={rank} is outside WORLD_SIZE={world}")
    if local_rank < 0:
        raise LaunchError(f"launcher environment: LOCAL_RANK={local_rank} must be >= 0")
    return rank, world, local_rank


# A torch-extension build (DeepSpeed's JIT ops) takes a few minutes at most.
STALE_BUILD_LOCK_S = 20 * 60
# How long a run waits on a young build lock (another process building the op right now) before it gives up.
BUILD_LOCK_WAIT_S = 10 * 60
# DeepSpeed's CPU shared-memory all-reduce op: built at deepspeed.init_distributed on the CPU accelerator, used
# only by inference_all_reduce (DeepSpeed-Inference tensor parallelism), never by ZeRO training.
SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_build() -> bool:
    """Keep DeepSpeed from JIT-compiling its `shm_comm` C++ op on the CPU accelerator (minutes on a fresh
    machine, a C++ compiler needed, and a build lock that hangs every later run if the build is killed).
    ZeRO-3 over gloo never calls it: DeepSpeed falls back to torch.distributed when the op is absent, as it
    does on any machine where the op is not compatible. Returns True when the build is skipped."""
    import importlib

    try:  # not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports torch itself under that name
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return False
    if not callable(getattr(ds_torch_comm, "build_shm_op", None)):
        return False
    ds_torch_comm.build_shm_op = lambda: None
    return True


def check_extension_build_locks(max_age_s: float = STALE_BUILD_LOCK_S, wait_s: float = BUILD_LOCK_WAIT_S,
                                ignore: tuple[str, ...] = (), poll_s: float = 2.0) -> None:
    """Never wait unbounded on a torch-extension build lock.

    torch.utils.cpp_extension builds each JIT op under a `lock` file and every later build waits, with no
    timeout, for that file to go away; a process killed mid-build leaves it behind and each later run would
    hang silently. A lock older than max_age_s is reported at once; a younger one (maybe another rank building
    right now) is waited on for at most wait_s, then reported. Locks of ops named in `ignore` (ops this run
    does not build) are left alone.
    """
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or torch.utils.cpp_extension.get_default_build_root())
    deadline = time.monotonic() + wait_s
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        if lock.parent.name in ignore:
            continue
        noted = False
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:  # the build finished meanwhile
                break
            if age > max_age_s or time.monotonic() > deadline:
                raise LaunchError(
                    f"torch-extension build lock {lock} is {age / 60:.0f} min old: a build of '{lock.parent.name}' "
                    f"was killed part-way (or is stuck) and torch would wait on this file forever; if no other "
                    f"process is building it, delete it (rm {lock}) and start again"
                )
            if not noted:
                print(f"[grpo] note: {lock} exists ({age:.0f} s old): waiting up to {wait_s:.0f} s for a build of "
                      f"'{lock.parent.name}' in another process", file=sys.stderr, flush=True)
                noted = True
            time.sleep(poll_s)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed (and DeepSpeed's view of it) once; a lone process becomes a world of 1."""
    rank, world, local_rank = check_launch_env()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise LaunchError("trainer.device='cuda' but no CUDA device is visible")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # DeepSpeed would otherwise look for an Intel/CUDA accelerator; plain CPU + gloo is what we want here.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if use_cuda else "gloo"
    if "MASTER_ADDR" not in os.environ:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if not dist.is_initialized():
        skipped = skip_shm_comm_build()
        check_extension_build_locks(ignore=(SHM_COMM_OP,) if skipped else ())
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)
    if info.world_size != world:
        raise LaunchError(f"process group has {info.world_size} ranks but WORLD_SIZE={world}")
    return info


def all_reduce_max_int(value: int, device: torch.device) -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(obj) -> list:
    """Gather one picklable object per rank (small metadata only: lengths, counts, answers)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes, in order: equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_same_weights(module: torch.nn.Module, what: str) -> None:
    """Every rank holds bitwise the same weights as rank 0, or every rank stops with one line."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    digests = all_gather_objects(weights_digest(module))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise LaunchError(f"{what} differ between rank 0 and rank(s) {differ}: every rank must start from the same "
                          "weights (is trainer.output_dir on a file system all nodes share?)")


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
