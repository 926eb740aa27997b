"""Vectorised token sampling with counter-based randomness (temperature, top-k, top-p, greedy).

Randomness: every random number is a stateless hash of (seed, prompt id, sample index, step, vocab
index), so a request's samples depend only on those and never on which other requests share its batch,
the batch size, or the order batches run in. Sampling is Gumbel-max: token = argmax(logits / T + g) with
g = -log(-log u) over the tokens top-k/top-p kept, which draws exactly from the renormalised
truncated softmax. The hash is lowbias32 (a 32-bit integer finaliser) evaluated in int64 with every
product kept below 2^63, so it is exact on every device (no reliance on signed-overflow wrap-around).

Logprobs are fp32 `log_softmax(logits / T)` at the chosen token over the full distribution, before
truncation (see grpo_core/rollout/base.py for why); greedy (T == 0) reports the T = 1 logprob.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): split c in 16-bit halves so no product exceeds 2^49."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """lowbias32 integer hash. x: int64 tensor of values in [0, 2^32) -> int64 tensor, same shape and range."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def request_keys(seed: int, prompt_ids: Tensor, sample_index: Tensor) -> Tensor:
    """Per-request random keys from (seed, prompt id, sample index).

    seed: int in [0, 2^64); prompt_ids, sample_index: int64 [B], values in [0, 2^32) -> int64 [B] in [0, 2^32).
    """
    dev = prompt_ids.device
    seed_lo = torch.tensor(seed & _MASK32, dtype=torch.int64, device=dev)
    seed_hi = torch.tensor((seed >> 32) & _MASK32, dtype=torch.int64, device=dev)
    seed_key = hash32(seed_lo ^ hash32(seed_hi ^ 0x2545F491))
    prompt_key = hash32(seed_key ^ hash32(prompt_ids & _MASK32))
    return hash32(prompt_key ^ hash32((sample_index + 0x5BD1E995) & _MASK32))


def step_keys(keys: Tensor, step: Tensor) -> Tensor:
    """Keys for one decoding step. keys: int64 [B]; step: int64 [B] or scalar (on device), the index of the
    token being drawn within its own response -> int64 [B]."""
    return hash32(keys ^ hash32(step + 0x9E3779B9))


def gumbel_noise(keys: Tensor, vocab_size: int) -> Tensor:
    """Standard Gumbel noise, one draw per (row, token). keys: int64 [B] -> float32 [B, V], all finite."""
    cols = hash32(torch.arange(vocab_size, dtype=torch.int64, device=keys.device) ^ 0x68E31DA4)
    bits = hash32(keys[:, None] ^ cols[None, :]) >> 9  # 23 random bits
    # u = (2k + 1) / 2^24 lies in [2^-24, 1 - 2^-24], exactly representable in fp32, so both logs stay finite.
    u = (bits.to(torch.float32) * 2.0 + 1.0) * (2.0**-24)
    return -torch.log(-torch.log(u))


def mask_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Set everything below the k-th largest logit of each row to -inf (ties with it are kept). [B, V] -> [B, V]."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def mask_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: keep, per row, the smallest set of most likely tokens whose probability mass is
    >= top_p (the most likely token is always kept); the rest become -inf. logits: float32 [B, V]."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p  # enough mass is already covered by more likely tokens
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(
    logits: Tensor, keys: Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Sample one token per row.

    logits: [B, V] any float dtype (computed in fp32); keys: int64 [B] from `step_keys`.
    Returns (tokens int64 [B], logprobs float32 [B]) with logprobs = log_softmax(logits / T)[token]
    over the untruncated distribution (T = 1 when temperature == 0, i.e. greedy).
    """
    logits = logits.float()
    if temperature == 0:
        tokens = torch.argmax(logits, dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / temperature
        logprobs = torch.log_softmax(scaled, dim=-1)
        # top-k first, then top-p over what top-k kept (renormalised), as vLLM and HF do.
        filtered = mask_top_p(mask_top_k(scaled, top_k), top_p)
        tokens = torch.argmax(filtered + gumbel_noise(keys, logits.shape[-1]), dim=-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
