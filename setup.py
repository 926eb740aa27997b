"""grpo-core: a from-scratch RLVR (GRPO-family) trainer for LLMs with fused Triton kernels."""
from setuptools import find_packages, setup

setup(
    name="grpo-core",
    version="0.1.0",
    description="RL with verifiable rewards for LLMs: DeepSpeed ZeRO-3 trainer, fused Triton kernels, safe math verifier",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernels live in the top-level folder kernels/ and install as `grpo_kernels`: a top-level `kernels` is
    # Hugging Face's kernel-hub package, which transformers requires. The recipes in configs/ ship as package
    # data (`grpo train demo_cpu`).
    packages=find_packages(include=["grpo_core", "grpo_core.*"])
    + ["grpo_kernels", "grpo_kernels.reference", "grpo_core.recipes"],
    package_dir={"grpo_kernels": "kernels", "grpo_core.recipes": "configs"},
    package_data={"grpo_core.recipes": ["*.yaml"]},
    # torch is left unpinned on purpose: on a GPU cluster the user's CUDA torch stays; on a CPU machine
    # `make install` installs the CPU wheel first, so this requirement is already met and pulls nothing.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "deepspeed>=0.15",
        "sympy>=1.12",
        "pyarrow>=14",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tokenizers>=0.19",
        "jinja2>=3.1",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.24",
        "matplotlib>=3.7",
    ],
    extras_require={
        # vLLM: every minor release 0.10.2 ... 0.34 (grpo_core/rollout/vllm_compat.py; its API is checked against
        # each release's source: benchmarks/results/vllm_api_check.md). Each vLLM pins one torch (0.27-0.32:
        # torch 2.13; 0.33-0.34: torch 2.14): to keep a cluster's torch, constrain it (README, "vLLM").
        "gpu": ["vllm>=0.10.2,<0.35", "flash-attn>=2.6"],
        # benchmarks/bench_vs_trl.py's peer: TRL's GRPOTrainer (pulls its own transformers; a separate venv keeps
        # the main environment's versions, see the README's benchmark section).
        "bench": ["trl>=1.16"],
        "dev": ["pytest>=8", "transformers>=4.51", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["grpo=grpo_core.cli:main"]},
)
