"""Benchmark: grpo-core vs TRL's GRPOTrainer on the same work, side by side, plus an update-phase profile.

Both trainers start from the same warm-started tiny Qwen2 model (the CPU demo's: built, warm-started and exported
in HF layout here, loaded by transformers for TRL), train on the same synthetic arithmetic prompts with the same
reward (grpo-core's verifier, 1 correct / 0 otherwise) and matched settings, read from configs/demo_cpu.yaml
(MATCHED_KEYS; recorded under meta.matched_settings): group size, prompts per RL step, new tokens, temperature,
optimizer steps per rollout batch (TRL: steps_per_generation), AdamW learning rate, warmup, schedule, betas, eps
and weight decay, grad clip, clip eps low/high, token-mean (TRL loss_type "dapo"); no KL, fp32, the
same torch thread count. grpo-core runs twice per pair:

    grpo-core (demo)  configs/demo_cpu.yaml's algorithm: dynamic sampling (generates more), NSR, Hidden-Align
    grpo-core (like)  the like-for-like variant: dynamic sampling, NSR and Hidden-Align off

Runs alternate (ABC, CBA, ...) in fresh processes, each gated on an idle machine (1-min load average per core
below --idle-load, waiting up to --idle-wait s; the load before and after each run is recorded). Per run:
s/step (wall clock between the end of step --warmup-steps and the last step), CPU s/step (process time,
same window), generated tokens per step and per second, rollout and update-phase s/step (update = the old-
logprob pass, packing, forward/backward and the optimizer steps), peak RSS, held-out greedy accuracy before
and after (200 prompts, one evaluator for both: grpo-core's torch engine + verifier), versions and machine.

grpo-core's update phase is then replayed on the run's last rollout batches (same process, same packed micro-
batches, alternating) against a plain-torch AdamW step over the same micro-batches (the same model code as a
plain module, logprobs from full log_softmax, the same clipped token-mean loss, clip_grad_norm_, torch AdamW):
the row reports update-phase s per optimizer step / plain-torch s per optimizer step, and the update phase's
breakdown: wrapper timings of its parts (packing, old-logprob pass, forward + loss, backward, optimizer step,
the rest = loop, metric reduction and host syncs) and a cProfile attribution of all CPU time to ZeRO hooks and
gathers, DeepSpeed engine, model, LM-head/loss ops, autograd, optimizer, packing, metrics, trainer loop, with
the host-sync calls (.item(), bool(), .tolist(), float()) counted per optimizer step.

TRL runs in its own Python (an environment with `pip install "grpo-core[bench]"` or a separate venv holding trl;
--trl-python), so transformers' version never touches grpo-core's environment; it imports only grpo-core's
verifier (pure Python + sympy) from this tree.

    python benchmarks/bench_vs_trl.py --steps 100 --pairs 3 --trl-python /path/to/venv-trl/bin/python
Writes benchmarks/results/bench_vs_trl_cpu.json (meta + one row per run + the summary ratios) and a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _trl_import_path() -> str:
    """A directory holding only grpo_core (a link): the TRL child imports grpo-core's scorer from this checkout
    and nothing else of it (its own environment's packages stay what TRL resolved)."""
    shim = Path(tempfile.gettempdir()) / f"grpo_core_only_{os.getuid()}"
    shim.mkdir(exist_ok=True)
    link = shim / "grpo_core"
    if not link.exists():
        link.symlink_to(ROOT / "grpo_core")
    return str(shim)


_TRL_CHILD = "--child" in sys.argv and sys.argv[sys.argv.index("--child") + 1:][:1] == ["trl"]
sys.path.insert(0, _trl_import_path() if _TRL_CHILD else str(ROOT))  # run as a script from anywhere

PROMPT_TEMPLATE = "{prompt}\n"
DEMO = ROOT / "configs" / "demo_cpu.yaml"
# Matched settings: the demo's own values of these grpo-core keys (read from configs/demo_cpu.yaml by the parent,
# passed to every child; TRL's equivalents in trl_child), plus what TRL's run has and the demo may not.
MATCHED_KEYS = ("rollout.group_size", "trainer.train_batch_prompts", "rollout.max_new_tokens", "rollout.temperature",
                "trainer.mini_batches", "trainer.ppo_epochs", "trainer.lr", "trainer.warmup_steps",
                "trainer.lr_schedule", "trainer.min_lr_ratio", "trainer.grad_clip", "algorithm.eps_low",
                "algorithm.eps_high", "algorithm.loss_agg", "trainer.adam_betas", "trainer.adam_eps",
                "trainer.weight_decay", "warm_start.steps")
FORCED = {"algorithm.kl_coef": 0.0, "algorithm.entropy_coef": 0.0, "deepspeed.bf16": "off"}
VARIANTS = {
    "grpo-core (demo)": [],  # the demo's own algorithm settings
    "grpo-core (like)": ["algorithm.dynamic_sampling=false", "algorithm.nsr=off", "algorithm.hidden_align_coef=0.0"],
}


def demo_settings(warm_start_steps: int | None = None) -> dict:
    """{grpo-core key: value} of MATCHED_KEYS in configs/demo_cpu.yaml, plus FORCED (warm start optionally
    overridden). The one source of the matched settings: a demo change moves both trainers with it."""
    from grpo_core.config import load_config

    cfg = load_config(DEMO)
    out = {}
    for key in MATCHED_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        out[key] = list(value) if isinstance(value, tuple) else value
    if warm_start_steps is not None:
        out["warm_start.steps"] = warm_start_steps
    return {**out, **FORCED}


def _overrides(settings: dict) -> list[str]:
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items()]


