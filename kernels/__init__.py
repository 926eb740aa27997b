"""Fused Triton kernels of grpo-core, each with a plain-PyTorch reference in kernels.reference.

Every op runs its Triton kernel on CUDA tensors (and on CPU under TRITON_INTERPRET=1, as the tests do), and
a plain-torch implementation of the same math on CPU otherwise (`backend="auto"`); both give the same
numbers and never materialize what the fused kernel avoids.
"""
from kernels.hidden_align import hidden_align_loss
from kernels.logprob_entropy import fused_logprob_entropy
from kernels.policy_loss import clipped_policy_loss, gspo_policy_loss
from kernels.token_loss import fused_token_loss

__all__ = ["fused_logprob_entropy", "fused_token_loss", "clipped_policy_loss", "gspo_policy_loss",
           "hidden_align_loss"]
