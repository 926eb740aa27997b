"""Prompt data: verl / plain rows from parquet or JSONL, prompt rendering, resumable sharded sampling."""
from grpo_core.data.dataset import PromptDataset, render_prompt
from grpo_core.data.io import DataError, read_records, write_dataset
from grpo_core.data.sampler import PromptSampler, epoch_permutation, shard_batch
from grpo_core.data.schema import PLAIN, VERL, Sample

__all__ = [
    "DataError",
    "PLAIN",
    "PromptDataset",
    "PromptSampler",
    "Sample",
    "VERL",
    "epoch_permutation",
    "read_records",
    "render_prompt",
    "shard_batch",
    "write_dataset",
]
