"""Progress bars for the phases of a run that take more than a few seconds: building data, the supervised warm
start, evaluation, `grpo eval`. Each shows done/total, rate and ETA (tqdm) on stderr, on rank 0 only.

A bar waits `delay` seconds before it first draws, so a phase that ends sooner prints nothing at all.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional


def is_main_process() -> bool:
    """Rank 0 (or a lone process), from the launcher's environment: usable before torch.distributed is up."""
    return os.environ.get("RANK", "0") in ("", "0")


def progress_bar(total: Optional[int], desc: str, *, unit: str = "it", enabled: bool = True, leave: bool = True,
                 delay: float = 0.0, iterable: Optional[Iterable] = None):
    """A tqdm bar (disabled off rank 0 or when not enabled); use as a context manager or iterate it."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not (enabled and is_main_process()),
                leave=leave, delay=delay, dynamic_ncols=True)


def generate_with_progress(engine, prompts: list[list[int]], params, *, desc: str, enabled: bool = True,
                           request_ids: Optional[list[int]] = None, chunk_prompts: Optional[int] = None,
                           leave: bool = True, delay: float = 0.0) -> list:
    """`engine.generate(prompts, params, request_ids)` in chunks of prompts, with a bar counting prompts.

    Each prompt keeps its request id (default: its index in `prompts`), so its samples do not depend on the
    chunking (the engine contract); Generations come back in the same prompt-major order with prompt_index
    relative to `prompts`, exactly as one call would return them. Chunks hold about the engine's batch
    (max_batch_size rows, default 256) so the engine stays full.
    """
    if not prompts:
        return engine.generate(prompts, params, request_ids=request_ids)
    ids = list(range(len(prompts))) if request_ids is None else list(request_ids)
    if chunk_prompts is None:
        rows = getattr(engine, "max_batch_size", None) or 256
        chunk_prompts = max(1, rows // max(1, params.n))
    out = []
    with progress_bar(len(prompts), desc, unit="prompt", enabled=enabled, leave=leave, delay=delay) as bar:
        for start in range(0, len(prompts), chunk_prompts):
            part = prompts[start:start + chunk_prompts]
            gens = engine.generate(part, params, request_ids=ids[start:start + chunk_prompts])
            out.extend(dataclasses.replace(g, prompt_index=g.prompt_index + start) for g in gens)
            bar.update(len(part))
    return out
