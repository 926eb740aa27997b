"""grpo-core: reinforcement learning with verifiable rewards (GRPO family) for LLMs."""

__version__ = "0.1.0"

# The one command that installs the optional GPU extra (vLLM, flash-attn), quoted by every error that needs it
# and by the README. Run in the grpo-core checkout; flash-attn builds against the installed torch, hence no
# build isolation.
GPU_EXTRA_INSTALL = 'pip install --no-build-isolation -e ".[gpu]"'
