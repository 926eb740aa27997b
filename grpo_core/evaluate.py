"""Evaluation: held-out accuracy during training, and `grpo eval CHECKPOINT DATA` (pass@k, avg@k, maj@k,
greedy accuracy, response length, truncated fraction, Entropy Area Score and its correlation with correctness),
reported per data source and overall (docs/algorithms.md §6)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from grpo_core import distributed as gdist
from grpo_core.metrics import avg_at_k, entropy_area_score, maj_at_k, pass_at_k
from grpo_core.packing import pack_sequences, plan_sequences
from grpo_core.progress import generate_with_progress, progress_bar
from grpo_core.rollout.base import SamplingParams


def eval_sampling_params(cfg, n: int = 1, temperature: float = 0.0, seed: int = 0):
    """Evaluation decoding: n samples at `temperature` (0 = greedy), no top-p/top-k, the rollout's token budget
    and stop strings."""
    return SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=cfg.rollout.max_new_tokens,
                          stop_strings=list(cfg.rollout.stop_strings), seed=seed)


def evaluate_accuracy(engine, eval_set, scorer, cfg, dist_info, greedy: bool | None = None) -> dict:
    """Held-out accuracy of the current policy: greedy (or sampled at the rollout temperature) decoding of
    up to trainer.eval_max_prompts prompts, sharded over ranks, one response each. `greedy` None follows
    trainer.eval_greedy."""
    n_prompts = min(len(eval_set), cfg.trainer.eval_max_prompts)
    indices = list(range(n_prompts))[dist_info.rank::dist_info.world_size]
    samples = eval_set.get_batch(indices)
    greedy = cfg.trainer.eval_greedy if greedy is None else greedy
    temperature = 0.0 if greedy else cfg.rollout.temperature
    gens = generate_with_progress(engine, [s.prompt_ids for s in samples],
                                  eval_sampling_params(cfg, temperature=temperature, seed=cfg.trainer.seed),
                                  desc=f"eval ({'greedy' if greedy else 'sampled'})", leave=False, delay=2.0,
                                  enabled=cfg.logging.progress_bar)
    texts = [g.text or "" for g in gens]
    results = scorer.score(texts, [s.answer for s in samples], list(range(len(samples))), rows=samples)
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

OVERALL = "overall"


class EvalError(ValueError):
    """A `grpo eval` argument or input is wrong; the message names it."""


def _pearson(x: list[float], y: list[float]) -> Optional[float]:
    """Pearson correlation (point-biserial when y is 0/1); None when undefined (n < 2 or a constant side)."""
    if len(x) < 2:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy)


def entropy_temperature(temperature: float) -> float:
    """Temperature of the distribution whose token entropies make the EAS: the sampling distribution.

    Greedy decoding (0) has no sampling distribution (its entropy would be 0 everywhere), so the model's own
    temperature-1 distribution is used, the same convention as the rollout logprobs (rollout/base.py).
    """
    if temperature < 0:
        raise EvalError(f"temperature must be >= 0, got {temperature}")
    return temperature if temperature > 0 else 1.0


def split_eas(entropies_nats: torch.Tensor, lengths: list[int]) -> list[float]:
    """EAS in bits (docs/algorithms.md §6) of consecutive responses whose token entropies are concatenated.

    entropies_nats: float [sum(lengths)], response after response; lengths: tokens per response (0 allowed,
    giving EAS 0). Returns one float per response.
    """
    if entropies_nats.dim() != 1 or entropies_nats.numel() != sum(lengths):
        raise ValueError(f"entropies {tuple(entropies_nats.shape)} do not hold sum(lengths)={sum(lengths)} tokens")
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be >= 0, got {lengths}")
    nonempty = [i for i, n in enumerate(lengths) if n > 0]
    out = [0.0] * len(lengths)
    if not nonempty:
        return out
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    ent = entropies_nats.detach().float().cpu()
    eas = entropy_area_score(ent, torch.ones_like(ent, dtype=torch.bool), seq_ids).tolist()  # sorted ids
    for i, v in zip(nonempty, eas):
        out[i] = v
    return out


@torch.inference_mode()
def response_entropy_area_scores(model, prompts: list[list[int]], responses: list[list[int]], temperature: float,
                                 max_tokens_per_forward: int = 8192) -> list[float]:
    """EAS (bits) of every response under the model: the sum over its generated tokens of the full-vocabulary
    entropy of the distribution each token was drawn from, at `entropy_temperature(temperature)`.

    Sequences (prompt + response) are packed several per forward (cu_seqlens, positions restarting per
    sequence) under a token budget; entropies come from the fused kernel (`model.lm_head(h, targets=...)`),
    so the [tokens x vocab] logits are never materialised. prompts[i] / responses[i]: token-id lists.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if max_tokens_per_forward < 1:
        raise ValueError(f"max_tokens_per_forward must be >= 1, got {max_tokens_per_forward}")
    temp = entropy_temperature(temperature)
    device = next(model.parameters()).device
    eas = [0.0] * len(prompts)
    plans = plan_sequences([len(p) + len(r) for p, r in zip(prompts, responses)], max_tokens_per_forward)
    for plan in progress_bar(len(plans), "entropy (EAS)", unit="batch", delay=2.0, iterable=plans):
        plan = [i for i in plan if responses[i]]
        if not plan:
            continue
        packed = pack_sequences([prompts[i] for i in plan], [responses[i] for i in plan], device=device)
        hidden = model(packed.input_ids, position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens)[0]
        _, ent = model.lm_head(hidden[packed.response_positions], targets=packed.targets, temperature=temp,
                               with_entropy=True)
        for i, v in zip(plan, split_eas(ent.float().cpu(), [len(responses[i]) for i in plan])):
            eas[i] = v
    return eas


