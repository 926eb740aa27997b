"""Building blocks of the decoder: RMSNorm, rotary position embedding, SwiGLU MLP and the LM head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from grpo_core.model.config import ModelArgs


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 and cast back before the weight (as HF)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] any float dtype -> same shape and dtype."""
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_inv_freq(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] fp32 for the config's rope type (default, linear, llama3)."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_len = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. inv_freq is kept as a plain attribute, not a buffer, so that
    ``model.to(torch.bfloat16)`` never rounds it and meta-device construction never loses it."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            # Computed on the CPU like HF's, so GPU runs use bit-identical frequencies.
            self._inv_freq[device] = rope_inv_freq(self.args).to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [B, T] long -> (cos, sin), each [B, T, head_dim] in `dtype` (computed in fp32)."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, T, heads, head_dim]; cos/sin: [B, T, head_dim] -> x's shape and dtype."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fused_logprob_entropy():
    # Imported lazily: kernels/ pulls in Triton, which the plain forward never needs.
    try:
        from grpo_kernels import fused_logprob_entropy
    except ImportError:
        from grpo_kernels.logprob_entropy import fused_logprob_entropy
    return fused_logprob_entropy


class LMHead(nn.Module):
    """Output projection holding one ``weight`` [V, D] (state-dict key ``lm_head.weight``, like HF's Linear).

    It is a module, not a bare matrix multiply in the caller, because under DeepSpeed ZeRO-3 the partitioned
    weight is gathered only while a forward of the module that owns it runs. With tied embeddings ``weight``
    is the embedding Parameter itself.
    """

    def __init__(self, hidden_size: int, vocab_size: int, weight: nn.Parameter | None = None):
        super().__init__()
        if weight is None:
            weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        if tuple(weight.shape) != (vocab_size, hidden_size):
            raise ValueError(f"lm_head weight must be [{vocab_size}, {hidden_size}], got {list(weight.shape)}")
        self.weight = weight

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor | None = None,
        temperature: float = 1.0,
        with_entropy: bool = True,
        backend: str = "auto",
        loss_fn=None,
    ):
        """Without targets: hidden [..., D] -> logits [..., V] (hidden's dtype).

        With targets and loss_fn (hidden [N, D], targets [N]): ``grpo_kernels.fused_token_loss`` - returns
        (loss, logprob [N], entropy [N]) with the loss's gradients made in this forward (see kernels/token_loss.py).

        With targets [...] int64 (-100 = ignored): returns (logprob [...] fp32, entropy [...] fp32 or whatever
        the kernel gives when with_entropy=False) of softmax(logits / temperature), computed by
        ``grpo_kernels.fused_logprob_entropy`` chunk by chunk, so the [N, V] logits are never materialised.
        """
        if targets is None:
            return F.linear(hidden, self.weight)
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(f"targets shape {list(targets.shape)} must equal hidden shape without D "
                             f"{list(hidden.shape[:-1])}")
        if loss_fn is not None:
            from grpo_kernels.token_loss import fused_token_loss

            return fused_token_loss(hidden.reshape(-1, hidden.shape[-1]), self.weight, targets.reshape(-1).long(),
                                    loss_fn, temperature, with_entropy=with_entropy, backend=backend)
        fused = _fused_logprob_entropy()
        lead = hidden.shape[:-1]
        logprob, entropy = fused(
            hidden.reshape(-1, hidden.shape[-1]), self.weight, targets.reshape(-1).long(),
            temperature=temperature, with_entropy=with_entropy, backend=backend,
        )
        logprob = logprob.view(lead)
        if entropy is not None and entropy.numel() == logprob.numel():
            entropy = entropy.view(lead)
        return logprob, entropy

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, vocab={self.weight.shape[0]}"
