"""Evaluation: held-out accuracy during training, and `grpo eval CHECKPOINT DATA` (pass@k, avg@k, maj@k,
greedy accuracy, response length, truncation rate, Entropy Area Score and its correlation with correctness),
reported per data source and overall (spec section 6)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from grpo_core import distributed as gdist


def _greedy_params(cfg, n: int = 1, temperature: float = 0.0, seed: int = 0):
    from grpo_core.rollout.base import SamplingParams

    return SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=cfg.rollout.max_new_tokens,
                          stop_strings=list(cfg.rollout.stop_strings), seed=seed)


def evaluate_accuracy(engine, eval_set, scorer, cfg, dist_info) -> dict:
    """Held-out accuracy of the current policy: greedy (or sampled at the rollout temperature) decoding of
    up to trainer.eval_max_prompts prompts, sharded over ranks, one response each."""
    n_prompts = min(len(eval_set), cfg.trainer.eval_max_prompts)
    indices = list(range(n_prompts))[dist_info.rank::dist_info.world_size]
    samples = eval_set.get_batch(indices)
    temperature = 0.0 if cfg.trainer.eval_greedy else cfg.rollout.temperature
    gens = engine.generate([s.prompt_ids for s in samples], _greedy_params(cfg, temperature=temperature,
                                                                         seed=cfg.trainer.seed)) if samples else []
    texts = [g.text or "" for g in gens]
    results = scorer.score(texts, [s.answer for s in samples], list(range(len(samples))))
    per_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    lengths = 0
    for s, g, r in zip(samples, gens, results):
        per_source[s.data_source][0] += int(r.correct)
        per_source[s.data_source][1] += 1
        lengths += len(g.token_ids)
    parts = gdist.all_gather_objects((dict(per_source), lengths))
    merged: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    total_len = 0
    for src_counts, ln in parts:
        total_len += ln
        for k, (c, n) in src_counts.items():
            merged[k][0] += c
            merged[k][1] += n
    correct = sum(c for c, _ in merged.values())
    n = sum(n for _, n in merged.values())
    out = {"accuracy": correct / max(n, 1), "n": n, "response_len/mean": total_len / max(n, 1)}
    out.update({f"accuracy/{k}": c / max(m, 1) for k, (c, m) in sorted(merged.items())})
    return out


# --------------------------------------------------------------------------------------------- grpo eval

def _pearson(x: list[float], y: list[float]) -> Optional[float]:
    if len(x) < 2:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy)


def _token_entropies(model, prompt_ids: list[int], response_ids: list[int], temperature: float) -> torch.Tensor:
    """Full-vocabulary entropy of each generated token's distribution, from the fused kernel."""
    seq = torch.tensor([prompt_ids + response_ids], dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        hidden = model(seq)[0]
        pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(response_ids), device=seq.device)
        _, ent = model.lm_head(hidden[pos], targets=seq[0, pos + 1], temperature=max(temperature, 1e-6) if temperature
                               else 1.0, with_entropy=True)
    return ent.float().cpu()


def summarize(records: list[dict], ks: list[int]) -> dict:
    """Metrics over prompt records {correct: [bool]*n, canonical: [str|None]*n, greedy_correct, lengths,
    truncated, eas} (one per prompt)."""
    from grpo_core.metrics import avg_at_k, maj_at_k, pass_at_k

    out: dict = {"prompts": len(records)}
    if not records:
        return out
    n = len(records[0]["correct"])
    for k in ks:
        if k > n:
            continue
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(r["correct"]), k) for r in records) / len(records)
        out[f"avg@{k}"] = avg_at_k([r["correct"] for r in records], k)
        out[f"maj@{k}"] = maj_at_k([r["canonical"] for r in records], [r["correct"] for r in records], k)
    out["greedy_accuracy"] = sum(r["greedy_correct"] for r in records) / len(records)
    lengths = [ln for r in records for ln in r["lengths"]]
    out["response_len/mean"] = sum(lengths) / len(lengths)
    out["truncation_rate"] = sum(t for r in records for t in r["truncated"]) / len(lengths)
    eas = [e for r in records for e in r["eas"]]
    corr = [float(c) for r in records for c in r["correct"]]
    out["eas/mean_bits"] = sum(eas) / len(eas)
    out["eas/corr_with_correct"] = _pearson(eas, corr)
    return out


def eval_main(args) -> int:
    """`grpo eval CHECKPOINT DATA... [--k ...]`: writes eval.json and eval.md into --out (default
    CHECKPOINT/eval)."""
    from grpo_core.config import load_config
    from grpo_core.data.dataset import PromptDataset
    from grpo_core.metrics import entropy_area_score
    from grpo_core.model import CausalLM
    from grpo_core.rollout import build_engine
    from grpo_core.run_setup import Scorer
    from grpo_core.tokenizer import Tokenizer

    ks = sorted(set(args.k))
    n = args.n or max(ks)
    if n < max(ks):
        raise SystemExit(f"grpo eval: --n {n} is smaller than the largest k ({max(ks)})")
    cfg = load_config(None, [f"rollout.max_new_tokens={args.max_new_tokens}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.from_pretrained(args.checkpoint)
    model = CausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, device=device).eval()
    data = PromptDataset(args.data, tokenizer, max_prompt_tokens=None, allow_unlabeled=False)
    samples = data.samples[: args.max_prompts] if args.max_prompts else data.samples
    engine = build_engine("torch", model=model, tokenizer=tokenizer, device=device)
    scorer = Scorer(cfg)
    prompts = [s.prompt_ids for s in samples]
    sampled = engine.generate(prompts, _greedy_params(cfg, n=n, temperature=args.temperature, seed=args.seed))
    greedy = engine.generate(prompts, _greedy_params(cfg))
    s_res = scorer.score([g.text or "" for g in sampled], [samples[g.prompt_index].answer for g in sampled],
                         [g.prompt_index for g in sampled])
    g_res = scorer.score([g.text or "" for g in greedy], [s.answer for s in samples], list(range(len(samples))))
    records: dict[str, list[dict]] = defaultdict(list)
    for pi, s in enumerate(samples):
        gens = sampled[pi * n:(pi + 1) * n]
        res = s_res[pi * n:(pi + 1) * n]
        eas = []
        for g in gens:
            ent = _token_entropies(model, s.prompt_ids, g.token_ids, args.temperature)
            eas.append(float(entropy_area_score(ent[None], torch.ones_like(ent, dtype=torch.bool)[None])[0]))
        rec = {"correct": [r.correct for r in res], "canonical": [r.canonical for r in res],
               "greedy_correct": bool(g_res[pi].correct), "lengths": [len(g.token_ids) for g in gens],
               "truncated": [g.finish_reason == "length" for g in gens], "eas": eas}
        records[s.data_source].append(rec)
    report = {src: summarize(recs, ks) for src, recs in sorted(records.items())}
    report["overall"] = summarize([r for recs in records.values() for r in recs], ks)
    out_dir = Path(args.out or Path(args.checkpoint) / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out_dir / "eval.md").write_text(markdown_table(report), encoding="utf-8")
    print(markdown_table(report))
    scorer.close()
    return 0


def markdown_table(report: dict) -> str:
    keys = sorted({k for v in report.values() for k in v if k != "prompts"})
    lines = ["| source | prompts | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for src, vals in report.items():
        cells = []
        for k in keys:
            v = vals.get(k)
            cells.append("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"| {src} | {vals.get('prompts', 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
