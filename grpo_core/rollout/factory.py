"""The one place that decides which rollout engine generates: `rollout.engine` -> an engine, for training,
the trainer's periodic evaluation and `grpo eval` alike."""
from __future__ import annotations

from pathlib import Path

import torch

from grpo_core.rollout.base import RolloutEngine, build_engine


def build_rollout_engine(
    cfg,
    *,
    model_dir: str | Path,
    tokenizer,
    device: torch.device | str,
    dtype: torch.dtype,
    model=None,
    engine: str | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    sleep_mode: bool | None = None,
    release_on_sleep: bool = False,
    vllm_asleep: bool = False,
) -> RolloutEngine:
    """The rollout engine `cfg.rollout` asks for (`engine` overrides `cfg.rollout.engine`).

    model_dir: HF checkpoint the engine starts from (vLLM loads it; the torch engine loads it unless `model`,
        a grpo_core CausalLM, is given).
    temperature / seed: the sampling temperature (vLLM picks its logprobs mode from it with cfg.rollout's
        top_p / top_k) and vLLM's global seed; default cfg.rollout.temperature and cfg.trainer.seed.
    sleep_mode: vLLM sleep mode (default cfg.rollout.sleep_mode; evaluation alone has no use for it).
    release_on_sleep: the torch engine frees its weights on `sleep` (a model it owns: the trainer's copy).
    vllm_asleep: put a vLLM engine to sleep at once (the trainer: its memory goes to DeepSpeed until the first
        weight sync). The torch engine starts with model_dir's weights, usable as they are.
    vLLM must be built before the trainer takes GPU memory: it sizes its KV cache from what is free then.
    """
    r = cfg.rollout
    kind = r.engine if engine is None else engine
    if kind == "vllm":
        engine = build_engine(
            "vllm", model_dir=str(model_dir), tokenizer=tokenizer, dtype=dtype,
            gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
            sleep_mode=r.sleep_mode if sleep_mode is None else sleep_mode,
            temperature=r.temperature if temperature is None else temperature, top_p=r.top_p, top_k=r.top_k,
            seed=cfg.trainer.seed if seed is None else seed)
        if vllm_asleep:
            engine.sleep()
        return engine
    if kind == "torch":
        if model is None:
            from grpo_core.model import CausalLM

            model = CausalLM.from_pretrained(model_dir, dtype=dtype, device=device)
        return build_engine("torch", model=model, tokenizer=tokenizer, max_batch_size=r.max_batch_size,
                            device=device, release_on_sleep=release_on_sleep)
    return build_engine(kind)  # one error naming the valid kinds