def summarize(records: list[dict], ks: list[int]) -> dict:
    """Metrics over one prompt record per prompt: {"correct": [bool] * n, "canonical": [str | None] * n,
    "greedy_correct": bool, "lengths": [int] * n, "truncated": [bool] * n, "eas": [float] * n}.

    Returns {"prompts", "samples_per_prompt", "pass@k", "avg@k", "maj@k" for every k in ks,
    "greedy_accuracy", "response_len/mean", "response_len/truncated_frac", "eas/mean_bits", "eas/corr_with_correct"}
    (the correlation is Pearson's over all responses, None when undefined). Every k must be <= n.
    """
    out: dict = {"prompts": len(records)}
    if not records:
        return out
    n = len(records[0]["correct"])
    for i, r in enumerate(records):
        sizes = {len(r[key]) for key in ("correct", "canonical", "lengths", "truncated", "eas")}
        if sizes != {n}:
            raise ValueError(f"record {i}: every per-sample list must hold n={n} entries, got sizes {sorted(sizes)}")
    too_big = [k for k in ks if not 1 <= k <= n]
    if too_big:
        raise ValueError(f"k={too_big} outside 1..n with n={n} samples per prompt")
    out["samples_per_prompt"] = n
    correct = [r["correct"] for r in records]
    for k in sorted(set(ks)):
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(bool(c) for c in row), k) for row in correct) / len(records)
        out[f"avg@{k}"] = avg_at_k(correct, k)
        out[f"maj@{k}"] = maj_at_k([r["canonical"] for r in records], correct, k)
    out["greedy_accuracy"] = sum(bool(r["greedy_correct"]) for r in records) / len(records)
    lengths = [ln for r in records for ln in r["lengths"]]
    out["response_len/mean"] = sum(lengths) / len(lengths)
    out["response_len/truncated_frac"] = sum(bool(t) for r in records for t in r["truncated"]) / len(lengths)
    eas = [float(e) for r in records for e in r["eas"]]
    flags = [float(bool(c)) for row in correct for c in row]
    out["eas/mean_bits"] = sum(eas) / len(eas)
    out["eas/corr_with_correct"] = _pearson(eas, flags)
    return out


def build_report(records: dict[str, list[dict]], ks: list[int]) -> dict:
    """{data_source: summarize(...), ..., "overall": summarize(all records)}, sources sorted by name."""
    if OVERALL in records:
        raise EvalError(f"a data source is named {OVERALL!r}, which clashes with the overall row; rename it")
    report = {src: summarize(recs, ks) for src, recs in sorted(records.items())}
    report[OVERALL] = summarize([r for _, recs in sorted(records.items()) for r in recs], ks)
    return report