def _rusage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_maxrss / 1024  # CPU s, peak RSS MiB (ru_maxrss is KiB on Linux)


def _window(marks: list[tuple[int, float, float]], warmup: int) -> dict:
    """s/step and CPU s/step between the end of step `warmup` and the last step, from (step, wall, cpu) marks."""
    marks = sorted(marks)
    start = [m for m in marks if m[0] == warmup] or marks[:1]
    (s0, w0, c0), (s1, w1, c1) = start[0], marks[-1]
    n = max(s1 - s0, 1)
    return {"timed_steps": s1 - s0, "s_per_step": (w1 - w0) / n, "cpu_s_per_step": (c1 - c0) / n}


# --------------------------------------------------------------------------------------------- setup child

def setup_child(a) -> dict:
    """The demo's tiny model + data + supervised warm start, exported for both trainers."""
    import torch

    from grpo_core import distributed as gdist
    from grpo_core.config import load_config
    from grpo_core.data.dataset import PromptDataset, render_prompt
    from grpo_core.run_setup import prepare_run

    work = Path(a.work_dir)
    cfg = load_config(DEMO, [f"trainer.output_dir={work / 'setup'}", f"warm_start.steps={a.settings['warm_start.steps']}",
                             f"data.synthetic_eval_size={a.eval_prompts}", "logging.progress_bar=false"])
    torch.set_num_threads(a.threads)
    run = prepare_run(cfg, gdist.init_distributed("cpu"))
    shutil.copytree(run.model_dir, work / "warm_model", dirs_exist_ok=True)
    data = work / "data"
    data.mkdir(exist_ok=True)
    src = work / "setup" / "data"
    for name in ("train.parquet", "test.parquet"):
        shutil.copy(src / name, data / name)
    train = PromptDataset([data / "train.parquet"], run.tokenizer, prompt_template=PROMPT_TEMPLATE,
                          max_prompt_tokens=cfg.data.max_prompt_tokens)
    with open(data / "train.jsonl", "w", encoding="utf-8") as f:  # the same rendered prompts, for TRL
        for s in train.samples:
            f.write(json.dumps({"prompt": render_prompt(s.messages, run.tokenizer, PROMPT_TEMPLATE),
                                "answer": s.answer}) + "\n")
    return {"warm_start": run.warm_start_summary, "train_prompts": len(train)}


# --------------------------------------------------------------------------------------------- eval child

def eval_child(a) -> dict:
    """Held-out greedy accuracy of an HF-layout model directory with grpo-core's evaluator."""
    import torch

    from grpo_core import distributed as gdist
    from grpo_core.config import load_config
    from grpo_core.data.dataset import PromptDataset
    from grpo_core.evaluate import evaluate_accuracy
    from grpo_core.model import CausalLM
    from grpo_core.rollout.base import build_engine
    from grpo_core.run_setup import Scorer
    from grpo_core.tokenizer import Tokenizer

    torch.set_num_threads(a.threads)
    work = Path(a.work_dir)
    cfg = load_config(DEMO, [f"trainer.eval_max_prompts={a.eval_prompts}", f"trainer.output_dir={work / 'eval'}"])
    tokenizer = Tokenizer.from_pretrained(work / "warm_model")
    eval_set = PromptDataset([work / "data" / "test.parquet"], tokenizer, prompt_template=PROMPT_TEMPLATE,
                             max_prompt_tokens=cfg.data.max_prompt_tokens)
    model = CausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    engine = build_engine("torch", model=model, tokenizer=tokenizer, max_batch_size=cfg.rollout.max_batch_size,
                          device=torch.device("cpu"))
    res = evaluate_accuracy(engine, eval_set, Scorer(cfg), cfg, gdist.init_distributed("cpu"), greedy=True)
    return {"accuracy": res["accuracy"], "n": res["n"]}


