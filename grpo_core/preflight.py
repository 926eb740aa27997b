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
TINY_VOCAB = 101  # the tiny tokenizer's vocabulary (grpo_core.tokenizer.build_tiny_tokenizer)


def check_model_dir(path: str, key: str = "model.path"):
    """An HF-layout directory: config.json this project reads, float safetensors weights that are whole and
    match the architecture (names and shapes), a tokenizer.json that loads. Returns the ModelArgs."""
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
    if args.max_position_embeddings < 2:
        raise PreflightError(f"{key} '{path}': config.json max_position_embeddings={args.max_position_embeddings} "
                             f"leaves no room for a prompt and a response")
    shapes: dict = {}
    try:
        names = checkpoint_io.check_weight_headers(p, shapes)
    except (FileNotFoundError, ValueError) as e:
        raise PreflightError(f"{key} '{path}': {e}") from None
    from grpo_core.model import CausalLM

    with torch.device("meta"):  # the architecture's weight names and shapes, with no memory touched
        model = CausalLM(args)
        want_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        expected = set(model.hf_state_dict_keys())
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
    wrong = [f"{n} is {list(shapes[n][0])} in {shapes[n][1]}, config.json gives {list(want_shapes[n])}"
             for n in sorted(expected & have) if n in shapes and tuple(shapes[n][0]) != want_shapes[n]]
    if wrong:
        raise PreflightError(f"{key} '{path}': config.json does not match the weights ({len(wrong)} tensor(s), "
                             f"e.g. {wrong[0]}); use the config.json the weights were saved with")
    from grpo_core.errors import UserError
    from grpo_core.tokenizer import Tokenizer

    try:
        tokens = Tokenizer.from_pretrained(p).vocab_size
    except UserError as e:
        raise PreflightError(f"{key} '{path}': {e}") from None
    if tokens > args.vocab_size:
        raise PreflightError(f"{key} '{path}': tokenizer.json has {tokens} tokens but the model's embedding has "
                             f"{args.vocab_size} rows (config.json vocab_size); they come from different models")
    return args


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def parameter_count(args) -> int:
    """Parameters of a decoder-only model from its architecture (an estimate for memory; biases and norms
    included)."""
    h, inter, layers = args.hidden_size, args.intermediate_size, args.num_hidden_layers
    heads = args.num_attention_heads
    kv = args.num_key_value_heads or heads
    hd = args.head_dim or h // heads
    attn = h * heads * hd * 2 + h * kv * hd * 2 + (heads + 2 * kv) * hd
    per_layer = attn + 3 * h * inter + 2 * h
    embed = args.vocab_size * h * (1 if args.tie_word_embeddings else 2)
    return embed + layers * per_layer + h


def check_memory(cfg: Config, args) -> None:
    """Refuse a model whose fp32 training state cannot fit this machine's memory (before anything is built):
    16 bytes per parameter on the host (weights, gradients, two Adam moments) for a CPU run."""
    import torch

    on_cpu = cfg.trainer.device == "cpu" or (cfg.trainer.device == "auto" and not torch.cuda.is_available())
    n = parameter_count(args)
    need = 16 * n
    if on_cpu:
        have = _available_bytes()
        where = "available memory"
    else:
        have = None if cfg.deepspeed.offload_param else torch.cuda.get_device_properties(0).total_memory * max(
            1, int(__import__("os").environ.get("WORLD_SIZE", "1")))
        need = 2 * n  # at least the bf16 weights, partitioned over the ranks
        where = "GPU memory (all ranks)"
    if have is not None and need > have:
        what = "model.path" if cfg.model.path else "model.tiny_hidden_size / tiny_num_layers / tiny_intermediate_size"
        raise PreflightError(f"{what}: the model has about {n / 1e9:.3g}B parameters and needs at least "
                             f"{need / 2**30:.3g} GiB, but this machine has {have / 2**30:.3g} GiB of {where}; "
                             f"choose a smaller model" + (" or trainer.device=cuda" if on_cpu else
                                                          ", more ranks or deepspeed.offload_param"))


def tiny_model_args(cfg: Config):
    from grpo_core.model.config import ModelArgs

    m = cfg.model
    return ModelArgs(family=m.tiny_family, vocab_size=TINY_VOCAB, hidden_size=m.tiny_hidden_size,
                     intermediate_size=m.tiny_intermediate_size, num_hidden_layers=m.tiny_num_layers,
                     num_attention_heads=m.tiny_num_heads, num_key_value_heads=m.tiny_num_kv_heads,
                     tie_word_embeddings=True)


def check_data_file(path: str, key: str) -> None:
    p = Path(path)
    if not p.exists():
        raise PreflightError(f"{key}: '{path}' not found")
    if p.is_dir():  # a partitioned parquet dataset: read_records below reads it whole
        pass
    elif not p.is_file():
        raise PreflightError(f"{key}: '{path}' is not a file")
    elif p.stat().st_size == 0:
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
    check_memory(cfg, check_model_dir(m.path) if m.path else tiny_model_args(cfg))
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
