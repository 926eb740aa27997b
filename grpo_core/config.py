"""The typed config tree: nested dataclasses, loaded from YAML recipes with `--set a.b=value` overrides.

Every field carries its meaning (and unit) in the comment beside it. Unknown keys, wrong types and out-of-range
values raise one `ConfigError` naming the dotted key. The DeepSpeed JSON is generated from this tree
(`deepspeed_config`), never kept as a second hand-edited copy.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from grpo_core.scoring import MAX_REWARD  # bound on |reward| values (light import: no torch)


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the dotted key."""


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key '{key}': {msg}")


def _expand(path: str) -> str:
    """A path as the shell would give it: '~' and '~user' expanded (a literal './~' directory is never made)."""
    return os.path.expanduser(path) if path.startswith("~") else path


@dataclass
class ModelConfig:
    path: str = ""  # HF-layout model directory (config.json + safetensors + tokenizer); "" -> build a tiny model
    tiny_family: Literal["qwen2", "qwen3", "llama"] = "qwen2"  # family of the tiny model built when path is ""
    tiny_hidden_size: int = 64  # hidden size of the tiny model
    tiny_num_layers: int = 2  # decoder layers of the tiny model
    tiny_num_heads: int = 4  # attention heads of the tiny model
    tiny_num_kv_heads: int = 2  # key/value heads of the tiny model (GQA)
    tiny_intermediate_size: int = 128  # MLP width of the tiny model
    attn_backend: Literal["auto", "sdpa", "flash_attn"] = "auto"  # attention kernel; flash_attn needs the gpu extra
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"  # kernels: auto = triton on CUDA, torch on CPU
    activation_checkpointing: bool = False  # recompute each decoder layer in backward to save memory
    # Compute the token loss inside the LM head's forward (grpo_kernels.fused_token_loss): 3 LM-head GEMMs per
    # update instead of 4. Needs a token-separable loss: policy_loss ppo, fipo off, tis off.
    fused_lm_head_loss: bool = False

    def validate(self, p: str) -> None:
        self.path = _expand(self.path)
        for name in ("tiny_hidden_size", "tiny_num_layers", "tiny_num_heads", "tiny_num_kv_heads", "tiny_intermediate_size"):
            if getattr(self, name) <= 0:
                _fail(f"{p}.{name}", "must be > 0")
        for name, most in (("tiny_hidden_size", 16384), ("tiny_num_layers", 512), ("tiny_num_heads", 256),
                           ("tiny_intermediate_size", 65536)):
            if getattr(self, name) > most:
                _fail(f"{p}.{name}", f"must be <= {most} for the project's tiny model, got {getattr(self, name)} "
                      "(for a real model set model.path)")
        if self.tiny_hidden_size % self.tiny_num_heads:
            _fail(f"{p}.tiny_hidden_size", "must be divisible by tiny_num_heads")
        if (self.tiny_hidden_size // self.tiny_num_heads) % 2:
            _fail(f"{p}.tiny_num_heads", f"must leave an even head size (tiny_hidden_size / tiny_num_heads = "
                  f"{self.tiny_hidden_size // self.tiny_num_heads}; rotary embeddings rotate pairs)")
        if self.tiny_num_heads % self.tiny_num_kv_heads:
            _fail(f"{p}.tiny_num_kv_heads", "must divide tiny_num_heads")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # parquet/jsonl files (verl or plain format)
    eval_files: list[str] = field(default_factory=list)  # held-out parquet/jsonl files for periodic evaluation
    synthetic_kinds: list[str] = field(default_factory=lambda: ["arith"])  # tasks made when train_files is empty
    synthetic_level: int = 2  # difficulty level of the synthetic tasks (see grpo_core/tasks)
    synthetic_train_size: int = 2000  # rows of synthetic train data
    synthetic_eval_size: int = 200  # rows of synthetic held-out data
    prompt_template: str = ""  # format string with {prompt}; "" -> the tokenizer's chat template
    max_prompt_tokens: int = 256  # longer prompts are dropped (and counted)
    allow_unlabeled: bool = False  # rows without gold answers are kept and labelled by majority vote (TTRL)
    prompt_key: str = "prompt"  # row field holding the prompt (string or chat list); dotted path allowed
    answer_key: str = ""  # row field holding the gold; "" = verl's reward_model.ground_truth, else answer
    system_prompt: str = ""  # system message put before plain-string prompts ("" = none)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the chat template (enable_thinking)

    def validate(self, p: str) -> None:
        self.train_files = [_expand(f) for f in self.train_files]
        self.eval_files = [_expand(f) for f in self.eval_files]
        if not self.prompt_key or any(not part for part in self.prompt_key.split(".")):
            _fail(f"{p}.prompt_key", f"must be a field name or dotted path, got {self.prompt_key!r}")
        if self.answer_key and any(not part for part in self.answer_key.split(".")):
            _fail(f"{p}.answer_key", f"must be a field name or dotted path (or \"\"), got {self.answer_key!r}")
        for k in self.chat_template_kwargs:
            if not isinstance(k, str) or not k.isidentifier():
                _fail(f"{p}.chat_template_kwargs", f"keys must be identifiers, got {k!r}")
        if self.max_prompt_tokens <= 0:
            _fail(f"{p}.max_prompt_tokens", "must be > 0")
        if self.synthetic_train_size <= 0:
            _fail(f"{p}.synthetic_train_size", "must be > 0")
        if self.synthetic_eval_size < 0:
            _fail(f"{p}.synthetic_eval_size", "must be >= 0")
        for name in ("synthetic_train_size", "synthetic_eval_size"):
            if getattr(self, name) > MAX_SYNTHETIC_ROWS:
                _fail(f"{p}.{name}", f"must be <= {MAX_SYNTHETIC_ROWS} (rows generated at start-up), got "
                      f"{getattr(self, name)}")
        if self.prompt_template and "{prompt}" not in self.prompt_template:
            _fail(f"{p}.prompt_template", "must contain '{prompt}'")
        if not self.train_files:
            self._validate_synthetic(p)

    def _validate_synthetic(self, p: str) -> None:
        """The synthetic tasks made when train_files is empty: known kinds, each knowing the level."""
        from grpo_core.tasks.synthetic import TASKS

        if not self.synthetic_kinds:
            _fail(f"{p}.synthetic_kinds", "is empty and data.train_files is empty: nothing to train on; name "
                  f"task kinds ({', '.join(TASKS)}) or set data.train_files")
        for kind in self.synthetic_kinds:
            if kind not in TASKS:
                _fail(f"{p}.synthetic_kinds", f"unknown kind {kind!r}; known kinds: {', '.join(TASKS)}")
        if len(set(self.synthetic_kinds)) != len(self.synthetic_kinds):
            _fail(f"{p}.synthetic_kinds", f"repeats a kind: {self.synthetic_kinds}")
        for kind in self.synthetic_kinds:
            if self.synthetic_level not in TASKS[kind].levels:
                _fail(f"{p}.synthetic_level", f"must be one of {list(TASKS[kind].levels)} for kind {kind!r}, got "
                      f"{self.synthetic_level}")


MAX_GROUP_SIZE = 1024  # rollout.group_size bound (see RolloutConfig.validate)
MAX_RESPONSES_PER_STEP = 1 << 16  # rollout.group_size x trainer.train_batch_prompts bound
MAX_SYNTHETIC_ROWS = 1_000_000  # data.synthetic_*_size bound (generated at start-up)
MAX_WORKERS = 256  # reward.verifier_workers bound (processes)


@dataclass
class RolloutConfig:
    engine: Literal["torch", "vllm"] = "torch"  # generation engine; vllm needs the gpu extra and CUDA
    group_size: int = 8  # responses sampled per prompt (G)
    temperature: float = 1.0  # sampling temperature (the trainer's logprobs use the same one)
    top_p: float = 1.0  # nucleus sampling mass
    top_k: int = 0  # top-k sampling, 0 = off
    max_new_tokens: int = 256  # response length cap in tokens (also L_max of Dr.GRPO's constant)
    stop_strings: list[str] = field(default_factory=list)  # extra stop strings
    max_batch_size: int = 64  # torch engine: rows decoded together
    gpu_memory_utilization: float = 0.5  # vllm: fraction of GPU memory for weights + KV cache
    tensor_parallel_size: int = 1  # vllm: tensor parallel degree inside a node
    sleep_mode: bool = True  # vllm: release KV cache and weights while training

    def validate(self, p: str) -> None:
        if self.group_size < 2:
            _fail(f"{p}.group_size", f"must be >= 2, got {self.group_size}: advantages are relative to the other "
                  "responses of a prompt, so with one response each they are all 0 and nothing trains")
        if self.group_size > MAX_GROUP_SIZE:
            _fail(f"{p}.group_size", f"must be <= {MAX_GROUP_SIZE}, got {self.group_size} (recipes use 4-64 "
                  "samples per prompt; one step would generate group_size x trainer.train_batch_prompts responses)")
        if any(not s for s in self.stop_strings):
            _fail(f"{p}.stop_strings", f"must hold non-empty strings, got {self.stop_strings!r} (an empty stop "
                  "string would end every response at once)")
        if self.temperature <= 0:
            _fail(f"{p}.temperature", "must be > 0 (the trainer's logprobs divide by it; for greedy held-out "
                  "evaluation set trainer.eval_greedy: true)")
        if not 0 < self.top_p <= 1:
            _fail(f"{p}.top_p", "must be in (0, 1]")
        if self.top_k < 0:
            _fail(f"{p}.top_k", "must be >= 0")
        if self.max_new_tokens < 1:
            _fail(f"{p}.max_new_tokens", "must be >= 1")
        if self.max_batch_size < 1:
            _fail(f"{p}.max_batch_size", "must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            _fail(f"{p}.gpu_memory_utilization", "must be in (0, 1]")


@dataclass
class RewardConfig:
    correct: float = 1.0  # reward of a verified-correct response
    incorrect: float = 0.0  # reward otherwise (e.g. -1.0)
    format_reward: float = 0.0  # added when the response states its answer as \boxed{} or "the answer is" (0 = off)
    bare_answer_max_chars: int = 80  # a response this short with no boxed/phrase answer is itself the answer (0 = off)
    overlong_shaping: bool = False  # DAPO soft overlong punishment (docs/algorithms.md §2)
    overlong_cache_len: int = 64  # L_cache in tokens; L_max is rollout.max_new_tokens
    # verifier worker processes (0 = math verified in-process, size-bounded; custom functions always run in
    # max(1, verifier_workers) killable worker processes)
    verifier_workers: int = 0
    verifier_timeout_s: float = 2.0  # wall-clock bound per verified item / custom-function call in a worker
    # "PATH.py:NAME" or "package.module:NAME", verl's signature NAME(data_source, solution_str, ground_truth,
    # extra_info=None) -> float | {"score": float, ...}; when set it scores every row not routed by by_source.
    custom_function: str = ""
    by_source: dict[str, str] = field(default_factory=dict)  # {data_source: math | code | ttrl | custom spec}
    default: str = "math"  # scorer of rows whose data_source is not in by_source (custom_function overrides it)
    code_timeout_s: float = 5.0  # wall-clock bound of one code reward (all its tests) in the sandbox
    custom_error_limit: int = 20  # stop the run when a custom function has raised on its first N calls

    def validate(self, p: str) -> None:
        from grpo_core.scoring import check_scorer_spec

        for key, spec in [("custom_function", self.custom_function), ("default", self.default),
                          *((f"by_source.{k}", v) for k, v in self.by_source.items())]:
            if key == "custom_function" and not spec:
                continue
            problem = check_scorer_spec(spec, custom_only=key == "custom_function")
            if problem:
                _fail(f"{p}.{key}", problem)
        if self.custom_function and self.default != "math":
            _fail(f"{p}.default", "set either reward.custom_function or reward.default, not both")
        for name in ("correct", "incorrect", "format_reward"):
            if abs(getattr(self, name)) > MAX_REWARD:
                _fail(f"{p}.{name}", f"must be within [-{MAX_REWARD:g}, {MAX_REWARD:g}], got {getattr(self, name):g} "
                      "(advantages normalise differences of rewards; scale them down)")
        if self.correct <= self.incorrect:
            _fail(f"{p}.correct", f"must be greater than reward.incorrect ({self.correct:g} <= {self.incorrect:g}): "
                  "the run would learn to be wrong" + (" (or nothing, when equal)" if self.correct == self.incorrect
                                                       else ""))
        if self.code_timeout_s <= 0:
            _fail(f"{p}.code_timeout_s", "must be > 0")
        if self.custom_error_limit < 1:
            _fail(f"{p}.custom_error_limit", "must be >= 1")
        if not 0 <= self.verifier_workers <= MAX_WORKERS:
            _fail(f"{p}.verifier_workers", f"must be in [0, {MAX_WORKERS}] (worker processes), got {self.verifier_workers}")
        if self.verifier_timeout_s <= 0:
            _fail(f"{p}.verifier_timeout_s", "must be > 0")
        if self.overlong_cache_len < 1:
            _fail(f"{p}.overlong_cache_len", "must be >= 1")
        if not 0 <= self.bare_answer_max_chars <= 1000:
            _fail(f"{p}.bare_answer_max_chars", "must be in [0, 1000] (the verifier's answer-length bound)")


@dataclass
class AlgorithmConfig:
    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"  # advantage estimator (docs/algorithms.md §1)
    adv_eps: float = 1e-6  # eps in GRPO's std normalisation
    adv_std_unbiased: bool = True  # GRPO std divides by G - 1 (as verl/TRL); false: by G (docs/algorithms.md §1)
    edas: bool = False  # error-diversity advantage shaping on incorrect rollouts (docs/algorithms.md §1)
    edas_alpha: float = 0.4  # EDAS alpha
    edas_beta: float = 0.2  # EDAS beta (single wrong-answer class)
    edas_kappa: float = 2.0  # EDAS kappa (cap on the shift relative to |A|)
    dynamic_sampling: bool = True  # DAPO: drop groups whose rewards are all equal, resample
    max_gen_batches: int = 4  # bound on generation rounds per step under dynamic sampling
    policy_loss: Literal["ppo", "gspo"] = "ppo"  # token-level clipped ratio, or GSPO sequence-level ratio
    eps_low: float = 0.2  # lower clip: r >= 1 - eps_low (GSPO default 3e-4 set by the recipe)
    eps_high: float = 0.28  # upper clip (DAPO clip-higher): r <= 1 + eps_high
    dual_clip: Optional[float] = None  # dual-clip constant c for A < 0 (e.g. 3.0), None = off
    nsr: Literal["off", "scaled", "band"] = "scaled"  # near-boundary stochastic rescue rule (docs/algorithms.md §3)
    nsr_prob: float = 0.5  # band rule: rescue probability
    nsr_band: float = 0.1  # band rule: band width beyond the clip edge
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-sum-constant"] = "token-mean"  # aggregation
    entropy_coef: float = 0.0  # entropy bonus coefficient
    kl_coef: float = 0.0  # KL-to-reference coefficient (0 = no reference model at all)
    kl_type: Literal["k1", "k3"] = "k3"  # KL estimator
    hidden_align_coef: float = 0.0  # Hidden-Align lambda (docs/algorithms.md §4), 0 = off
    hidden_align_marker: str = "\\boxed{"  # the anchor is the token just before the last marker
    fipo: bool = False  # future-KL influenced advantage weights (docs/algorithms.md §5)
    fipo_tau: float = 32.0  # FIPO half-life in tokens
    fipo_eps: float = 0.2  # FIPO clip range
    fipo_high_only: bool = False  # FIPO clip to [1, 1 + eps] only
    tis: Literal["off", "token", "sequence"] = "off"  # truncated importance sampling for rollout mismatch
    tis_clip: float = 2.0  # TIS truncation threshold

    def validate(self, p: str) -> None:
        if not 0 <= self.eps_low < 1:
            _fail(f"{p}.eps_low", "must be in [0, 1)")
        if self.eps_high < 0:
            _fail(f"{p}.eps_high", "must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            _fail(f"{p}.dual_clip", "must be > 1 (or null)")
        if not 0 <= self.nsr_prob <= 1:
            _fail(f"{p}.nsr_prob", "must be in [0, 1]")
        if self.nsr_band <= 0:
            _fail(f"{p}.nsr_band", "must be > 0")
        if not 1 <= self.max_gen_batches <= 100:
            _fail(f"{p}.max_gen_batches", f"must be in [1, 100] (generation rounds per step), got {self.max_gen_batches}")
        for name in ("entropy_coef", "kl_coef", "hidden_align_coef", "edas_alpha", "edas_beta"):
            if getattr(self, name) < 0:
                _fail(f"{p}.{name}", "must be >= 0")
        if self.edas_kappa < 1:
            _fail(f"{p}.edas_kappa", "must be >= 1 (so that the shift keeps the sign of the advantage)")
        if self.adv_eps < 0:
            _fail(f"{p}.adv_eps", "must be >= 0")
        if self.fipo_tau <= 0:
            _fail(f"{p}.fipo_tau", "must be > 0 (a half-life in tokens)")
        if self.fipo_eps < 0:
            _fail(f"{p}.fipo_eps", "must be >= 0")
        if self.tis_clip <= 0:
            _fail(f"{p}.tis_clip", "must be > 0")
        if not self.hidden_align_marker:
            _fail(f"{p}.hidden_align_marker", "must not be empty")


@dataclass
class WarmStartConfig:
    steps: int = 0  # supervised warm-start steps on the data's worked solutions before RL (0 = off)
    lr: float = 3e-3  # warm-start learning rate
    batch_size: int = 32  # warm-start sequences per step
    # Stop early once greedy accuracy on `check_prompts` training prompts reaches this (0 = off: run all `steps`).
    # Checked every `check_every` steps; makes where RL starts a level rather than a step count, which lands
    # differently with each seed, CPU and thread count.
    target_accuracy: float = 0.0
    check_every: int = 25  # warm-start steps between accuracy checks (with target_accuracy > 0)
    check_prompts: int = 64  # training prompts per accuracy check (greedy, one response each)

    def validate(self, p: str) -> None:
        if self.steps < 0:
            _fail(f"{p}.steps", "must be >= 0")
        if not 0 < self.lr <= 1:
            _fail(f"{p}.lr", f"must be in (0, 1], got {self.lr:g} (Adam learning rates are typically 1e-4 to 1e-2 here)")
        if not 1 <= self.batch_size <= 4096:
            _fail(f"{p}.batch_size", f"must be in [1, 4096] (sequences per warm-start step), got {self.batch_size}")
        if not 0 <= self.target_accuracy <= 1:
            _fail(f"{p}.target_accuracy", f"must be in [0, 1] (0 = off), got {self.target_accuracy:g}")
        if self.check_every < 1:
            _fail(f"{p}.check_every", "must be >= 1")
        if self.check_prompts < 1:
            _fail(f"{p}.check_prompts", "must be >= 1")


@dataclass
class TrainerConfig:
    max_steps: int = 100  # RL optimizer steps
    output_dir: str = "runs/default"  # where logs, checkpoints, metrics.jsonl and summary.json go
    seed: int = 0  # seeds data order, init, sampling and NSR
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    train_batch_prompts: int = 8  # prompt groups per optimizer step (global, all ranks)
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per rollout batch and epoch
    max_tokens_per_micro_batch: int = 4096  # token budget of one packed micro-batch
    lr: float = 1e-6  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear LR warmup in optimizer steps
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # global grad-norm clip (0 = off)
    eval_every: int = 0  # evaluate on data.eval_files every N steps (0 = only before and after)
    eval_greedy: bool = True  # the headline held-out accuracy is greedy (else sampled); both are logged
    eval_max_prompts: int = 200  # cap on evaluated prompts
    # Optimizer steps skipped in a row for a non-finite loss or gradient before the run stops with an error
    # (the last good checkpoint is kept).
    max_consecutive_skips: int = 5

    def validate(self, p: str) -> None:
        for name in ("max_steps", "train_batch_prompts", "ppo_epochs", "mini_batches", "max_tokens_per_micro_batch",
                     "eval_max_prompts", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                _fail(f"{p}.{name}", "must be >= 1")
        if not 0 < self.lr <= 1:
            _fail(f"{p}.lr", f"must be in (0, 1], got {self.lr:g} (RL learning rates are typically 1e-7 to 1e-4; "
                  "a larger one makes the weights non-finite within a few steps)")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            _fail(f"{p}.adam_betas", "must be two numbers in [0, 1)")
        if self.adam_eps <= 0:
            _fail(f"{p}.adam_eps", "must be > 0")
        for name in ("warmup_steps", "eval_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                _fail(f"{p}.{name}", "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(f"{p}.min_lr_ratio", "must be in [0, 1]")
        if not self.output_dir:
            _fail(f"{p}.output_dir", "must not be empty")
        self.output_dir = _expand(self.output_dir)
        if self.output_dir.startswith("~"):
            _fail(f"{p}.output_dir", f"'{self.output_dir}': unknown user in '~'; give the path in full")
        if self.seed < 0:
            _fail(f"{p}.seed", "must be >= 0")
        if self.ppo_epochs > 100:
            _fail(f"{p}.ppo_epochs", f"must be <= 100 (passes over one rollout batch), got {self.ppo_epochs}")
        if self.train_batch_prompts % self.mini_batches:
            _fail(f"{p}.mini_batches", "must divide trainer.train_batch_prompts")


@dataclass
class CheckpointConfig:
    save_every: int = 0  # save a resumable checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept (older ones deleted after a successful save)
    export_hf: bool = True  # also export the policy in HF layout (safetensors) with each checkpoint

    def validate(self, p: str) -> None:
        if self.save_every < 0:
            _fail(f"{p}.save_every", "must be >= 0")
        if self.keep_last < 1:
            _fail(f"{p}.keep_last", "must be >= 1")


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # write tensorboard scalars under output_dir/tb
    progress_bar: bool = True  # tqdm progress bar on rank 0
    plot: bool = True  # write a PNG of the reward/accuracy curves at the end

    def validate(self, p: str) -> None:
        return None


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3  # ZeRO stage 0/1/2/3 (0 = plain data parallel; every stage gives the same update)
    # On one rank (and nothing offloaded) run stage 0: one partition is the whole model, so ZeRO's gather/release
    # hooks and flat buffers cost time and save nothing. Same update (tested); false keeps zero_stage as set.
    one_rank_unpartitioned: bool = True
    offload_optimizer: bool = False  # keep optimizer states on CPU
    offload_param: bool = False  # keep parameters on CPU (stage 3 only)
    bf16: Literal["auto", "on", "off"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    torch_adam: bool = True  # use torch's AdamW (no compiled DeepSpeed ops needed)
    # Sizes in elements; -1 = scaled to the model's hidden size H (the HF Trainer's "auto" rules).
    param_persistence_threshold: int = -1  # stage 3: parameters this small stay whole on every rank (auto 10*H)
    prefetch_bucket_size: int = -1  # stage 3: parameters fetched ahead of the module that needs them (auto 0.9*H^2)
    reduce_bucket_size: int = -1  # gradient elements reduced per collective (auto H^2)
    allgather_bucket_size: int = -1  # stage 1/2: parameter elements all-gathered per collective (auto H^2)
    max_live_parameters: int = 1_000_000_000  # stage 3: gathered parameter elements held at once per rank

    def validate(self, p: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            _fail(f"{p}.zero_stage", "must be 0, 1, 2 or 3")
        for name in ("param_persistence_threshold", "prefetch_bucket_size", "reduce_bucket_size",
                     "allgather_bucket_size"):
            if getattr(self, name) < -1:
                _fail(f"{p}.{name}", "must be >= 0 (or -1 = scaled to the model)")
        if self.max_live_parameters < 1:
            _fail(f"{p}.max_live_parameters", "must be >= 1")
        if self.offload_param and self.zero_stage != 3:
            _fail(f"{p}.offload_param", f"needs zero_stage 3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            _fail(f"{p}.offload_optimizer", "needs zero_stage 1, 2 or 3 (got 0)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        a = self.algorithm
        responses = self.rollout.group_size * self.trainer.train_batch_prompts
        if responses > MAX_RESPONSES_PER_STEP:
            _fail("trainer.train_batch_prompts", f"x rollout.group_size = {responses} responses per step; must be <= "
                  f"{MAX_RESPONSES_PER_STEP} (recipes use 64-8192)")
        if self.model.fused_lm_head_loss:
            coupled = [name for name, on in (("algorithm.policy_loss=gspo", a.policy_loss == "gspo"),
                                             ("algorithm.fipo", a.fipo), ("algorithm.tis", a.tis != "off")) if on]
            if coupled:
                _fail("model.fused_lm_head_loss", f"needs a token-separable loss; {', '.join(coupled)} couples "
                      "the tokens of a sequence (turn those off or set fused_lm_head_loss false)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- loading

def all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (sections and leaves), e.g. 'trainer', 'trainer.max_steps'."""
    cls = Config if cls is None else cls
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        out.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(all_keys(hints[f.name], key))
    return out


def suggest_key(key: str) -> str:
    """'did you mean ...?' for an unknown dotted key: the nearest key of the same section, the same field name
    in another section, or the nearest key anywhere; else the section's known keys."""
    known = all_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in known if k.rpartition(".")[0] == parent]

    def best(cands: list[str]) -> tuple[float, str]:
        scored = [(difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio(), k) for k in cands]
        return max(scored, default=(0.0, ""))

    near_score, near = best(siblings)
    far_score, far = best([k for k in known if "." in k and k.rpartition(".")[0] != parent])
    match = []
    if near_score >= 0.6 and near_score >= far_score:
        match = [near]
    elif far_score >= 0.75:  # the right name in the wrong section (trainer.keep_last -> checkpoint.keep_last)
        match = [far]
    elif near_score >= 0.6:
        match = [near]
    if match:
        return f"did you mean {match[0]}?"
    return f"known keys here: {', '.join(k.rpartition('.')[2] for k in siblings)}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key repeated in one mapping (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if first is not None:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}' (first set on line "
                                  f"{first}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def recipe_dirs() -> list[Path]:
    """Where the shipped recipes are: package data in an installed wheel, the checkout's configs/ otherwise."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "recipes", here.parent / "configs") if d.is_dir()]


def recipe_names() -> list[str]:
    return sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})


def resolve_recipe(path: str | Path) -> Path:
    """A recipe by path, or a shipped one by bare name (``demo_cpu``); a path that exists always wins."""
    p = Path(path).expanduser()
    if p.exists() or p.suffix in (".yaml", ".yml") or len(p.parts) != 1:
        return p
    for d in recipe_dirs():
        if (d / f"{p.name}.yaml").is_file():
            return d / f"{p.name}.yaml"
    raise ConfigError(f"config '{path}' is neither a file nor a shipped recipe (shipped: {', '.join(recipe_names())})")


def load_yaml(path: str | Path) -> dict:
    """A recipe file as a dict: must exist, be valid YAML, non-empty, a mapping, with no repeated key."""
    p = resolve_recipe(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist" if not p.exists() else f"config file '{p}' is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' cannot be read: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"config file '{p}' {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" line {where.line + 1}" if where is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{p}'{at} is not valid YAML: {what}") from None
    if data is None:
        raise ConfigError(f"config file '{p}' is empty (no keys): start from a recipe such as configs/demo_cpu.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Check (and lightly coerce: int -> float, tuple -> list) `value` against annotation `tp`."""
    if isinstance(value, _Override):
        value = value.raw if tp is str else value.parsed
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} & set(typing.get_args(tp)):
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in typing.get_args(tp):
            _fail(key, f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        _fail(key, f"wrong type {type(value).__name__} ({value!r})")
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"must be a mapping, got {type(value).__name__} ({value!r})")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_check_type(f"{key}.{k}", k, key_tp): _check_type(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            _fail(key, f"must be a list, got {type(value).__name__} ({value!r})")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"must be true/false, got {type(value).__name__} ({value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"must be an integer, got {type(value).__name__} ({value!r})")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(key, f"must be a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"must be a number, got {type(value).__name__} ({value!r})")
        if not math.isfinite(float(value)):
            _fail(key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"must be a string, got {type(value).__name__} ({value!r})")
        return value
    raise TypeError(f"unsupported config annotation {tp} at {key}")


def _build(cls: type, data: dict, prefix: str):
    if not isinstance(data, dict):
        _fail(prefix or "<root>", f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            key = f"{prefix}.{k}" if prefix else str(k)
            _fail(key, f"unknown key; {suggest_key(key)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            section = data[f.name]
            if isinstance(section, _Override):
                _fail(key, "is a section; set its keys, e.g. " + f"{key}.<field>=value")
            kwargs[f.name] = _build(tp, section if section is not None else {}, key)
        else:
            kwargs[f.name] = _check_type(key, data[f.name], tp)
    return cls(**kwargs)


class _Override:
    """A `--set` value: YAML-parsed for typed fields, kept verbatim for string fields (so a template like
    "{prompt}\n" is not read as a YAML mapping)."""

    def __init__(self, raw: str, parsed: Any):
        self.raw, self.parsed = raw, parsed


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. trainer.lr=1e-6")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': bad key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), _Override(raw, value)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides (value parsed as YAML) onto a nested dict."""
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{item.split('=', 1)[0]}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML recipe (or the defaults when path is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        data = load_yaml(path)
    data = apply_overrides(data, list(overrides or []))
    cfg = _build(Config, data, "")
    return cfg.validate()


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (for resume checks)."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}.{k}" if prefix else k
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_diff(va, vb, key))
        elif va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


# ----------------------------------------------------------------------------------------------- deepspeed

def effective_zero_stage(cfg: Config, world_size: int) -> int:
    """The ZeRO stage the engine runs: deepspeed.zero_stage, or 0 on one rank with nothing offloaded when
    deepspeed.one_rank_unpartitioned is on (nothing to partition across; the update is the same)."""
    d = cfg.deepspeed
    if world_size == 1 and d.one_rank_unpartitioned and not (d.offload_optimizer or d.offload_param):
        return 0
    return d.zero_stage


def _scaled(value: int, hidden_size: Optional[int], rule) -> Optional[int]:
    """A size key: as set (>= 0), or the model-scaled rule for -1 (None = DeepSpeed's default: no hidden size)."""
    if value >= 0:
        return value
    return int(rule(hidden_size)) if hidden_size else None


def deepspeed_config(cfg: Config, *, world_size: int, use_cuda: bool, micro_batch_size: int = 1,
                     hidden_size: Optional[int] = None) -> dict:
    """Generate the DeepSpeed JSON from the tree. Gradient accumulation is driven by the trainer (it calls
    backward once per packed micro-batch and steps once per mini-batch), so DeepSpeed sees gas = 1 and the
    trainer's loss already carries the global normalizer (grpo_core.losses). `hidden_size` scales the bucket
    and persistence sizes left at -1 (without it those keys are left to DeepSpeed's defaults)."""
    d = cfg.deepspeed
    bf16 = d.bf16 == "on" or (d.bf16 == "auto" and use_cuda)
    betas = list(cfg.trainer.adam_betas)
    stage = effective_zero_stage(cfg, world_size)
    zero: dict[str, Any] = {"stage": stage}
    sizes = {
        "reduce_bucket_size": _scaled(d.reduce_bucket_size, hidden_size, lambda h: h * h),
    }
    if stage in (1, 2):
        sizes["allgather_bucket_size"] = _scaled(d.allgather_bucket_size, hidden_size, lambda h: h * h)
        zero.update({"contiguous_gradients": True, "overlap_comm": use_cuda})
    if stage == 3:
        sizes.update({
            "stage3_param_persistence_threshold": _scaled(d.param_persistence_threshold, hidden_size,
                                                          lambda h: 10 * h),
            "stage3_prefetch_bucket_size": _scaled(d.prefetch_bucket_size, hidden_size, lambda h: 0.9 * h * h),
            "stage3_max_live_parameters": d.max_live_parameters,
        })
        zero.update({
            "stage3_gather_16bit_weights_on_model_save": False,
            "contiguous_gradients": True,
            "overlap_comm": use_cuda,
        })
    if stage > 0:
        zero.update({k: v for k, v in sizes.items() if v is not None})
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_cuda}
    if d.offload_param and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_cuda}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": cfg.trainer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.trainer.lr,
                "betas": betas,
                "eps": cfg.trainer.adam_eps,
                "weight_decay": cfg.trainer.weight_decay,
                "torch_adam": cfg.deepspeed.torch_adam,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
