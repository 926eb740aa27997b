"""What every kernel module shares: backend names and their resolution, the interpreter switch, and a
check of the tensors an op is given.

Backends (the `backend=` argument of every op, and `model.kernel_backend` in the trainer):
- "triton": the fused Triton kernel. On CUDA tensors it compiles for the GPU; on CPU tensors it runs in the
  Triton interpreter, which must be switched on with TRITON_INTERPRET=1 before the first @triton.jit (the
  tests do this and ask for "triton" explicitly). The interpreter is for testing: ~100x slower than torch.
- "torch": the same algorithm in plain torch ops (no [N, V] logits either), on any device.
- "auto": "triton" on CUDA tensors, "torch" everywhere else, whatever TRITON_INTERPRET says: an exported
  TRITON_INTERPRET=1 never turns a CPU run into an interpreter run unless "triton" is asked for.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")

# The ops the trainer runs, as named in the run header (`backend_summary`).
OPS = ("lm_head", "policy_loss", "gspo_loss", "hidden_align")
# Ops whose work is a few torch ops per sequence, with no Triton kernel of their own: both backends run torch.
TORCH_ONLY_OPS = ("gspo_loss",)


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is on (TRITON_INTERPRET=1, read at kernel definition and launch)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, op: str = "kernel") -> str:
    """"triton" or "torch" for an op on tensors of `device` (see the module docstring); one clear error for
    an unknown name, or for "triton" on CPU without the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (got device {device}) or TRITON_INTERPRET=1 set before "
            "grpo_kernels is imported (the Triton interpreter, for tests); use backend='torch' or 'auto' on CPU")
    return backend


def backend_summary(backend: str, device: torch.device) -> dict[str, str]:
    """What each op of a run will use for `backend` on `device`, e.g. for the run header:
    {"lm_head": "torch", "policy_loss": "torch", "gspo_loss": "torch", "hidden_align": "torch"}; "triton"
    on CPU reads "triton-interpreter"."""
    resolved = resolve_backend(backend, device, "model.kernel_backend")
    if resolved == "triton" and torch.device(device).type != "cuda":
        resolved = "triton-interpreter"
    return {op: "torch" if op in TORCH_ONLY_OPS else resolved for op in OPS}


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """One error naming the tensors when an op's inputs sit on different devices."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{op}: inputs must share one device, got {listed}")
