"""Checks `grpo train` makes before any heavy start-up (DeepSpeed, model load, warm start) and before writing
anything: the model directory, data files, optional extras, the device and the checkpoint to resume. Each
problem is one PreflightError naming the key, the file and the fix; all of it reads only headers and metadata,
so it takes well under a second on a local disk."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from grpo_core import GPU_EXTRA_INSTALL
from grpo_core.config import Config
from grpo_core.errors import PreflightError

GPU_EXTRA = GPU_EXTRA_INSTALL


def check_model_dir(path: str, key: str = "model.path") -> None:
    """An HF-layout directory: config.json this project reads, float safetensors weights that are whole and
    match the architecture, tokenizer.json."""
    p = Path(path)
    if not p.exists():
        raise PreflightError(f"{key} '{path}': no such directory")
    if not p.is_dir():
        raise PreflightError(f"{key} '{path}' is not a directory (expected an HF-layout model directory)")
    if not (p / "config.json").is_file():
        raise PreflightError(f"{key} '{path}' has no config.json (expected an HF-layout model directory: "
                             f"config.json, *.safetensors, tokenizer.json)")
    if not (p / "tokenizer.json").is_file():
        raise PreflightError(f"{key} '{path}' has no tokenizer.json")
    import torch

    from grpo_core.model import checkpoint_io
    from grpo_core.model.config import ModelArgs

    try:
        args = ModelArgs.from_hf_config(checkpoint_io.read_config(p))
    except (ValueError, KeyError, TypeError) as e:
        raise PreflightError(f"{key} '{path}': config.json cannot be used: {e}") from None
    try:
        names = checkpoint_io.check_weight_headers(p)
    except (FileNotFoundError, ValueError) as e:
        raise PreflightError(f"{key} '{path}': {e}") from None
    from grpo_core.model import CausalLM

    with torch.device("meta"):  # the architecture's weight names, with no memory touched
        expected = set(CausalLM(args).hf_state_dict_keys())
    have = set(names)
    if args.tie_word_embeddings:
        have.discard("lm_head.weight")
    missing, extra = sorted(expected - have), sorted(have - expected)
    if missing:
        raise PreflightError(f"{key} '{path}': the weights lack {len(missing)} tensor(s) of this {args.family} "
                             f"model, e.g. {missing[:3]}")
    if extra:
        raise PreflightError(f"{key} '{path}': the weights hold {len(extra)} tensor(s) this {args.family} model does "
                             f"not have, e.g. {extra[:3]}")


def check_data_file(path: str, key: str) -> None:
    p = Path(path)
    if not p.exists():
        raise PreflightError(f"{key}: '{path}' not found")
    if not p.is_file():
        raise PreflightError(f"{key}: '{path}' is not a file")
    if p.stat().st_size == 0:
        raise PreflightError(f"{key}: '{path}' is empty")
    from grpo_core.data.io import DataError, read_records

    try:  # the format-level read (parquet / JSON Lines), as the run will do it, before anything is written
        rows, _ = read_records(p)
    except DataError as e:
        raise PreflightError(f"{key}: {e}") from None
    if not rows:
        raise PreflightError(f"{key}: '{path}' has 0 rows")


def check_train(cfg: Config, resume: str = "none") -> None:
    """Everything `grpo train` can check without starting up; PreflightError on the first problem."""
    r, m = cfg.rollout, cfg.model
    if r.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise PreflightError(f"rollout.engine=vllm needs vLLM, which is not installed: {GPU_EXTRA} on a CUDA "
                                 f"machine, or set rollout.engine=torch")
        import torch

        if not torch.cuda.is_available():
            raise PreflightError("rollout.engine=vllm needs a CUDA GPU and none is visible; set rollout.engine=torch")
    if m.attn_backend == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        raise PreflightError(f"model.attn_backend=flash_attn needs flash-attn, which is not installed: {GPU_EXTRA}, "
                             f"or set model.attn_backend=sdpa")
    if cfg.trainer.device == "cuda" and not __import__("torch").cuda.is_available():
        raise PreflightError("trainer.device=cuda but no CUDA device is visible; set trainer.device=cpu or auto")
    if m.path:
        check_model_dir(m.path)
    for key in ("train_files", "eval_files"):
        for f in getattr(cfg.data, key):
            check_data_file(f, f"data.{key}")
    from grpo_core.scoring import check_custom_functions

    check_custom_functions(cfg)  # imported and signature-checked in a throwaway process, before any write
    if resume not in (None, "", "none", "auto"):
        p = Path(resume)
        if not p.is_dir():
            raise PreflightError(f"--resume {resume}: no such checkpoint directory")
        if not (p / "trainer_state.json").is_file():
            raise PreflightError(f"--resume {resume}: not a trainer checkpoint (no trainer_state.json); "
                                 f"expected <output_dir>/checkpoints/step_N")
        try:
            json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PreflightError(f"--resume {resume}: trainer_state.json is unreadable ({e})") from None
