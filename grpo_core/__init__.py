"""grpo-core: reinforcement learning with verifiable rewards (GRPO family) for LLMs."""

__version__ = "0.1.0"