def _column_order(key: str) -> tuple:
    # prompts, greedy, then pass/avg/maj by k (numeric, so pass@16 comes after pass@4), then the rest
    if "@" in key:
        name, k = key.split("@", 1)
        return (2, ("pass", "avg", "maj").index(name) if name in ("pass", "avg", "maj") else 3,
                int(k) if k.isdigit() else 0, key)
    fixed = ["prompts", "samples_per_prompt", "greedy_accuracy"]
    if key in fixed:
        return (0, fixed.index(key), 0, key)
    return (3, 0, 0, key)


def markdown_table(report: dict, title: Optional[str] = None) -> str:
    """A Markdown table: one row per data source (then "overall"), one column per metric; None shows as "-"."""
    keys = sorted({k for v in report.values() for k in v}, key=_column_order)
    lines = [f"**{title}**", ""] if title else []
    lines += ["| source | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for src, vals in report.items():
        cells = []
        for k in keys:
            v = vals.get(k)
            cells.append("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _training_config(checkpoint: Path) -> Optional[dict]:
    """The config a trainer checkpoint was trained with, when CHECKPOINT is <run>/checkpoints/step_N/hf."""
    state = checkpoint.parent / "trainer_state.json"
    if not state.is_file():
        return None
    return json.loads(state.read_text(encoding="utf-8")).get("config")


def check_eval_args(args) -> tuple[list[int], int]:
    """Validate the `grpo eval` arguments; returns (sorted distinct ks, samples per prompt n)."""
    ks = sorted(set(args.k))
    if not ks or ks[0] < 1:
        raise EvalError(f"--k values must be >= 1, got {args.k}")
    n = max(ks) if args.n is None else args.n
    if n < 1:
        raise EvalError(f"--n must be >= 1, got {n}")
    if n < ks[-1]:
        raise EvalError(f"--n {n} samples per prompt is smaller than k={[k for k in ks if k > n]}; "
                        f"pass --n {ks[-1]} or more (pass@k and maj@k need k <= n)")
    if args.temperature < 0:
        raise EvalError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise EvalError(f"--max-prompts must be >= 1, got {args.max_prompts}")
    if args.seed < 0:
        raise EvalError(f"--seed must be >= 0, got {args.seed}")
    out_arg, checkpoint = getattr(args, "out", None), getattr(args, "checkpoint", None)
    out = Path(out_arg).expanduser() if out_arg else Path(checkpoint or ".") / "eval"
    if out.exists() and not out.is_dir():  # known now, not after the whole evaluation
        raise EvalError(f"--out {out} is a file; --out names a folder for eval.json and eval.md")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise EvalError(f"--out {out}: a parent of it is a file, not a folder")
    return ks, n


def eval_main(args) -> int:
    """`grpo eval CHECKPOINT DATA... [--k ...]`: writes eval.json and eval.md into --out (default
    CHECKPOINT/eval) and prints the table. Returns the exit status (2 on a bad argument)."""
    import sys

    try:
        ks, n = check_eval_args(args)
        report, title = run_eval(args, ks, n)
    except EvalError as e:
        print(f"grpo eval: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out).expanduser() if args.out else Path(args.checkpoint) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(report, title)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out_dir / "eval.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.md'}")
    return 0


def run_eval(args, ks: list[int], n: int) -> tuple[dict, str]:
    """Generate, verify and score; returns (report, a one-line description of the settings)."""
    import sys

    from grpo_core.config import ConfigError, load_config
    from grpo_core.data.dataset import PromptDataset
    from grpo_core.data.io import DataError
    from grpo_core.model import CausalLM
    from grpo_core.rollout.factory import build_rollout_engine
    from grpo_core.run_setup import Scorer
    from grpo_core.tokenizer import Tokenizer

    checkpoint = Path(args.checkpoint).expanduser()
    if not (checkpoint / "config.json").is_file():
        raise EvalError(f"CHECKPOINT {checkpoint} has no config.json (expected an HF-layout model directory)")
    from grpo_core.preflight import check_model_dir

    check_model_dir(str(checkpoint), key="CHECKPOINT")  # names, shapes, tokenizer: before any generation
    # --set KEY=VALUE (e.g. rollout.gpu_memory_utilization) and --engine (= --set rollout.engine=...), then ours.
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "engine", None):
        overrides.append(f"rollout.engine={args.engine}")
    overrides.append(f"rollout.max_new_tokens={args.max_new_tokens}")
    # A trainer checkpoint carries its run's prompt template and stop strings: evaluate the policy on prompts
    # rendered the way it was trained (an explicit --prompt-template, when the CLI offers one, wins).
    trained = _training_config(checkpoint) or {}
    template = getattr(args, "prompt_template", None)
    if template is None:
        template = trained.get("data", {}).get("prompt_template") or None
    stops = trained.get("rollout", {}).get("stop_strings") or []
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        raise EvalError(str(e)) from e
    cfg.rollout.stop_strings = list(stops)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    try:
        from grpo_core.run_setup import _context_tokens

        context = _context_tokens(checkpoint)  # a prompt must leave room to generate
        data = PromptDataset([str(Path(f).expanduser()) for f in args.data], tokenizer, prompt_template=template,
                             max_prompt_tokens=context - 1 if context else None,
                             allow_unlabeled=False)
    except (DataError, FileNotFoundError) as e:
        raise EvalError(str(e)) from e
    samples = data.samples[: args.max_prompts] if args.max_prompts else data.samples
    print(f"grpo eval: {len(samples)} prompts x {n} samples{'' if args.temperature == 0 else ' + 1 greedy'} "
          f"from {checkpoint} on {device}", file=sys.stderr, flush=True)
    # rollout.engine decides (torch by default; vLLM sizes its KV cache from the GPU memory free now).
    engine = build_rollout_engine(cfg, model_dir=checkpoint, tokenizer=tokenizer, device=device, dtype=dtype,
                                  temperature=args.temperature, seed=args.seed, sleep_mode=False)
    scorer = Scorer(cfg)
    try:
        prompts = [s.prompt_ids for s in samples]
        sampled = generate_with_progress(engine, prompts, eval_sampling_params(cfg, n=n, temperature=args.temperature,
                                                                         seed=args.seed),
                                         desc=f"generate ({n}/prompt, T={args.temperature:g})")
        # At temperature 0 the samples are the greedy responses already.
        greedy = sampled[::n] if args.temperature == 0 else generate_with_progress(
            engine, prompts, eval_sampling_params(cfg), desc="generate (greedy)")
        s_res = scorer.score([g.text or "" for g in sampled], [samples[g.prompt_index].answer for g in sampled],
                             [g.prompt_index for g in sampled])
        g_res = s_res[::n] if args.temperature == 0 else scorer.score(
            [g.text or "" for g in greedy], [s.answer for s in samples], list(range(len(samples))))
    finally:
        scorer.close()
    # The entropy scores need the model's forward: the torch engine's own model, else (vLLM) one loaded once
    # the engine has given its memory back.
    model = getattr(engine, "model", None)
    if model is None:
        engine.close()
        model = CausalLM.from_pretrained(checkpoint, dtype=dtype, device=device)
    model.eval()
    eas = response_entropy_area_scores(model, [samples[g.prompt_index].prompt_ids for g in sampled],
                                       [g.token_ids for g in sampled], args.temperature)
    records: dict[str, list[dict]] = defaultdict(list)
    for pi, s in enumerate(samples):
        span = slice(pi * n, (pi + 1) * n)
        gens, res = sampled[span], s_res[span]
        records[s.data_source].append({
            "correct": [bool(r.correct) for r in res], "canonical": [r.canonical for r in res],
            "greedy_correct": bool(g_res[pi].correct), "lengths": [len(g.token_ids) for g in gens],
            "truncated": [g.finish_reason == "length" for g in gens], "eas": eas[span]})
    title = (f"grpo eval {checkpoint}: n={n} samples/prompt at temperature {args.temperature}, "
             f"max {args.max_new_tokens} new tokens, seed {args.seed}, "
             f"{'' if cfg.rollout.engine == 'torch' else cfg.rollout.engine + ' engine, '}"
             f"prompts rendered with {'template ' + repr(template) if template else 'the chat template'}")
    return build_report(records, ks), title
