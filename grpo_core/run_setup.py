"""Everything a run needs before the loop starts: tokenizer, model directory, datasets, verifier, rewards,
and the optional supervised warm start. With the embedded defaults (no model path, no data files) it builds
the project's tiny tokenizer and model and synthetic verifiable tasks, so a fresh CPU machine can train
with nothing downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpo_core import distributed as gdist
from grpo_core.config import Config
from grpo_core.distributed import DistInfo
from grpo_core.scoring import Scorer  # noqa: F401  (moved to grpo_core.scoring; kept importable from here)


@dataclass
class RunAssets:
    tokenizer: Any
    model_dir: str  # the weights the run starts from (after the warm start, when there is one)
    reference_dir: str  # frozen reference for the KL term: the starting weights
    train_set: Any
    eval_set: Any
    verifier: Scorer
    policy: Any  # the plain CausalLM the DeepSpeed engine wraps
    warm_start_summary: dict = field(default_factory=dict)

    def rewards(self, results, lengths, finish_reasons, texts=None):
        return self.verifier.rewards(results, lengths, finish_reasons, texts)


def _build_tiny(cfg: Config, out: Path) -> str:
    from grpo_core.tiny import build_tiny_model_dir

    m = cfg.model
    return build_tiny_model_dir(out, family=m.tiny_family, hidden_size=m.tiny_hidden_size,
                                num_layers=m.tiny_num_layers, num_heads=m.tiny_num_heads,
                                num_kv_heads=m.tiny_num_kv_heads, intermediate_size=m.tiny_intermediate_size,
                                seed=cfg.trainer.seed)


def _make_synthetic_data(cfg: Config, out: Path) -> tuple[list[str], list[str]]:
    from grpo_core.data.io import write_dataset
    from grpo_core.tasks.synthetic import make_train_test

    d = cfg.data
    train, test = make_train_test(d.synthetic_kinds, d.synthetic_train_size, d.synthetic_eval_size,
                                  seed=cfg.trainer.seed, level=d.synthetic_level)
    write_dataset(train, out / "train.parquet")
    files_eval = []
    if test:
        write_dataset(test, out / "test.parquet")
        files_eval = [str(out / "test.parquet")]
    return [str(out / "train.parquet")], files_eval


def _context_tokens(model_dir: str | Path) -> int | None:
    """The model's max_position_embeddings (config.json), None when it gives none."""
    from grpo_core.model import checkpoint_io

    value = checkpoint_io.read_config(model_dir).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def prepare_run(cfg: Config, dist_info: DistInfo, resuming: bool = False) -> RunAssets:
    from grpo_core.data.dataset import PromptDataset
    from grpo_core.model import CausalLM
    from grpo_core.tokenizer import Tokenizer

    out = Path(cfg.trainer.output_dir)
    model_dir = cfg.model.path
    train_files, eval_files = list(cfg.data.train_files), list(cfg.data.eval_files)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not model_dir:
            _build_tiny(cfg, out / "base_model")
        if not train_files:
            _make_synthetic_data(cfg, out / "data")
    gdist.barrier()
    if not model_dir:
        model_dir = str(out / "base_model")
    if not cfg.data.train_files:
        train_files = [str(out / "data" / "train.parquet")]
        if not eval_files and cfg.data.synthetic_eval_size > 0:
            eval_files = [str(out / "data" / "test.parquet")]
    if not Path(model_dir, "config.json").exists():
        raise FileNotFoundError(f"model.path '{model_dir}' has no config.json (expected an HF-layout directory)")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    d = cfg.data
    # A prompt must leave room to generate: the bound is the smaller of data.max_prompt_tokens and the model's
    # context less one token (a longer prompt is dropped and counted like any other too-long prompt).
    context = _context_tokens(model_dir)
    kw = dict(prompt_template=d.prompt_template or None,
              max_prompt_tokens=min(d.max_prompt_tokens, context - 1) if context else d.max_prompt_tokens,
              allow_unlabeled=d.allow_unlabeled, prompt_key=d.prompt_key, answer_key=d.answer_key,
              system_prompt=d.system_prompt, chat_template_kwargs=d.chat_template_kwargs)
    train_set = PromptDataset(train_files, tokenizer, **kw)
    eval_set = PromptDataset(eval_files, tokenizer, **kw) if eval_files else None
    policy = CausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_backend=cfg.model.attn_backend)
    summary: dict = {}
    scorer = Scorer(cfg)
    start_dir = model_dir
    if cfg.warm_start.steps > 0 and resuming and Path(out / "warm_start_model" / "config.json").exists():
        start_dir = str(out / "warm_start_model")  # the checkpoint being resumed holds the trained weights
    elif cfg.warm_start.steps > 0:
        from grpo_core.warm_start import supervised_warm_start

        # The warm start runs once, on rank 0, and its weights reach every rank through the directory it writes
        # (the run's starting checkpoint: rollout copy, KL reference). Running it on every rank would give weights
        # that differ with each rank's thread count or CPU; the digest check below proves they agree.
        start_dir = str(out / "warm_start_model")
        if dist_info.is_main:
            summary = supervised_warm_start(policy, tokenizer, train_set, cfg, device=dist_info.device, scorer=scorer)
            policy.save_pretrained(start_dir)
            tokenizer.save_pretrained(start_dir)
        gdist.barrier()
        if not dist_info.is_main:
            policy = CausalLM.from_pretrained(start_dir, dtype=torch.float32, attn_backend=cfg.model.attn_backend)
        summary = gdist.all_gather_objects(summary)[0]
        gdist.check_same_weights(policy, what=f"the warm-started weights ({start_dir})")
    return RunAssets(tokenizer=tokenizer, model_dir=start_dir, reference_dir=start_dir, train_set=train_set,
                     eval_set=eval_set, verifier=scorer, policy=policy, warm_start_summary=summary)

