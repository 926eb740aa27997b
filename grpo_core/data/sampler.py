"""Deterministic, resumable prompt sampling with data-parallel sharding.

The order of epoch e is a permutation fixed by (seed, e) alone. A cursor (epoch, position) marks the next
unread index; `next_batch(n)` reads n indices from there, running into the next epoch when one ends, so
every prompt is seen once per epoch and no batch is ever short. The cursor is the whole state: saving it
with `state_dict()` and restoring it with `load_state_dict()` continues the exact same index stream.

Every rank draws the same global batch (the same sampler state on all ranks) and keeps its own
contiguous share (`shard_batch`), so the global batch order does not depend on the world size.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

_STATE_VERSION = 1


def epoch_permutation(dataset_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of indices 0..dataset_len-1 for one epoch, a function of (seed, epoch) only.

    Python's `random.Random` seeded with a string (version-2 seeding, SHA-512 based) and its shuffle
    are stable across Python releases and platforms, so a checkpoint resumes the same order anywhere.
    """
    order = list(range(dataset_len))
    if shuffle:
        random.Random(f"grpo_core.sampler:{seed}:{epoch}").shuffle(order)
    return order


def shard_batch(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous share of a global batch; the shares of ranks 0..W-1 concatenate to it.

    The global batch size must divide evenly, so every rank runs the same number of steps.
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if len(batch) % world_size:
        raise ValueError(f"global batch of {len(batch)} prompts does not divide evenly over world_size={world_size}")
    per_rank = len(batch) // world_size
    return list(batch[rank * per_rank:(rank + 1) * per_rank])


class PromptSampler:
    """Endless, epoch-wise shuffled stream of dataset indices with a saveable cursor.

    Args:
        dataset_len: number of samples (> 0).
        batch_size: default global batch size of `next_batch()` (prompts per step, all ranks together).
        seed: shuffling seed; the same seed gives the same stream.
        rank, world_size: this process's data-parallel position, used by `next_local_batch`.
        shuffle: False keeps the file order in every epoch.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} does not divide evenly over world_size={world_size}")
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def _current_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order = epoch_permutation(self.dataset_len, self.seed, self.epoch, self.shuffle)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self, n: int | None = None) -> list[int]:
        """The next n global indices (default batch_size), crossing epoch boundaries as needed."""
        n = self.batch_size if n is None else n
        if n <= 0:
            raise ValueError(f"batch size must be positive, got {n}")
        batch: list[int] = []
        while len(batch) < n:
            order = self._current_order()
            take = min(n - len(batch), self.dataset_len - self.position)
            batch.extend(order[self.position:self.position + take])
            self.position += take
            if self.position == self.dataset_len:
                self.epoch += 1
                self.position = 0
        return batch

    def next_local_batch(self, n: int | None = None) -> list[int]:
        """This rank's share of the next global batch of n (default batch_size) indices."""
        return shard_batch(self.next_batch(n), self.rank, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        """The cursor and what fixes the order; plain ints, safe for torch.save / JSON."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor saved by `state_dict`.

        The seed, dataset length and shuffle flag must match: with another order the saved cursor
        would silently point at different prompts. (The world size may differ: the global stream
        does not depend on it.)
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r} is not {_STATE_VERSION}")
        for key in ("seed", "dataset_len", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {key}={getattr(self, key)!r}; "
                    "the saved cursor would point at different prompts"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.dataset_len:
            raise ValueError(f"sampler state has an invalid cursor epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per epoch (fractional when batch_size does not divide the dataset)."""
        return self.dataset_len / self.batch_size
