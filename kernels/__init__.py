"""Fused Triton kernels of grpo-core, installed and imported as ``grpo_kernels`` (this folder is mapped to that
name by setup.py), each with a plain-PyTorch reference in grpo_kernels.reference.

Every op takes `backend=`: "triton" (the Triton kernel on CUDA tensors; on CPU only in the Triton interpreter,
TRITON_INTERPRET=1, as the tests ask for it), "torch" (a plain-torch implementation of the same math, which
never materializes what the fused kernel avoids either) or "auto" (triton on CUDA, torch everywhere else).
Resolution and the shared checks live in kernels/common.py.
"""
if __name__ != "grpo_kernels":
    # Reached by folder name: the checkout root is on sys.path (running from it, PYTHONPATH, a script that
    # inserts it) and something imported the top-level name `kernels`, which is Hugging Face's kernel-hub package
    # (transformers requires it). Step aside: load the next `kernels` on sys.path in this module's place, or fail
    # exactly as if this folder were not there.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (grpo-core's kernels import as 'grpo_kernels')",
                                  name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
else:
    from grpo_kernels.common import backend_summary, resolve_backend
    from grpo_kernels.hidden_align import hidden_align_loss
    from grpo_kernels.logprob_entropy import fused_logprob_entropy
    from grpo_kernels.policy_loss import clipped_policy_loss, gspo_policy_loss
    from grpo_kernels.token_loss import fused_token_loss

    __all__ = ["fused_logprob_entropy", "fused_token_loss", "clipped_policy_loss", "gspo_policy_loss",
               "hidden_align_loss", "resolve_backend", "backend_summary"]