# --------------------------------------------------------------------------------------------- grpo-core child

def _plain_torch_step(model, opt, mbs, temperature: float, eps_low: float, eps_high: float, max_norm: float):
    """One plain-torch AdamW step over packed micro-batches: the same model code as a plain module, logprobs from
    a full log_softmax, the clipped token-mean loss normalised over the mini-batch's tokens."""
    import torch

    n_tokens = sum(float(mb.mask.sum()) for mb in mbs)
    for mb in mbs:
        hidden = model(mb.input_ids, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens)[0]
        logits = hidden[mb.response_positions] @ model.lm_head.weight.t()
        logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, mb.targets[:, None])[:, 0]
        old = mb.old_logprob if mb.old_logprob is not None else logp.detach()
        ratio = torch.exp(logp - old)
        per_tok = -torch.minimum(ratio * mb.advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * mb.advantages)
        (torch.where(mb.mask, per_tok, 0.0).sum() / max(n_tokens, 1.0)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


class _Timed:
    """Wraps named bound methods of objects (instance attributes) to sum their wall time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._undo = []

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name, None)
        if fn is None:
            return

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t

        setattr(obj, name, timed)
        self._undo.append((obj, name))

    def restore(self) -> None:
        for obj, name in self._undo:
            try:
                delattr(obj, name)
            except AttributeError:
                pass
        self._undo.clear()


# cProfile attribution: first matching path fragment names the category of a Python function's own time;
# a builtin's (C function's) own time goes to the categories of its callers, edge by edge.
CATEGORIES = [
    ("deepspeed/runtime/zero/", "ZeRO hooks, gathers, partitioning"),
    ("deepspeed/", "DeepSpeed engine (other)"),
    ("torch/optim/", "optimizer (AdamW)"),
    ("clip_grad", "optimizer (AdamW)"),
    ("grpo_core/experience.py", "packing"),
    ("grpo_core/packing.py", "packing"),
    ("grpo_core/metrics.py", "metric reduction"),
    ("kernels/", "LM-head + loss ops"),
    ("grpo_core/losses.py", "LM-head + loss ops"),
    ("grpo_core/advantages.py", "LM-head + loss ops"),
    ("grpo_core/model/", "model forward"),
    ("torch/nn/", "model forward"),
    ("torch/autograd/", "backward (autograd)"),
    ("grpo_core/trainer.py", "trainer loop (Python)"),
]
HOST_SYNCS = ("item", "__bool__", "tolist", "__float__", "__int__")


def _category(func: tuple) -> str | None:
    path = func[0].replace("\\", "/")
    if path == "~":
        return None
    for frag, cat in CATEGORIES:
        if frag in path:
            return cat
    return "other Python"


def profile_breakdown(stats) -> tuple[dict, dict]:
    """({category: seconds}, {host-sync method: calls}) from a pstats.Stats."""
    out: dict[str, float] = {}
    syncs: dict[str, int] = {}
    for func, (_cc, nc, tt, _ct, callers) in stats.stats.items():
        cat = _category(func)
        if cat is not None:
            out[cat] = out.get(cat, 0.0) + tt
            continue
        name = func[2]
        if any(f"'{s}' of 'torch._C.TensorBase'" in name for s in HOST_SYNCS):
            key = name.split("'")[1]
            syncs[key] = syncs.get(key, 0) + nc
        if "run_backward" in name:
            out["backward (autograd)"] = out.get("backward (autograd)", 0.0) + tt
            continue
        edges = {c: v for c, v in callers.items()} if callers else {}
        total_edge = sum(v[2] for v in edges.values()) or 0.0
        if not edges or total_edge <= 0:
            out["other C"] = out.get("other C", 0.0) + tt
            continue
        for caller, v in edges.items():
            ccat = _category(caller) or "other C"
            out[ccat] = out.get(ccat, 0.0) + tt * v[2] / total_edge
    return out, syncs


def grpo_child(a) -> dict:
    import copy
    import cProfile
    import pstats

    import torch

    from grpo_core.config import load_config
    from grpo_core.model import CausalLM
    from grpo_core.trainer import Trainer

    torch.set_num_threads(a.threads)
    work = Path(a.work_dir)
    out = Path(a.run_dir)
    overrides = [f"model.path={work / 'warm_model'}", f"data.train_files=[{work / 'data' / 'train.parquet'}]",
                 "data.eval_files=[]", f"data.prompt_template={PROMPT_TEMPLATE}", "data.synthetic_eval_size=0",
                 "warm_start.steps=0", f"trainer.max_steps={a.steps}", f"trainer.output_dir={out}",
                 "trainer.eval_every=0", "checkpoint.save_every=0", "checkpoint.keep_last=1",
                 "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
                 *_overrides({k: v for k, v in a.settings.items() if k != "warm_start.steps"}),
                 *VARIANTS[a.variant], *a.set]
    cfg = load_config(DEMO, overrides)
    cpu0, _ = _rusage()
    trainer = Trainer(cfg)
    marks: list[tuple[int, float, float]] = [(0, time.perf_counter(), _rusage()[0])]
    kept: list = []
    log = trainer.log.log

    def marked_log(step, metrics, phase="train"):
        if phase == "train":
            marks.append((step, time.perf_counter(), _rusage()[0]))
        return log(step, metrics, phase=phase)

    update = trainer.update

    def keep_update(groups, step):
        kept[:] = [copy.deepcopy(groups)]  # the last rollout batch, replayed below
        return update(groups, step)

    trainer.log.log = marked_log
    trainer.update = keep_update
    summary = trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("phase") == "train"]
    timed = rows[a.warmup_steps:] or rows
    gen_tokens = [r["response_len/mean"] * r.get("dynamic_sampling/rounds", 1) * cfg.trainer.train_batch_prompts
                  * cfg.rollout.group_size for r in timed]
    res = {
        **_window(marks, a.warmup_steps),
        "rollout_s_per_step": statistics.mean(r["time/rollout_s"] for r in timed),
        "update_s_per_step": statistics.mean(r["time/update_s"] for r in timed),
        "old_logprob_s_per_step": statistics.mean(r.get("time/old_logprob_s", 0.0) for r in timed),
        "generated_tokens_per_step": statistics.mean(gen_tokens),
        "rollout_tokens_per_s": sum(gen_tokens) / max(sum(r["time/rollout_s"] for r in timed), 1e-9),
        "train_accuracy_first": rows[0]["accuracy"], "train_accuracy_last10": statistics.mean(
            r["accuracy"] for r in rows[-10:]),
        "zero_stage": trainer.zero_stage, "final_model": summary["final_checkpoint"],
    }
    res["tokens_per_s"] = res["generated_tokens_per_step"] / res["s_per_step"]
    res["cpu_s_total"], res["peak_rss_mib"] = _rusage()[0] - cpu0, _rusage()[1]
    if a.replays and kept:
        res.update(replay_update(a, trainer, kept[0], cfg, CausalLM, cProfile, pstats))
    return res


def replay_update(a, trainer, groups, cfg, CausalLM, cProfile, pstats) -> dict:
    """Replay the update phase on the last rollout batch, alternating with a plain-torch AdamW step over the
    same packed micro-batches; then the update's part timings and a cProfile breakdown."""
    import copy

    import torch

    n_opt = cfg.trainer.ppo_epochs * cfg.trainer.mini_batches
    m = cfg.trainer.mini_batches
    per_mini = -(-len(groups) // m)
    minis = [g for g in (groups[i * per_mini:(i + 1) * per_mini] for i in range(m)) if g]
    # Same packed micro-batches as the trainer's (its own packing); old logprobs from the current policy.
    packed = [trainer._rank_micro_batches(mi) for mi in minis]
    if not (cfg.trainer.ppo_epochs == 1 and len(minis) == 1):
        from grpo_core.metrics import UpdateMetrics

        for mbs in packed:
            trainer._fill_old_logprobs(mbs, UpdateMetrics())
    plain = CausalLM.from_pretrained(trainer.run.model_dir, dtype=torch.float32)
    plain.load_state_dict({k: v for k, v in trainer.gathered_state_dict().items()}, strict=False)
    plain.train()
    t = cfg.trainer
    opt = torch_adamw = torch.optim.AdamW(plain.parameters(), lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                          weight_decay=t.weight_decay)
    del torch_adamw
    ours, base = [], []
    for i in range(a.replays + 1):  # the first pair warms both up
        w0 = time.perf_counter()
        trainer.update(copy.deepcopy(groups), trainer.step)
        w1 = time.perf_counter()
        for _ in range(cfg.trainer.ppo_epochs):
            for mbs in packed:
                _plain_torch_step(plain, opt, mbs, cfg.rollout.temperature, cfg.algorithm.eps_low,
                                  cfg.algorithm.eps_high, t.grad_clip)
        w2 = time.perf_counter()
        if i:
            ours.append((w1 - w0) / n_opt)
            base.append((w2 - w1) / n_opt)
    res = {"update_s_per_opt_step": statistics.median(ours), "plain_torch_s_per_opt_step": statistics.median(base)}
    res["update_vs_plain_torch"] = res["update_s_per_opt_step"] / res["plain_torch_s_per_opt_step"]
    # Part timings (wrappers; unprofiled), then cProfile.
    timer = _Timed()
    timer.wrap(trainer, "_rank_micro_batches", "packing")
    timer.wrap(trainer, "_fill_old_logprobs", "old-logprob pass")
    timer.wrap(trainer, "_micro_batch_loss", "forward + loss")
    timer.wrap(trainer.engine, "backward", "backward")
    timer.wrap(trainer.engine, "step", "optimizer step (+ grad reduction, clipping)")
    w0 = time.perf_counter()
    for _ in range(a.replays):
        trainer.update(copy.deepcopy(groups), trainer.step)
    total = time.perf_counter() - w0
    timer.restore()
    parts = {k: v / (a.replays * n_opt) for k, v in timer.seconds.items()}
    parts["rest: loop, metric reduction, host syncs"] = total / (a.replays * n_opt) - sum(parts.values())
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.replays):
        trainer.update(copy.deepcopy(groups), trainer.step)
    prof.disable()
    cats, syncs = profile_breakdown(pstats.Stats(prof))
    whole = sum(cats.values()) or 1.0
    return {**res, "update_parts_s_per_opt_step": parts,
            "update_profile_fraction": {k: v / whole for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "host_syncs_per_opt_step": {k: v / (a.replays * n_opt) for k, v in syncs.items()},
            "update_profile_note": "cProfile over the replayed update (deepcopy of the groups excluded only in "
                                   "part: it is outside update); its overhead inflates Python-heavy parts"}


# --------------------------------------------------------------------------------------------- TRL child

def trl_child(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_core.verify import ExtractConfig
    from grpo_core.verify.api import VerifyConfig, judge

    work = Path(a.work_dir)
    out = Path(a.run_dir)
    verify_config = VerifyConfig(extract=ExtractConfig(bare_max_chars=80))  # reward.bare_answer_max_chars default

    def reward(completions, answer, **_):
        return [1.0 if judge(c, g, verify_config).correct else 0.0 for c, g in zip(completions, answer)]

    rows = [json.loads(line) for line in open(work / "data" / "train.jsonl", encoding="utf-8")]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(work / "warm_model")
    model = AutoModelForCausalLM.from_pretrained(work / "warm_model", dtype=torch.float32)
    fields = set(GRPOConfig.__dataclass_fields__)
    m = a.settings
    group, prompts, opt_steps = m["rollout.group_size"], m["trainer.train_batch_prompts"], m["trainer.mini_batches"]
    if (prompts * group) % opt_steps:
        raise SystemExit(f"TRL needs prompts x group ({prompts} x {group}) divisible by mini_batches ({opt_steps})")
    if m["trainer.ppo_epochs"] != 1:
        raise SystemExit("the TRL mapping covers trainer.ppo_epochs=1 only (TRL: num_iterations)")
    schedule = {"constant": "constant_with_warmup", "cosine": "cosine"}[m["trainer.lr_schedule"]]
    if schedule == "cosine" and m["trainer.min_lr_ratio"] > 0:
        schedule = "cosine_with_min_lr"
    kwargs = dict(
        # one generation batch = prompts x group completions = one RL step; steps_per_generation optimizer steps
        output_dir=str(out), per_device_train_batch_size=prompts * group // opt_steps, num_generations=group,
        steps_per_generation=opt_steps, gradient_accumulation_steps=1,
        max_completion_length=m["rollout.max_new_tokens"], temperature=m["rollout.temperature"], top_p=1.0,
        learning_rate=m["trainer.lr"], lr_scheduler_type=schedule, warmup_steps=m["trainer.warmup_steps"],
        max_grad_norm=m["trainer.grad_clip"], adam_beta1=m["trainer.adam_betas"][0],
        adam_beta2=m["trainer.adam_betas"][1], adam_epsilon=m["trainer.adam_eps"],
        weight_decay=m["trainer.weight_decay"], optim="adamw_torch", beta=0.0, epsilon=m["algorithm.eps_low"],
        epsilon_high=m["algorithm.eps_high"], loss_type="dapo", scale_rewards="group", num_iterations=1,
        max_steps=opt_steps * a.steps, save_strategy="no", report_to=[], logging_steps=10**6, use_cpu=True,
        bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    if schedule == "cosine_with_min_lr":
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": m["trainer.min_lr_ratio"]}
    if "top_k" in fields:
        kwargs["top_k"] = 0  # grpo-core samples from the full distribution (rollout.top_k=0)
    args = GRPOConfig(**{k: v for k, v in kwargs.items() if k in fields or k in ("output_dir",)})
    marks: list[tuple[int, float, float]] = []
    rollout_s: dict[int, float] = {}
    tokens: dict[int, float] = {}

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append((0, time.perf_counter(), _rusage()[0]))

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % opt_steps == 0:  # one RL step = one generation batch = opt_steps steps
                marks.append((state.global_step // opt_steps, time.perf_counter(), _rusage()[0]))

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Marks()])
    cpu0 = _rusage()[0]

    def rl_step() -> int:
        return trainer.state.global_step // opt_steps + 1

    generate, rewards = trainer._generate, trainer._calculate_rewards

    def timed_generate(prompts):
        t = time.perf_counter()
        result = generate(prompts)
        rollout_s[rl_step()] = rollout_s.get(rl_step(), 0.0) + time.perf_counter() - t
        try:  # completion ids are the second item of _generate's result in trl 1.x
            tokens[rl_step()] = float(sum(len(c) for c in result[1]))
        except Exception:  # noqa: BLE001 - token count is informational
            pass
        return result

    def timed_rewards(*args, **kwargs):
        t = time.perf_counter()
        result = rewards(*args, **kwargs)
        rollout_s[rl_step()] = rollout_s.get(rl_step(), 0.0) + time.perf_counter() - t
        return result

    trainer._generate, trainer._calculate_rewards = timed_generate, timed_rewards
    trainer.train()
    final = out / "final_model"
    trainer.save_model(str(final))
    res = _window(marks, a.warmup_steps)
    steps = [s for s in sorted(rollout_s) if s > a.warmup_steps]
    step_wall = dict((s, w) for s, w, _ in marks)
    per_step_wall = [step_wall[s] - step_wall[s - 1] for s in steps if s in step_wall and s - 1 in step_wall]
    res["rollout_s_per_step"] = statistics.mean(rollout_s[s] for s in steps)
    res["update_s_per_step"] = statistics.mean(per_step_wall) - res["rollout_s_per_step"]
    res["update_s_per_opt_step"] = res["update_s_per_step"] / opt_steps
    if tokens:
        res["generated_tokens_per_step"] = statistics.mean(tokens[s] for s in steps if s in tokens)
        res["rollout_tokens_per_s"] = sum(tokens[s] for s in steps if s in tokens) / max(
            sum(rollout_s[s] for s in steps if s in tokens), 1e-9)
        res["tokens_per_s"] = res["generated_tokens_per_step"] / res["s_per_step"]
    res["cpu_s_total"], res["peak_rss_mib"] = _rusage()[0] - cpu0, _rusage()[1]
    res["final_model"] = str(final)
    res["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    return res


# --------------------------------------------------------------------------------------------- parent

def _load_per_core() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def gate(a) -> dict:
    """Wait (up to --idle-wait s) for the 1-min load average per core to drop below --idle-load."""
    t0 = time.time()
    while _load_per_core() >= a.idle_load and time.time() - t0 < a.idle_wait:
        time.sleep(10)
    idle = _load_per_core() < a.idle_load
    if not idle and not a.allow_busy:
        raise SystemExit(f"machine not idle after {a.idle_wait:.0f} s: load average {os.getloadavg()} on "
                         f"{os.cpu_count()} cores (threshold {a.idle_load}/core); pass --allow-busy to measure anyway")
    return {"load_before": list(os.getloadavg()), "idle": idle, "waited_s": time.time() - t0}


def _child(a, mode: str, python: str, extra: list[str], timeout: float = 7200) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [python, str(Path(__file__).resolve()), "--child", mode, "--child-out", str(result),
           "--work-dir", a.work_dir, "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
           "--threads", str(a.threads), "--eval-prompts", str(a.eval_prompts), "--replays", str(a.replays),
           "--settings", json.dumps(a.settings), *sum((["--set", s] for s in a.set), []), *extra]
    path = _trl_import_path() if mode == "trl" else str(ROOT)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    result.unlink()
    return out


def summarize(rows: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["trainer"], []).append(r)
    med = {k: {m: statistics.median(r[m] for r in v if r.get(m) is not None)
               for m in ("s_per_step", "update_s_per_step", "rollout_s_per_step", "cpu_s_per_step")
               if any(r.get(m) is not None for r in v)} for k, v in by.items()}
    out = {"median": med}
    trl_s = med.get("TRL GRPOTrainer", {}).get("s_per_step")
    if trl_s:
        for name in VARIANTS:
            if name in med:
                out[f"{name} s/step / TRL s/step"] = med[name]["s_per_step"] / trl_s
                out[f"{name} CPU s/step / TRL CPU s/step"] = med[name]["cpu_s_per_step"] / med["TRL GRPOTrainer"][
                    "cpu_s_per_step"]
    for name in VARIANTS:
        ratios = [r["update_vs_plain_torch"] for r in by.get(name, []) if r.get("update_vs_plain_torch")]
        if ratios:
            out[f"{name} update per opt step / plain-torch AdamW step"] = statistics.median(ratios)
    return out


def plot(rows: list[dict], summary: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["median"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    ax = axes[0]
    for i, name in enumerate(names):
        m = summary["median"][name]
        ax.barh(i, m.get("rollout_s_per_step", 0), color="C0", label="rollout" if i == 0 else None)
        ax.barh(i, m.get("update_s_per_step", 0), left=m.get("rollout_s_per_step", 0), color="C1",
                label="update phase" if i == 0 else None)
        ax.text(m["s_per_step"], i, f"  {m['s_per_step']:.2f} s/step", va="center", fontsize=8)
        xs = [r["s_per_step"] for r in rows if r["trainer"] == name]
        ax.plot(xs, [i] * len(xs), "k|", ms=12)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("seconds per RL step (median of runs; ticks = runs)")
    ax.legend(fontsize=7)
    ax.set_xlim(0, max(r["s_per_step"] for r in rows) * 1.5)
    ax = axes[1]
    prof = next((r for r in rows if r.get("update_profile_fraction") and r["trainer"] == "grpo-core (like)"), None)
    if prof:
        items = list(prof["update_profile_fraction"].items())[:9]
        ax.barh(range(len(items)), [v for _, v in items], color="C2")
        ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("fraction of update-phase CPU time (cProfile, like-for-like)")
    fig.suptitle(f"grpo-core vs TRL on {meta.get('cpu') or 'cpu'} ({meta.get('cpu_count')} cores, "
                 f"{meta['threads']} threads), {meta['steps']} RL steps/run, load/core median "
                 f"{meta.get('load_per_core_median', float('nan')):.2f}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="RL steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="first RL steps left out of the timings")
    p.add_argument("--pairs", type=int, default=3, help="alternating rounds (each runs every trainer once)")
    p.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 2)), help="torch threads per run")
    p.add_argument("--trl-python", default=os.environ.get("GRPO_TRL_PYTHON", sys.executable),
                   help="a Python with trl installed (default: this one, or $GRPO_TRL_PYTHON)")
    p.add_argument("--trainers", nargs="+", default=[*VARIANTS, "TRL GRPOTrainer"],
                   choices=[*VARIANTS, "TRL GRPOTrainer"])
    p.add_argument("--replays", type=int, default=3, help="replays of grpo-core's update for ratio and profile")
    p.add_argument("--warm-start-steps", type=int, default=None, help="supervised warm start (default: the demo's)")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts for accuracy")
    p.add_argument("--idle-load", type=float, default=0.3, help="1-min load average per core counted as idle")
    p.add_argument("--idle-wait", type=float, default=600, help="seconds to wait for an idle machine per run")
    p.add_argument("--allow-busy", action="store_true", help="measure even when the machine is not idle")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra grpo-core override")
    p.add_argument("--work-dir", default=None, help="model, data and runs (default: a temporary directory)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_vs_trl_cpu.json"))
    p.add_argument("--child", choices=["setup", "eval", "grpo", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)  # the parent's demo_settings(), as JSON
    a = p.parse_args(argv)
    if a.steps <= a.warmup_steps:
        p.error("--steps must exceed --warmup-steps")
    if a.pairs < 1 or a.replays < 0:
        p.error("--pairs must be >= 1 and --replays >= 0")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    a.settings = json.loads(a.settings) if a.settings else demo_settings(a.warm_start_steps)
    if a.child:
        fn = {"setup": setup_child, "eval": eval_child, "grpo": grpo_child, "trl": trl_child}[a.child]
        Path(a.child_out).write_text(json.dumps(fn(a)))
        return 0
    from benchmarks.common import cpu_model, machine_info

    if "TRL GRPOTrainer" in a.trainers:  # checked before anything is created
        try:
            probe = subprocess.run([a.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                                   text=True)
            ok = probe.returncode == 0 and probe.stdout.strip() != ""
        except OSError as e:
            raise SystemExit(f"--trl-python {a.trl_python} cannot be run ({e.strerror}): point it at a Python with "
                             "trl installed (pip install 'grpo-core[bench]' there)") from None
        if not ok:
            raise SystemExit(f"--trl-python {a.trl_python} cannot import trl: pip install 'grpo-core[bench]' there "
                             "(or point --trl-python at a venv with trl)")
    own_tmp = a.work_dir is None
    a.work_dir = a.work_dir or tempfile.mkdtemp(prefix="bench_vs_trl_")
    work = Path(a.work_dir)
    meta = machine_info("cpu")
    meta.update({"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": a.threads, "steps": a.steps,
                 "warmup_steps": a.warmup_steps, "pairs": a.pairs, "argv": sys.argv[1:],
                 "matched_settings": a.settings, "variants": VARIANTS, "idle_load_per_core": a.idle_load})
    print(f"work dir {work}; load average {os.getloadavg()} on {os.cpu_count()} cores", flush=True)
    if not (work / "warm_model" / "config.json").exists():
        meta["setup"] = _child(a, "setup", sys.executable, [])
    meta["accuracy_before"] = _child(a, "eval", sys.executable, ["--model-dir", str(work / "warm_model")])["accuracy"]
    print(f"warm-started model: held-out greedy accuracy {meta['accuracy_before']:.3f}", flush=True)
    rows = []
    for pair in range(a.pairs):
        order = a.trainers if pair % 2 == 0 else a.trainers[::-1]
        for name in order:
            g = gate(a)
            run_dir = work / "runs" / f"{pair}_{name.split()[0]}_{name.split()[-1].strip('()')}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.time()
            if name.startswith("TRL"):
                row = _child(a, "trl", a.trl_python, ["--run-dir", str(run_dir)])
            else:
                row = _child(a, "grpo", sys.executable, ["--run-dir", str(run_dir), "--variant", name])
            row.update({"trainer": name, "pair": pair, "wall_s": time.time() - t0, **g,
                        "load_after": list(os.getloadavg())})
            row["accuracy_before"] = meta["accuracy_before"]
            row["accuracy_after"] = _child(a, "eval", sys.executable, ["--model-dir", row["final_model"]])["accuracy"]
            rows.append(row)
            print(f"pair {pair} {name:18s} {row['s_per_step']:.3f} s/step (CPU {row['cpu_s_per_step']:.3f}), "
                  f"update {row['update_s_per_step']:.3f} s/step, accuracy {row['accuracy_before']:.3f} -> "
                  f"{row['accuracy_after']:.3f}, load {row['load_before'][0]:.2f}", flush=True)
    loads = [r["load_before"][0] / (os.cpu_count() or 1) for r in rows]
    meta["load_per_core_median"] = statistics.median(loads)
    meta["all_runs_idle"] = all(r["idle"] for r in rows)
    meta["versions"] = {"grpo-core torch": meta["torch"], **next((r["versions"] for r in rows if "versions" in r),
                                                                  {})}
    summary = summarize(rows)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    plot(rows, summary, meta, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    if own_tmp:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
