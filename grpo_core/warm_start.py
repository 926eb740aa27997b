"""Supervised warm start on the data's worked solutions, so a freshly initialised tiny model earns some
reward in its first rollouts (logged as such: it is not RL). Runs once, on rank 0, on the plain model before
DeepSpeed wraps it (run_setup hands the weights to the other ranks). With warm_start.target_accuracy it stops at
the first check whose greedy accuracy on a fixed set of training prompts reaches the target."""
from __future__ import annotations

import random
import time

import torch

from grpo_core.config import Config
from grpo_core.packing import pack_sequences
from grpo_core.progress import progress_bar


def _sequences(train_set, tokenizer) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    out = []
    for s in train_set.samples:
        if not s.solution:
            continue
        response = tokenizer.encode(s.solution) + ([eos] if eos is not None else [])
        out.append((list(s.prompt_ids), response))
    return out


def greedy_accuracy(policy, tokenizer, samples, scorer, cfg: Config) -> float:
    """Greedy accuracy of the plain policy on `samples` (one response each, the rollout's token budget)."""
    from grpo_core.evaluate import eval_sampling_params
    from grpo_core.rollout.torch_engine import TorchRolloutEngine

    was_training = policy.training
    policy.eval()
    engine = TorchRolloutEngine(policy, tokenizer, max_batch_size=cfg.rollout.max_batch_size)
    gens = engine.generate([s.prompt_ids for s in samples], eval_sampling_params(cfg, seed=cfg.trainer.seed))
    results = scorer.score([g.text or "" for g in gens], [s.answer for s in samples], list(range(len(samples))),
                           rows=samples)
    policy.train(was_training)
    return sum(int(r.correct) for r in results) / max(1, len(samples))


def supervised_warm_start(policy, tokenizer, train_set, cfg: Config, device: torch.device, scorer=None) -> dict:
    """Cross-entropy on (prompt -> worked solution + eos) pairs for up to cfg.warm_start.steps AdamW steps;
    with warm_start.target_accuracy > 0 (and a scorer) it stops once the check reaches the target."""
    ws = cfg.warm_start
    data = _sequences(train_set, tokenizer)
    if not data:
        raise ValueError("warm_start.steps > 0 but no training row has a 'solution' to learn from "
                         "(set warm_start.steps=0 or use data with worked solutions)")
    rng = random.Random(cfg.trainer.seed)
    checking = ws.target_accuracy > 0 and scorer is not None
    if checking:  # a fixed set of prompts, drawn with its own generator so the training batches stay as without
        picks = random.Random(cfg.trainer.seed + 1).sample(range(len(train_set)), min(ws.check_prompts, len(train_set)))
        check_samples = train_set.get_batch(sorted(picks))
    checks: list[tuple[int, float]] = []
    policy.to(device).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=ws.lr, weight_decay=0.0)
    t0 = time.time()
    losses = []
    bar = progress_bar(ws.steps, "warm start (supervised)", unit="step", enabled=cfg.logging.progress_bar)
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
        bar.update(1)
        if step % 10 == 0 or step == ws.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", refresh=False)
        if checking and (step + 1) % ws.check_every == 0:
            checks.append((step + 1, greedy_accuracy(policy, tokenizer, check_samples, scorer, cfg)))
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", acc=f"{checks[-1][1]:.2f}",
                            refresh=False)
            if checks[-1][1] >= ws.target_accuracy:
                break
    bar.close()
    policy.zero_grad(set_to_none=True)
    out = {"warm_start_steps": len(losses), "warm_start_final_loss": sum(losses[-10:]) / len(losses[-10:]),
           "warm_start_seconds": time.time() - t0}
    if checking:
        out["warm_start_train_accuracy"] = checks[-1][1] if checks else None
        out["warm_start_reached_target"] = bool(checks) and checks[-1][1] >= ws.target_accuracy
    return out
