"""The rollout-engine interface: sampling parameters, one generated sample, the abstract engine, a factory.

Every engine (the embedded torch engine, rollout/torch_engine.py; vLLM, rollout/vllm_engine.py) takes token-id
prompts and returns `Generation`s in prompt-major order, each with the sampling logprob of every generated token.

Logprob convention (shared by all engines): the logprob of a generated token is
`log_softmax(logits / temperature)[token]` under the *full* temperature-scaled distribution, taken
BEFORE top-k / top-p truncation and renormalisation. That is the quantity the trainer recomputes with
the fused logprob kernel at the same temperature, so rollout-vs-trainer mismatch measures only numerics.
With temperature == 0 (greedy) the logprob is taken under the temperature-1 distribution.
"""
from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch


@dataclass
class SamplingParams:
    """How to sample the responses of one `RolloutEngine.generate` call."""

    n: int = 1  # samples per prompt (the GRPO group size)
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose mass is >= top_p
    top_k: int = 0  # keep the top_k most likely tokens; 0 = off
    max_new_tokens: int = 256  # generated tokens per sample at most (also capped by the model's context)
    # Token ids that end a sample (kept in token_ids). None = the tokenizer's eos id; [] = none at all.
    stop_token_ids: list[int] | None = None
    stop_strings: list[str] = field(default_factory=list)  # end a sample once its text contains one
    seed: int = 0  # same seed + same prompts -> same samples, whatever the batching

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.stop_token_ids is not None:
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
            if any(t < 0 for t in self.stop_token_ids):
                raise ValueError(f"SamplingParams.stop_token_ids must be >= 0, got {self.stop_token_ids}")
        if isinstance(self.stop_strings, str):
            raise ValueError("SamplingParams.stop_strings must be a list of strings, not one string")
        self.stop_strings = list(self.stop_strings)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"SamplingParams.stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SamplingParams.seed must be an int >= 0, got {self.seed!r}")


@dataclass
class Generation:
    """One sampled response."""

    prompt_index: int  # index of its prompt in the `prompts` list given to generate
    sample_index: int  # 0..n-1 within its prompt's group
    token_ids: list[int]  # generated tokens (prompt excluded), the stop token / stop-string token included
    logprobs: list[float]  # per generated token: log_softmax(logits / T)[token], before top-k/top-p
    finish_reason: Literal["stop", "length"]  # "stop": stop token or string; "length": token budget spent
    text: str | None = None  # decoded token_ids, cut before the stop string; None without a tokenizer


class RolloutEngine(ABC):
    """Generates sampled responses for token-id prompts with the current policy weights."""

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, request_ids: list[int] | None = None
    ) -> list[Generation]:
        """Sample `params.n` responses per prompt.

        request_ids: one int in [0, 2^32) per prompt that, with params.seed and the sample index, fixes the
        randomness of that prompt's samples (default: the prompt's index in `prompts`). Give global ids when
        prompts are split across ranks or calls so a prompt's samples do not depend on the split.
        Returns len(prompts) * n Generations ordered prompt-major: prompt 0 samples 0..n-1, then prompt 1.
        """

    @abstractmethod
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's current weights (HF parameter names) into the engine."""

    # Optional hooks: engines that hold nothing between calls (the torch engine) keep these no-ops.
    def sleep(self) -> None:  # noqa: B027
        """Release generation memory while the trainer runs (no-op for engines that hold none)."""

    def wake_up(self) -> None:  # noqa: B027
        """Re-acquire what `sleep` released (no-op for engines that hold none)."""

    def close(self) -> None:  # noqa: B027
        """Free the engine's resources; the engine is unusable afterwards."""


def check_requests(prompts: list[list[int]], request_ids: list[int] | None) -> list[int]:
    """One clear error for a malformed prompt list or request ids (shared by every engine).

    Returns the request id of every prompt (its index when request_ids is None).
    """
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids, got {str(p)[:80]}")
    if request_ids is None:
        return list(range(len(prompts)))
    request_ids = [int(r) for r in request_ids]
    if len(request_ids) != len(prompts):
        raise ValueError(f"request_ids has {len(request_ids)} entries for {len(prompts)} prompts")
    if any(not 0 <= r < 2**32 for r in request_ids) or len(set(request_ids)) != len(request_ids):
        raise ValueError(f"request_ids must be distinct ints in [0, 2^32), got {request_ids[:8]}")
    return request_ids


def build_engine(kind: Literal["torch", "vllm"], **kwargs) -> RolloutEngine:
    """Build a rollout engine by name; kwargs go to the engine's constructor.

    "torch": `TorchRolloutEngine(model, tokenizer=None, max_batch_size=64, device=None, release_on_sleep=False)`.
    "vllm": needs the `gpu` extra; fails loudly when vLLM or the vLLM engine module is missing.
    """
    if kind == "torch":
        from grpo_core.rollout.torch_engine import TorchRolloutEngine

        return TorchRolloutEngine(**kwargs)
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("rollout.engine='vllm' needs vLLM: pip install 'grpo-core[gpu]'")
        if importlib.util.find_spec("grpo_core.rollout.vllm_engine") is None:
            raise ImportError(
                "rollout.engine='vllm': vLLM is installed but grpo_core.rollout.vllm_engine is not part of "
                "this version of grpo-core; use rollout.engine='torch'"
            )
        module = importlib.import_module("grpo_core.rollout.vllm_engine")
        return module.VLLMRolloutEngine(**kwargs)
    raise ValueError(f"rollout engine kind must be 'torch' or 'vllm', got {kind!r}")
