"""Static key/value cache for incremental decoding, one preallocated slab for all layers."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for ``batch_size`` rows of up to ``max_seq_len`` tokens.

    Layout per layer: k, v [B, max_seq_len + 1, num_kv_heads, head_dim]. The extra last slot is a trash slot:
    padded tokens of a right-padded prefill and positions past the end are written there, so a valid slot is
    only ever written by a valid token and no write needs a host-side check. ``lengths`` [B] long counts the
    valid tokens cached per row; the model advances it in place after each forward.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"KVCache needs batch_size > 0 and max_seq_len > 0, got {batch_size}, {max_seq_len}")
        shape = (num_layers, batch_size, max_seq_len + 1, num_kv_heads, head_dim)
        # Zeros, not empty: masked slots still enter softmax(..) @ v as 0 * v, and 0 * NaN would poison rows.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.k.device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2] - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (k, v) of one layer, each [B, max_seq_len + 1, num_kv_heads, head_dim]."""
        return self.k[index], self.v[index]

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the cached tokens of all rows, or only of ``rows`` (bool mask [B] or index tensor).

        Stale keys/values stay in memory; they are never attended to because attention stops at ``lengths``.
        """
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    def write_plan(
        self, num_new: int, input_lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the next ``num_new`` tokens per row go, without any host sync.

        Returns:
            positions [B, T] long: absolute positions (also the RoPE positions) lengths[b] + t.
            write_slot [B, T] long: the slot each token is written to (the trash slot for padding / overflow).
            valid_count [B] long: how much ``lengths`` advances after the forward.
        """
        batch = self.batch_size
        steps = torch.arange(num_new, device=self.device)
        positions = self.lengths[:, None] + steps[None, :]
        if input_lengths is None:
            valid_count = torch.full((batch,), num_new, dtype=torch.long, device=self.device)
            valid = torch.ones(batch, num_new, dtype=torch.bool, device=self.device)
        else:
            input_lengths = input_lengths.to(device=self.device, dtype=torch.long)
            if input_lengths.shape != (batch,):
                raise ValueError(
                    f"input_lengths must be [{batch}] (one per cache row), got {list(input_lengths.shape)}")
            valid_count = input_lengths.clamp(0, num_new)
            valid = steps[None, :] < valid_count[:, None]
        # A device-side assert: raises on the CPU at once, on CUDA at the next sync, never forces one.
        torch._assert_async(
            (self.lengths + valid_count <= self.max_seq_len).all(),
            f"KV cache overflow: a row would hold more than max_seq_len={self.max_seq_len} tokens",
        )
        in_range = positions < self.max_seq_len
        write_slot = torch.where(valid & in_range, positions, torch.full_like(positions, self.max_seq_len))
        return positions, write_slot, valid_count
