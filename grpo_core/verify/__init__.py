"""Safe, bounded math-answer verifier for RLVR rewards.

Public API::

    verify(response, gold, config=None) -> bool
    judge(response, gold, config=None, with_canonical=False) -> VerifyResult
    extract_answer(response, config=None) -> str | None
    canonical_answer(response, config=None) -> str | None
    verify_batch(responses, golds, workers=2, timeout_s=2.0, config=None) -> list[VerifyResult]
    VerifierPool(workers=2, timeout_s=2.0, config=None)  # reusable killable process pool

Model text is never evaluated as code (own tokenizer + parser into sympy; no eval/sympify/parse_expr).

Where the answer is found: :mod:`grpo_core.verify.extract` (last box, adjacent boxes joined; final-answer
phrases; the final sentence; a short bare response; nothing after a chat-template token). What counts as
equal: :mod:`grpo_core.verify.equivalence`. The two rules that decide reward hacking:

* Decimal rounding rule. Numbers are exact (``0.5`` is 1/2); no relative tolerance is ever applied to
  numbers. Between two decimals, a gold decimal with d >= 2 places is the rounded one and accepts a response
  decimal with more than d places that rounds to it (gold ``2.72`` accepts ``2.718``; refuses ``2.7``,
  ``2.73``); a gold with 0 or 1 places is exact (``0.5`` refuses ``0.46``). A decimal against an exact value
  (fraction, radical, constant), either side the gold, matches only when it is written to >= 6 significant
  digits and is the exact value rounded at its last digit (``0.142857`` is 1/7, ``2.7182818`` is e); short
  roundings never do (``\\frac{2}{3}`` is not ``0.67``, ``e`` is not ``2.72``, ``\\sqrt{3}`` is not
  ``1.732``). Entry by entry inside tuples, intervals and matrices.
* Unordered-set rule. Order is ignored only where the gold is a set or a list of solutions: written
  ``\\{..\\}``, joined by "and"/"or", ``x = 1, x = 2`` (one unknown), ``;``-separated solutions
  (``a=3,b=1; a=5,b=1``), a list of tuples, or a plain comma list that is sorted (its order carries no
  information). Any other gold list is ordered (``1, 5, -3`` refuses ``5, 1, -3``); brackets are ordered
  tuples or intervals; ``a=3, b=1`` (distinct unknowns) is the tuple (3, 1).
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
