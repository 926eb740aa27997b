"""Fused Triton kernels of grpo-core, each with a plain-PyTorch reference in kernels.reference.

Every op takes `backend=`: "triton" (the Triton kernel on CUDA tensors; on CPU only in the Triton interpreter,
TRITON_INTERPRET=1, as the tests ask for it), "torch" (a plain-torch implementation of the same math, which
never materializes what the fused kernel avoids either) or "auto" (triton on CUDA, torch everywhere else).
Resolution and the shared checks live in kernels/common.py.
"""
from kernels.common import backend_summary, resolve_backend
from kernels.hidden_align import hidden_align_loss
from kernels.logprob_entropy import fused_logprob_entropy
from kernels.policy_loss import clipped_policy_loss, gspo_policy_loss
from kernels.token_loss import fused_token_loss

__all__ = ["fused_logprob_entropy", "fused_token_loss", "clipped_policy_loss", "gspo_policy_loss",
           "hidden_align_loss", "resolve_backend", "backend_summary"]
