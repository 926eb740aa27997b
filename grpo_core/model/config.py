"""ModelArgs: the architecture of a Qwen2/Qwen2.5, Qwen3 or Llama 3 decoder, read from and written to an HF
``config.json``.

Two spellings of the rotary settings exist in the wild and both are accepted:
- the classic form released checkpoints ship: top-level ``rope_theta`` and ``rope_scaling``
  (``{"rope_type"|"type": "llama3", "factor": ...}`` or null);
- the form transformers 5 writes: ``rope_parameters = {"rope_theta": ..., "rope_type": ..., ...}``.
``to_hf_config`` writes the classic form, which transformers 4.x, transformers 5 and vLLM all read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# model_type -> HF architecture class name written into config.json.
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class ModelArgs:
    """Architecture hyper-parameters of a decoder-only transformer (names follow HF ``config.json``)."""

    family: str  # "qwen2" | "qwen3" | "llama" (HF model_type)
    vocab_size: int  # rows of the embedding / lm_head
    hidden_size: int  # model width D
    intermediate_size: int  # SwiGLU inner width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads H
    num_key_value_heads: int | None = None  # key/value heads (GQA); None -> H
    head_dim: int | None = None  # per-head width; None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # RoPE base wavelength
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or {"rope_type": "llama3", ...}
    max_position_embeddings: int = 32768  # longest position the checkpoint was trained for (tokens)
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    initializer_range: float = 0.02  # std of the normal init used by from_config
    attention_bias: bool = False  # llama/qwen3: bias on q,k,v,o projections (qwen2 always has q,k,v bias)
    mlp_bias: bool = False  # llama: bias on gate/up/down projections
    bos_token_id: int | None = None  # passed through to config.json
    eos_token_id: int | list[int] | None = None  # passed through to config.json
    pad_token_id: int | None = None  # passed through to config.json
    extra: dict = field(default_factory=dict)  # other keys kept verbatim for the written config.json

    def __post_init__(self) -> None:
        if self.family not in _ARCHITECTURES:
            raise ValueError(
                f"model_type {self.family!r} is not supported; supported: {sorted(_ARCHITECTURES)}"
            )
        for key in _REQUIRED_INT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config key {key!r} must be a positive int, got {value!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if isinstance(self.num_key_value_heads, bool) or not isinstance(self.num_key_value_heads, int) \
                or self.num_key_value_heads <= 0:
            raise ValueError(
                f"config key 'num_key_value_heads' must be a positive int, got {self.num_key_value_heads!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config key 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"config key 'hidden_size' ({self.hidden_size}) is not divisible by 'num_attention_heads' "
                    f"({self.num_attention_heads}) and no 'head_dim' is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0 \
                or self.head_dim % 2:
            raise ValueError(f"config key 'head_dim' must be a positive even int, got {self.head_dim!r}")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            raise ValueError(f"config key 'rope_theta' must be a positive number, got {self.rope_theta!r}")
        self.rope_theta = float(self.rope_theta)
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        if not isinstance(self.rms_norm_eps, (int, float)) or self.rms_norm_eps <= 0:
            raise ValueError(f"config key 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")

    # Per-family layout switches, so the modules never branch on family names.
    @property
    def qkv_bias(self) -> bool:
        """Bias on q/k/v projections: always for Qwen2, ``attention_bias`` otherwise."""
        return True if self.family == "qwen2" else self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Bias on the output projection: never for Qwen2, ``attention_bias`` otherwise."""
        return False if self.family == "qwen2" else self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalises each query/key head before RoPE."""
        return self.family == "qwen3"

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """Read an HF ``config.json`` dict (classic or transformers-5 rope form); errors name the bad key."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (parsed config.json), got {type(config).__name__}")
        if "model_type" not in config:
            raise ValueError("config key 'model_type' is missing; expected one of " f"{sorted(_ARCHITECTURES)}")
        family = config["model_type"]
        if family not in _ARCHITECTURES:
            raise ValueError(
                f"config key 'model_type' = {family!r} is not supported; supported: {sorted(_ARCHITECTURES)}")
        for key in _REQUIRED_INT_KEYS:
            if key not in config:
                raise ValueError(f"config key {key!r} is missing (model_type {family!r})")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config key 'hidden_act' = {act!r} is not supported; only 'silu' (SwiGLU)")
        if config.get("use_sliding_window", False):
            raise ValueError("config key 'use_sliding_window' = true is not supported (full attention only)")
        rope_theta, rope_scaling = _read_rope(config)
        known = {f.name for f in dataclasses.fields(cls)} - {"family", "extra", "rope_theta", "rope_scaling"}
        if family == "qwen2":
            known.discard("attention_bias")  # HF's Qwen2 ignores it: q/k/v always have a bias, o_proj never
        kwargs = {k: config[k] for k in known if k in config and config[k] is not None}
        # HF keeps token ids and a few generation-related entries at the top level; keep them for the round trip.
        extra = {k: config[k] for k in ("sliding_window", "max_window_layers") if k in config}
        return cls(family=family, rope_theta=rope_theta, rope_scaling=rope_scaling, extra=extra, **kwargs)

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """The ``config.json`` dict (classic rope form) that transformers and vLLM load unchanged.

        dtype: e.g. "bfloat16"; written as ``torch_dtype`` (read by transformers 4.x / vLLM) and ``dtype``
        (the transformers-5 name).
        """
        cfg: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.pad_token_id is not None:
            cfg["pad_token_id"] = self.pad_token_id
        if self.family in ("qwen3", "llama"):
            cfg["attention_bias"] = self.attention_bias
        if self.family == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        if self.family in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = False
        for key, value in self.extra.items():
            cfg.setdefault(key, value)
        cfg.setdefault("use_cache", True)
        if dtype is not None:
            cfg["torch_dtype"] = dtype
            cfg["dtype"] = dtype
        return cfg


def _read_rope(config: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, normalised rope_scaling) from either spelling of the rotary settings."""
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"config key 'rope_parameters' must be a dict, got {type(params).__name__}")
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError("config key 'rope_parameters' holds per-layer-type settings, which are not supported")
        if "rope_theta" not in params and "rope_theta" not in config:
            raise ValueError("config key 'rope_parameters' has no 'rope_theta'")
        theta = params.get("rope_theta", config.get("rope_theta"))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return theta, scaling
    return config.get("rope_theta", 10000.0), config.get("rope_scaling")


def _normalise_rope_scaling(scaling: dict | None) -> dict | None:
    """None for plain RoPE, else a dict with 'rope_type' and the parameters that type needs."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"config key 'rope_scaling' must be a dict or null, got {type(scaling).__name__}")
    scaling = dict(scaling)
    legacy_type = scaling.pop("type", None)  # older configs spell it "type"
    rope_type = scaling.get("rope_type", legacy_type) or "default"
    scaling["rope_type"] = rope_type
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"config key 'rope_scaling.rope_type' = {rope_type!r} is not supported; supported: {_ROPE_TYPES}")
    if rope_type == "default":
        return None
    needed = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for key in needed:
        if key not in scaling:
            raise ValueError(f"config key 'rope_scaling.{key}' is missing (rope_type {rope_type!r})")
        if not isinstance(scaling[key], (int, float)) or scaling[key] <= 0:
            raise ValueError(f"config key 'rope_scaling.{key}' must be a positive number, got {scaling[key]!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("config key 'rope_scaling.high_freq_factor' must exceed 'low_freq_factor'")
    return scaling
