"""Safe, bounded math-answer verifier for RLVR rewards.

Public API::

    verify(response, gold, config=None) -> bool
    judge(response, gold, config=None, with_canonical=False) -> VerifyResult
    extract_answer(response, config=None) -> str | None
    canonical_answer(response, config=None) -> str | None
    verify_batch(responses, golds, workers=2, timeout_s=2.0, config=None) -> list[VerifyResult]
    VerifierPool(workers=2, timeout_s=2.0, config=None)  # reusable killable process pool

Model text is never evaluated as code (own tokenizer + parser into sympy; no eval/sympify/parse_expr).
"""

from grpo_core.verify.api import (
    DEFAULT_CONFIG,
    VerifyConfig,
    VerifyResult,
    canonical_answer,
    extract_answer,
    judge,
    verify,
)
from grpo_core.verify.extract import ExtractConfig
from grpo_core.verify.pool import VerifierPool, verify_batch

__all__ = [
    "DEFAULT_CONFIG",
    "ExtractConfig",
    "VerifierPool",
    "VerifyConfig",
    "VerifyResult",
    "canonical_answer",
    "extract_answer",
    "judge",
    "verify",
    "verify_batch",
]
