"""Supervised warm start on the data's worked solutions, so a freshly initialised tiny model earns some
reward in its first rollouts (logged as such: it is not RL). Runs on the plain model before DeepSpeed wraps
it; every rank runs the same seeded steps on the same data and ends with the same weights."""
from __future__ import annotations

import random
import time

import torch

from grpo_core.config import Config
from grpo_core.packing import pack_sequences


def _sequences(train_set, tokenizer) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    out = []
    for s in train_set.samples:
        if not s.solution:
            continue
        response = tokenizer.encode(s.solution) + ([eos] if eos is not None else [])
        out.append((list(s.prompt_ids), response))
    return out


def supervised_warm_start(policy, tokenizer, train_set, cfg: Config, device: torch.device) -> dict:
    """Cross-entropy on (prompt -> worked solution + eos) pairs for cfg.warm_start.steps AdamW steps."""
    ws = cfg.warm_start
    data = _sequences(train_set, tokenizer)
    if not data:
        raise ValueError("warm_start.steps > 0 but no training row has a 'solution' to learn from "
                         "(set warm_start.steps=0 or use data with worked solutions)")
    rng = random.Random(cfg.trainer.seed)
    policy.to(device).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=ws.lr, weight_decay=0.0)
    t0 = time.time()
    losses = []
    for step in range(ws.steps):
        lr = ws.lr * min(1.0, (step + 1) / max(1, ws.steps // 10)) * (0.5 + 0.5 * (1 - step / ws.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [data[rng.randrange(len(data))] for _ in range(ws.batch_size)]
        packed = pack_sequences([p for p, _ in batch], [r for _, r in batch], device=device)
        hidden = policy(packed.input_ids, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens)[0]
        logprob, _ = policy.lm_head(hidden[packed.response_positions], targets=packed.targets, temperature=1.0,
                                    with_entropy=False, backend=cfg.model.kernel_backend)
        loss = -logprob.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    policy.zero_grad(set_to_none=True)
    return {"warm_start_steps": ws.steps, "warm_start_final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "warm_start_seconds": time.time() - t0}
