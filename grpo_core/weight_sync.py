"""Streaming the trainer's weights into a rollout engine in size-bounded buckets (ZeRO-3 aware).

Under DeepSpeed ZeRO-3 every rank holds 1/world of each parameter. Gathering the whole model at once (as a
`GatheredParameters(all_params)` state dict does) materialises a second full copy of the model on every GPU
next to the rollout engine's own copy. `iter_weight_buckets` instead walks the module tree and gathers the
*direct* parameters of one submodule at a time, clones them, releases the gathered storage, and yields the
clones in buckets of at most `bucket_bytes`. Peak extra memory is one bucket plus one submodule's gathered
parameters (a big embedding is its own bucket), not a model.

The stream is collective under ZeRO-3: every rank must iterate it to the end, in the same order (each
gather is an all-gather). Every rank gets the full tensors, which is what both engines need: the torch
engine holds a full copy per rank, and a vLLM instance per rank shards full tensors itself (TP slicing in
its weight loaders).

Names are the HF checkpoint's: the module's state-dict keys with `prefix_to_strip` removed (the trainer
wraps the CausalLM as `policy`). A parameter registered under several names (tied `lm_head.weight` is the
`model.embed_tokens.weight` Parameter) is yielded once, under the first name in registration order, which
for a grpo_core CausalLM is `model.embed_tokens.weight`, the name tied HF checkpoints store.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 * 2**20  # 256 MiB: large enough to amortise per-bucket overhead, small next to a model


@dataclass
class SyncStats:
    """What one weight stream moved. `seconds` is filled by `sync_engine_weights` (gather + load)."""

    tensors: int = 0  # tensors yielded
    bytes: int = 0  # total bytes yielded
    buckets: int = 0  # buckets yielded
    max_bucket_bytes: int = 0  # largest bucket yielded
    gather_seconds: float = 0.0  # time spent gathering and cloning (excludes the consumer's time)
    seconds: float = 0.0  # wall time of the whole sync


def _is_zero3(param: Tensor) -> bool:
    # DeepSpeed ZeRO-3 tags every partitioned parameter with ds_id / ds_status.
    return hasattr(param, "ds_id")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _module_entries(module: nn.Module, prefix_to_strip: str) -> Iterator[tuple[nn.Module, list[tuple[str, str]]]]:
    """(submodule, [(local attribute name, HF name)]) for every submodule owning parameters or persistent
    buffers directly, in registration order; shared parameters appear only at their first owner."""
    seen: set[int] = set()
    for mod_name, sub in module.named_modules():
        entries = []
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in sub._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            entries.append((attr, _strip(prefix + attr, prefix_to_strip)))
        for attr, b in sub._buffers.items():
            if b is None or attr in sub._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            entries.append((attr, _strip(prefix + attr, prefix_to_strip)))
        if entries:
            yield sub, entries


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


@torch.no_grad()
def iter_weight_buckets(
    module: nn.Module,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    prefix_to_strip: str = "policy.",
    *,
    device: torch.device | str | None = None,
    stats: SyncStats | None = None,
) -> Iterator[list[tuple[str, Tensor]]]:
    """Yield the module's full weights as buckets of (HF name, tensor) pairs.

    module: a plain nn.Module or one whose parameters DeepSpeed ZeRO-3 partitioned (the DeepSpeed engine's
        `.module`). Under ZeRO-3 this is a collective: every rank must exhaust the iterator.
    bucket_bytes: upper bound on the summed bytes of one bucket; a single tensor larger than it forms a bucket
        of its own.
    prefix_to_strip: removed from the front of every name (e.g. "policy." of the trainer's wrapper).
    device: where the yielded tensors live; default where the (gathered) parameter lives.
    stats: filled in as the stream goes (tensors, bytes, buckets, gather time).

    Every tensor is a detached clone (dtype of the parameter, contiguous), so it stays valid after the
    ZeRO-3 partitions are released and does not alias the trained weights.
    """
    if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be an int > 0, got {bucket_bytes!r}")
    stats = stats if stats is not None else SyncStats()
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for sub, entries in _module_entries(module, prefix_to_strip):
        t0 = time.perf_counter()
        tensors = _gather_clone(sub, entries, device)
        stats.gather_seconds += time.perf_counter() - t0
        for name, tensor in tensors:
            nbytes = _nbytes(tensor)
            if bucket and size + nbytes > bucket_bytes:
                _account(stats, size)
                yield bucket
                bucket, size = [], 0
            bucket.append((name, tensor))
            size += nbytes
            stats.tensors += 1
            stats.bytes += nbytes
        del tensors
    if bucket:
        _account(stats, size)
        yield bucket


def _account(stats: SyncStats, size: int) -> None:
    stats.buckets += 1
    stats.max_bucket_bytes = max(stats.max_bucket_bytes, size)


def _gather_clone(sub: nn.Module, entries: list[tuple[str, str]], device) -> list[tuple[str, Tensor]]:
    """Clone one submodule's direct parameters/buffers, gathering its ZeRO-3 partitions for the duration."""
    params = [sub._parameters[a] for a, _ in entries if a in sub._parameters]
    partitioned = [p for p in params if _is_zero3(p)]

    def clone_all() -> list[tuple[str, Tensor]]:
        out = []
        for attr, name in entries:
            t = sub._parameters[attr] if attr in sub._parameters else sub._buffers[attr]
            t = t.detach()
            out.append((name, (t.to(device) if device is not None else t).clone().contiguous()))
        return out

    if not partitioned:
        return clone_all()
    import deepspeed

    # modifier_rank=None: read-only gather; the partitions are released (not re-scattered) on exit.
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        return clone_all()


def flatten_buckets(buckets: Iterable[list[tuple[str, Tensor]]]) -> Iterator[tuple[str, Tensor]]:
    """The (name, tensor) pairs of a bucket stream, lazily (one bucket alive at a time)."""
    for bucket in buckets:
        yield from bucket


def sync_engine_weights(
    engine,
    module: nn.Module,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    prefix_to_strip: str = "policy.",
) -> SyncStats:
    """Stream `module`'s weights into a rollout engine; returns timing and volume.

    Engines with `load_weight_buckets(buckets)` (the vLLM engine) take the buckets as they come; others get
    the flattened pairs through `sync_weights`. Collective under ZeRO-3: call on every rank.
    """
    stats = SyncStats()
    t0 = time.perf_counter()
    buckets = iter_weight_buckets(module, bucket_bytes, prefix_to_strip, stats=stats)
    if hasattr(engine, "load_weight_buckets"):
        engine.load_weight_buckets(buckets)
    else:
        engine.sync_weights(flatten_buckets(buckets))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # so the time covers the copies, not just their launch
    stats.seconds = time.perf_counter() - t0
    logger.info("weight sync: %.3f s (gather %.3f s), %.1f MiB in %d buckets (largest %.1f MiB), %d tensors",
                stats.seconds, stats.gather_seconds, stats.bytes / 2**20, stats.buckets,
                stats.max_bucket_bytes / 2**20, stats.tensors)
    return stats
