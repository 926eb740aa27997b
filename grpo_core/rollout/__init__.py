"""Rollout engines: sample responses (token ids, sampling logprobs, text) for prompts with the current policy."""
from grpo_core.rollout.base import Generation, RolloutEngine, SamplingParams, build_engine
from grpo_core.rollout.factory import build_rollout_engine
from grpo_core.rollout.torch_engine import TorchRolloutEngine

__all__ = ["Generation", "RolloutEngine", "SamplingParams", "TorchRolloutEngine", "build_engine",
           "build_rollout_engine"]
