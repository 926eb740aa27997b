"""The decoder-only causal LM (Qwen2/Qwen2.5, Qwen3, Llama 3) with HF-identical parameter names.

Module tree (state-dict keys map 1:1 onto HF checkpoints):
    model.embed_tokens, model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
    post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head
``forward`` returns the final hidden states; logits or per-token log-probs come from ``lm_head``.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from grpo_core.model import checkpoint_io
from grpo_core.model.attention import AttnContext, Attention, check_attn_backend, use_flash_attn
from grpo_core.model.config import ModelArgs
from grpo_core.model.kv_cache import KVCache
from grpo_core.model.layers import MLP, LMHead, RMSNorm, RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``model`` submodule)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        # Passing _weight skips nn.Embedding's normal_ init, which on the meta device imports torch._dynamo
        # (seconds); real values always come from init_weights or a checkpoint.
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.zeros(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")
    return resolved


class CausalLM(nn.Module):
    """Decoder-only LM. ``forward`` -> final hidden states [B, T, D]; ``lm_head(h)`` -> logits [B, T, V]."""

    def __init__(self, args: ModelArgs, attn_backend: str = "auto"):
        super().__init__()
        check_attn_backend(attn_backend)
        self.args = args
        self.attn_backend = attn_backend
        self.model = DecoderModel(args)
        tied = self.model.embed_tokens.weight if args.tie_word_embeddings else None
        self.lm_head = LMHead(args.hidden_size, args.vocab_size, weight=tied)
        self.activation_checkpointing = False

    # ---------------------------------------------------------------- setup
    def tie_weights(self) -> None:
        """Make lm_head.weight the embedding Parameter again (after to_empty / re-materialisation)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in backward instead of storing its activations."""
        self.activation_checkpointing = bool(enabled)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, zeros for biases, ones for norms.

        Draws on a seeded CPU generator in module order, so the result does not depend on the device.
        """
        gen = torch.Generator().manual_seed(seed)
        std = self.args.initializer_range

        def normal_(p: torch.Tensor) -> None:
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))

        for module in self.modules():
            if isinstance(module, nn.Linear):
                normal_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                normal_(module.weight)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, LMHead) and not self.args.tie_word_embeddings:
                normal_(module.weight)

    @classmethod
    def _empty(cls, args: ModelArgs, dtype: torch.dtype, device, attn_backend: str) -> "CausalLM":
        # Build on the meta device so no memory is touched or randomly initialised before the real values come.
        with torch.device("meta"):
            model = cls(args, attn_backend=attn_backend)
        model = model.to(dtype=dtype).to_empty(device=torch.device(device) if device is not None else "cpu")
        model.tie_weights()
        return model

    @classmethod
    def from_config(
        cls, args: ModelArgs, dtype: torch.dtype | str = torch.float32, device=None, seed: int = 0,
        attn_backend: str = "auto",
    ) -> "CausalLM":
        """A freshly, reproducibly initialised model (see init_weights)."""
        model = cls._empty(args, _as_dtype(dtype), device, attn_backend)
        model.init_weights(seed)
        return model

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device=None,
        attn_backend: str = "auto",
    ) -> "CausalLM":
        """Load an HF checkpoint directory (config.json + model.safetensors or a sharded index)."""
        args = ModelArgs.from_hf_config(checkpoint_io.read_config(path))
        model = cls._empty(args, _as_dtype(dtype), device, attn_backend)
        expected = set(model.hf_state_dict_keys())
        seen: set[str] = set()
        for shard in checkpoint_io.iter_shards(path):
            if args.tie_word_embeddings:
                shard.pop("lm_head.weight", None)  # some tied checkpoints store the copy; HF ignores it too
            unexpected = sorted(set(shard) - expected)
            if unexpected:
                raise KeyError(f"checkpoint {path} has weights this {args.family} model does not: {unexpected[:8]}")
            model.load_state_dict(shard, strict=False)  # copy_ casts to the model's dtype
            seen.update(shard)
        missing = sorted(expected - seen)
        if missing:
            more = " ..." if len(missing) > 8 else ""
            raise KeyError(f"checkpoint {path} is missing weights: {missing[:8]}{more}")
        model.tie_weights()
        return model

    def hf_state_dict_keys(self) -> list[str]:
        """Keys an HF checkpoint of this model holds (no lm_head.weight when tied)."""
        keys = list(self.state_dict().keys())
        return [k for k in keys if not (self.args.tie_word_embeddings and k == "lm_head.weight")]

    def save_pretrained(
        self,
        out_dir: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_bytes: int = checkpoint_io.DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        """Write config.json + safetensors shard(s) atomically into out_dir (HF layout).

        state_dict: None -> this model's weights; else e.g. full weights gathered from ZeRO-3 partitions
        (same keys as ``self.state_dict()``; lm_head.weight may be absent or present when tied).
        """
        tensors = dict(self.state_dict() if state_dict is None else state_dict)
        if self.args.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        expected = self.hf_state_dict_keys()
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise KeyError(f"state_dict does not match the model: missing {missing[:8]}, unexpected {extra[:8]}")
        tensors = {k: tensors[k] for k in expected}  # HF order: embeddings, layers, norm, lm_head
        first = tensors[expected[0]]
        dtype_name = str(first.dtype).removeprefix("torch.")
        with checkpoint_io.atomic_directory(out_dir) as tmp:
            checkpoint_io.write_weights(tmp, tensors, max_shard_bytes)
            checkpoint_io.write_json(tmp / checkpoint_io.CONFIG_FILE, self.args.to_hf_config(dtype=dtype_name))

    def new_kv_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty KVCache (lengths all 0) in the model's dtype/device unless given."""
        weight = self.model.embed_tokens.weight
        return KVCache(
            self.args.num_hidden_layers, batch_size, max_seq_len, self.args.num_key_value_heads,
            self.args.head_dim, dtype or weight.dtype, device if device is not None else weight.device,
        )

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        input_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (after the last norm).

        input_ids: [B, T] long. position_ids: [B, T] long RoPE positions (default 0..T-1, or restarting at 0
        per packed sequence). cu_seqlens: int32 [S + 1] boundaries of S sequences packed into one row (B == 1,
        cu_seqlens[-1] == T). kv_cache: decode incrementally (needs autograd off); row b's tokens sit at
        cache.lengths[b] + t. input_lengths: [B] long valid prefix per row of a right-padded input (cache only).
        Returns hidden [B, T, D] in the model dtype.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be [B, T] long, got {list(input_ids.shape)} {input_ids.dtype}")
        batch, seq = input_ids.shape
        device = input_ids.device
        h = self.model.embed_tokens(input_ids)
        if kv_cache is not None:
            positions, ctx, valid_count = self._cache_context(batch, seq, position_ids, cu_seqlens, kv_cache,
                                                              input_lengths)
        elif input_lengths is not None:
            raise ValueError("input_lengths is only used with kv_cache (right-padded prefill)")
        elif cu_seqlens is not None:
            positions, ctx = self._varlen_context(batch, seq, position_ids, cu_seqlens, device, h.dtype)
        else:
            if position_ids is None:
                positions = torch.arange(seq, device=device).expand(batch, seq)
            else:
                positions = self._check_positions(position_ids, batch, seq)
            ctx = AttnContext("causal", use_flash=use_flash_attn(self.attn_backend, device, h.dtype))
        cos, sin = self.model.rotary_emb(positions, h.dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and ctx.kind != "cache"
        for layer in self.model.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, ctx, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx)
        h = self.model.norm(h)
        if kv_cache is not None:
            kv_cache.lengths += valid_count
        return h

    @staticmethod
    def _check_positions(position_ids: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        if position_ids.shape != (batch, seq):
            raise ValueError(f"position_ids must be [{batch}, {seq}] like input_ids, got {list(position_ids.shape)}")
        return position_ids

    def _varlen_context(self, batch, seq, position_ids, cu_seqlens, device, dtype):
        if batch != 1:
            raise ValueError(f"cu_seqlens (packed sequences) needs input_ids of shape [1, total], got batch {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(
                f"cu_seqlens must be an int tensor [S + 1], got {list(cu_seqlens.shape)} {cu_seqlens.dtype}")
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        torch._assert_async(cu[-1] == seq, "cu_seqlens[-1] must equal the packed length input_ids.shape[1]")
        token = torch.arange(seq, device=device)
        # Sequence id of every token: how many boundaries cu[1:] lie at or before it.
        seq_id = torch.searchsorted(cu[1:].long(), token, right=True)
        if position_ids is None:
            position_ids = (token - cu.long()[seq_id.clamp(max=cu.numel() - 2)])[None]
        positions = self._check_positions(position_ids, batch, seq)
        if use_flash_attn(self.attn_backend, device, dtype):
            max_seqlen = int((cu[1:] - cu[:-1]).max())  # one host sync per forward, needed by flash-attn
            return positions, AttnContext("varlen", use_flash=True, cu_seqlens=cu, max_seqlen=max_seqlen)
        # SDPA over a right-padded batch [S, L] when its attention work S * L^2 is below that of one
        # block-diagonal [total, total] mask (many short sequences: the training micro-batches), else the mask.
        lengths = cu[1:] - cu[:-1]
        max_len = int(lengths.max())  # one host sync per forward (free on CPU; the flash path has it too)
        n_seq = lengths.numel()
        if n_seq > 1 and n_seq * max_len * max_len < seq * seq:
            offsets = torch.arange(max_len, device=device)
            starts = cu[:-1].long()
            pad_index = (starts[:, None] + offsets[None, :]).clamp(max=seq - 1)
            unpad_index = seq_id * max_len + (token - starts[seq_id.clamp(max=n_seq - 1)])
            return positions, AttnContext("varlen", pad_index=pad_index, unpad_index=unpad_index)
        # SDPA: block-diagonal causal mask [1, 1, total, total], True = attend.
        mask = (seq_id[:, None] == seq_id[None, :]) & (token[None, :] <= token[:, None])
        return positions, AttnContext("varlen", mask=mask[None, None])

    def _cache_context(self, batch, seq, position_ids, cu_seqlens, cache: KVCache, input_lengths):
        if position_ids is not None or cu_seqlens is not None:
            raise ValueError("kv_cache decoding takes its positions from cache.lengths; "
                             "position_ids and cu_seqlens must be None")
        if torch.is_grad_enabled():
            raise RuntimeError("kv_cache decoding writes the cache in place: run it under torch.no_grad() "
                               "or torch.inference_mode()")
        if cache.batch_size != batch:
            raise ValueError(f"kv_cache has {cache.batch_size} rows but input_ids has batch {batch}")
        positions, write_slot, valid_count = cache.write_plan(seq, input_lengths)
        slots = torch.arange(cache.max_seq_len + 1, device=cache.device)
        # Causal by absolute position: slot j is visible to a token at position p iff j <= p. Every such slot
        # holds a valid token (earlier steps, or this step's own writes); the trash slot is never <= a valid p.
        mask = (slots[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, L + 1]
        batch_index = torch.arange(batch, device=cache.device)[:, None].expand(batch, seq)
        ctx = AttnContext("cache", cache=cache, write_slot=write_slot, batch_index=batch_index, mask=mask)
        return positions, ctx, valid_count
