"""The GRPO-family trainer: rollout -> verify -> advantage -> update, on a DeepSpeed ZeRO-3 engine.

`train(cfg)` reads top to bottom as the algorithm (docs/algorithms.md):

    for step in 1..max_steps:
        groups  = self.rollout(step)        # sample G responses per prompt, verify, reward; DAPO dynamic sampling
        self.assign_advantages(groups)      # GRPO / Dr.GRPO / RLOO (+ EDAS)
        metrics = self.update(groups, step) # ppo_epochs x mini_batches optimizer steps over packed micro-batches
        log, evaluate, checkpoint

Data parallelism: every rank holds the same global list of groups for a step (prompts are sharded for
generation and verification, then the small per-group results are all-gathered), and takes a
deterministic share of each mini-batch for the update. Loss normalizers are reduced over the whole
optimizer step on all ranks, and the NSR random stream is indexed by global token id, so the update does
not depend on the number of ranks or on micro-batching.
"""
from __future__ import annotations

import json
import math
import random
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from grpo_kernels import backend_summary

from grpo_core import distributed as gdist
from grpo_core.advantages import DynamicSamplingBuffer, aggregation_notice, compute_advantages, edas_shape
from grpo_core.anchor import find_anchor
from grpo_core.checkpoint import load_rng, load_trainer_state, save_checkpoint, select_checkpoint
from grpo_core.config import Config, config_diff, deepspeed_config
from grpo_core.data.sampler import PromptSampler
from grpo_core.errors import CheckpointError, NonFiniteError, naming
from grpo_core.evaluate import evaluate_accuracy
from grpo_core.experience import Group, Response
from grpo_core.losses import LossNormalizer, PolicyObjective, backward_scale
from grpo_core.metrics import UpdateMetrics, rollout_metrics
from grpo_core.model import CausalLM
from grpo_core.packing import MicroBatch, build_micro_batch, padding_micro_batch, plan_micro_batches
from grpo_core.preempt import STOP
from grpo_core.rollout.base import SamplingParams
from grpo_core.rollout.factory import build_rollout_engine
from grpo_core.run_setup import prepare_run
from grpo_core.runinfo import print_header, provenance, quiet_known_warnings
from grpo_core.tracking import MetricsLogger, plot_curves
from grpo_core.weight_sync import sync_engine_weights


class PolicyForward(nn.Module):
    """One module forward that returns what the loss needs, so ZeRO-3 gathers the weights (the LM head's
    included) inside it: per response token logprob and entropy from the fused kernel, and the final
    hidden states at the Hidden-Align anchors (same forward, no extra pass)."""

    def __init__(self, policy: nn.Module, kernel_backend: str = "auto"):
        super().__init__()
        self.policy = policy
        self.kernel_backend = kernel_backend

    def forward(self, mb: MicroBatch, temperature: float, with_entropy: bool = True, loss_fn=None):
        """(logprob, entropy, anchor hidden); with loss_fn (model.fused_lm_head_loss) the token loss is made in
        the LM head's forward and this returns (loss, logprob, entropy, anchor hidden), logprob/entropy detached."""
        hidden = self.policy(mb.input_ids, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens)[0]
        out = self.policy.lm_head(hidden[mb.response_positions], targets=mb.targets, temperature=temperature,
                                  with_entropy=with_entropy, backend=self.kernel_backend, loss_fn=loss_fn)
        return (*out, hidden[mb.anchor_positions])


class ClippedAdamW(torch.optim.AdamW):
    """torch AdamW that clips the global gradient norm first (max_norm 0 = no clipping) and keeps it in
    `_global_grad_norm`, where the DeepSpeed engine reads it (get_global_grad_norm). `has_overflow` answers the
    trainer's non-finite-gradient check from the same norm (one fused reduction, one host sync per step)."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self._global_grad_norm = None
        self._norm = None  # total norm of the current gradients, computed once per step

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _total_norm(self) -> torch.Tensor:
        if self._norm is None:
            grads = self._grads()
            self._norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return self._norm

    def has_overflow(self, partition_gradients: bool = True) -> bool:
        return not bool(torch.isfinite(self._total_norm()))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._norm = None
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        norm = self._total_norm()
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for g in self.param_groups for p in g["params"]],
                                                 self.max_norm, norm)
        self._global_grad_norm, self._norm = norm, None
        return super().step(closure)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(cfg: Config, opt_step: int) -> float:
    """Learning rate of optimizer step `opt_step` (0-based): linear warmup, then constant or cosine."""
    t = cfg.trainer
    if t.warmup_steps and opt_step < t.warmup_steps:
        return t.lr * (opt_step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    total = max(1, t.max_steps * t.ppo_epochs * t.mini_batches - t.warmup_steps)
    progress = min(1.0, (opt_step - t.warmup_steps) / total)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, cfg: Config, resume: str = "none", force: bool = False):
        self.cfg = cfg
        self.t0 = time.time()
        quiet_known_warnings()
        self.provenance = provenance(cfg)  # versions, threads, commit, seed: printed now, kept in summary.json
        print_header(cfg, self.provenance, resume)
        self.dist = gdist.init_distributed(cfg.trainer.device)
        self.device = self.dist.device
        self.out = Path(cfg.trainer.output_dir)
        set_seed(cfg.trainer.seed)
        self._resume_from = self._select_checkpoint(resume)
        self.run_id = uuid.uuid4().hex[:12]  # names this run's checkpoints (retention); a resume keeps its own
        self._consecutive_skips = 0
        self._saved_step = -1
        # tokenizer, model dir, datasets, verifier, warm start (skipped when resuming: the checkpoint has it)
        self.run = prepare_run(cfg, self.dist, resuming=self._resume_from is not None)
        self.tokenizer = self.run.tokenizer
        self.step = 0
        self.opt_steps = 0
        self._build_engines()
        self.sampler = PromptSampler(len(self.run.train_set), cfg.trainer.train_batch_prompts, seed=cfg.trainer.seed)
        self.dyn = DynamicSamplingBuffer(cfg.trainer.train_batch_prompts, cfg.algorithm.max_gen_batches)
        self.eval_before: Optional[float] = None
        self._maybe_resume(force)
        self.log = MetricsLogger(self.out, enabled=self.dist.is_main, tensorboard=cfg.logging.tensorboard,
                                 progress_bar=cfg.logging.progress_bar, total_steps=cfg.trainer.max_steps,
                                 initial_step=self.step)
        ops = backend_summary(cfg.model.kernel_backend, self.device)
        self.log.write(f"kernels (model.kernel_backend={cfg.model.kernel_backend}): "
                       + ", ".join(f"{op}={b}" for op, b in ops.items()))
        ws = self.run.warm_start_summary
        if ws.get("warm_start_train_accuracy") is not None:
            self.log.write(f"warm start: {ws['warm_start_steps']} steps, greedy accuracy on "
                           f"{cfg.warm_start.check_prompts} training prompts {ws['warm_start_train_accuracy']:.3f} "
                           f"(target {cfg.warm_start.target_accuracy:g}"
                           + ("" if ws["warm_start_reached_target"] else ", not reached") + ")")
        note = aggregation_notice(cfg.algorithm.advantage, cfg.algorithm.loss_agg)
        if note:
            self.log.write(note)

    # ------------------------------------------------------------------------------------------ set-up
    def _build_engines(self) -> None:
        import deepspeed  # lazy: a multi-second import, paid only when a Trainer is built

        cfg = self.cfg
        use_cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if (cfg.deepspeed.bf16 == "on" or (cfg.deepspeed.bf16 == "auto" and use_cuda)) \
            else torch.float32
        # rollout.engine decides (grpo_core/rollout/factory.py), before the trainer takes GPU memory: vLLM sizes
        # its KV cache from what is free now, then sleeps until the first weight sync wakes it.
        self.rollout_engine = build_rollout_engine(cfg, model_dir=self.run.model_dir, tokenizer=self.tokenizer,
                                                   device=self.device, dtype=self.dtype, release_on_sleep=True,
                                                   vllm_asleep=True)
        policy = self.run.policy  # plain module, warm-started when configured
        policy.set_activation_checkpointing(cfg.model.activation_checkpointing)
        self.module = PolicyForward(policy, cfg.model.kernel_backend)
        # ZeRO stage 0/1/2/3 (deepspeed.zero_stage; 0 on one rank unless asked otherwise: nothing to partition),
        # bucket and persistence sizes scaled to the model's hidden size unless set.
        ds_cfg = deepspeed_config(cfg, world_size=self.dist.world_size, use_cuda=use_cuda,
                                  hidden_size=policy.args.hidden_size)
        self.zero_stage = ds_cfg["zero_optimization"]["stage"]
        params = [p for p in self.module.parameters()]
        optimizer = None
        if self.zero_stage == 0 and self.dtype == torch.float32:
            # DeepSpeed's fp32 stage-0 path clips without keeping the norm: clip in the optimizer, which does.
            t = cfg.trainer
            optimizer = ClippedAdamW(params, max_norm=t.grad_clip, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                     weight_decay=t.weight_decay)
            ds_cfg = {k: v for k, v in ds_cfg.items() if k != "optimizer"}
            ds_cfg["gradient_clipping"] = 0.0
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, config=ds_cfg, model_parameters=params,
                                                    optimizer=optimizer)
        self.ref_engine = None
        if cfg.algorithm.kl_coef > 0:  # frozen reference, no optimizer state
            ref = PolicyForward(CausalLM.from_pretrained(self.run.reference_dir, dtype=torch.float32),
                                cfg.model.kernel_backend)
            ref.requires_grad_(False)
            if self.zero_stage == 3:  # partitioned like the policy
                ref_cfg = {k: v for k, v in ds_cfg.items() if k not in ("optimizer", "gradient_clipping")}
                self.ref_engine, *_ = deepspeed.initialize(model=ref, config=ref_cfg)
            else:  # stages 0-2 keep whole weights on every rank anyway: a plain module, no engine around it
                self.ref_engine = ref.to(device=self.device, dtype=self.dtype)
            self.ref_engine.eval()

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """The full policy weights under HF names (collective under ZeRO-3: every rank must call it)."""
        import deepspeed  # lazy: see _build_engines

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k[len("policy."):]: v.detach().clone() for k, v in self.module.state_dict().items()
                    if k.startswith("policy.")}

    def sync_rollout_weights(self) -> float:
        """Stream the policy into the rollout engine bucket by bucket (one ZeRO-3 submodule gathered at a time;
        collective: every rank). Wakes a sleeping vLLM engine. Returns seconds."""
        return sync_engine_weights(self.rollout_engine, self.module, prefix_to_strip="policy.").seconds

    # ------------------------------------------------------------------------------------------ rollout
    def rollout(self, step: int) -> tuple[list[Group], dict]:
        """Generate, verify and reward groups until the batch holds train_batch_prompts informative groups
        (DAPO dynamic sampling), bounded by max_gen_batches rounds."""
        cfg = self.cfg
        t0 = time.time()
        self.dyn.begin_step()
        all_groups: list[Group] = []
        rounds = 0
        while rounds == 0 or (cfg.algorithm.dynamic_sampling and self.dyn.needs_more()):
            rounds += 1
            prompt_indices = self.sampler.next_batch(cfg.trainer.train_batch_prompts)
            groups = self._generate_groups(prompt_indices, step, rounds)
            all_groups.extend(groups)
            informative = [g.informative for g in groups]
            self.dyn.add_round(groups, informative if cfg.algorithm.dynamic_sampling else [True] * len(groups))
        kept, stats = self.dyn.take()
        for gi, g in enumerate(kept):  # re-index the kept groups: the NSR token ids and anchors use these
            for s in g.samples:
                s.group_index = gi
        metrics = rollout_metrics(all_groups, kept)
        metrics.update(self.run.verifier.take_metrics())  # reward/errors, reward/extra/*, per-source (collective)
        metrics.update({"dynamic_sampling/rounds": rounds, "dynamic_sampling/filtered_frac": stats.filtered_fraction,
                        "dynamic_sampling/bound_hit": float(stats.bound_hit), "time/rollout_s": time.time() - t0})
        return kept, metrics

    def _generate_groups(self, prompt_indices: list[int], step: int, round_index: int) -> list[Group]:
        cfg = self.cfg
        rank, world = self.dist.rank, self.dist.world_size
        positions = list(range(rank, len(prompt_indices), world))  # this rank's share of the round's prompts
        samples = self.run.train_set.get_batch([prompt_indices[p] for p in positions])
        params = SamplingParams(n=cfg.rollout.group_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens,
                                stop_strings=list(cfg.rollout.stop_strings),
                                seed=_mix(cfg.trainer.seed, step, round_index))
        # Called on every rank, even with no prompts: with vLLM tensor parallelism generate is collective.
        gens = self.rollout_engine.generate([s.prompt_ids for s in samples], params,
                                            request_ids=positions)
        texts = [g.text if g.text is not None else self.tokenizer.decode(g.token_ids) for g in gens]
        golds = [samples[g.prompt_index].answer for g in gens]
        results = self.run.verifier.score(texts, golds, [g.prompt_index for g in gens],
                                          rows=[samples[g.prompt_index] for g in gens])
        local = [Group(prompt_uid=s.uid, answer=s.answer) for s in samples]
        rewards = self.run.rewards(results, [len(g.token_ids) for g in gens], [g.finish_reason for g in gens], texts)
        for g, text, res, r in zip(gens, texts, results, rewards):
            sample = Response(group_index=-1, sample_index=g.sample_index, prompt_ids=samples[g.prompt_index].prompt_ids,
                            response_ids=list(g.token_ids), rollout_logprobs=list(g.logprobs),
                            finish_reason=g.finish_reason, text=text, reward=float(r), correct=bool(res.correct),
                            answer_key=res.canonical)
            if cfg.algorithm.hidden_align_coef > 0 and sample.correct:
                sample.anchor = find_anchor(sample.response_ids, self.tokenizer, cfg.algorithm.hidden_align_marker)
            local[g.prompt_index].samples.append(sample)
        # Every rank gets every group, in the round's prompt order.
        gathered = gdist.all_gather_objects(list(zip(positions, local)))
        by_position = {p: grp for part in gathered for p, grp in part}
        return [by_position[p] for p in range(len(prompt_indices))]

    # ------------------------------------------------------------------------------------------ advantages
    def assign_advantages(self, groups: list[Group]) -> None:
        a = self.cfg.algorithm
        samples = [s for g in groups for s in g.samples]
        if not samples:
            return
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        group_ids = torch.tensor([s.group_index for s in samples], dtype=torch.long)
        adv = compute_advantages(rewards, group_ids, a.advantage, eps=a.adv_eps, std_unbiased=a.adv_std_unbiased)
        if a.edas:
            correct = torch.tensor([s.correct for s in samples], dtype=torch.bool)
            adv = edas_shape(adv, group_ids, correct, [s.answer_key for s in samples],
                             alpha=a.edas_alpha, beta=a.edas_beta, kappa=a.edas_kappa)
        for s, v in zip(samples, adv.tolist()):
            s.advantage = v

    # ------------------------------------------------------------------------------------------ update
    def _rank_micro_batches(self, groups: list[Group]) -> list[MicroBatch]:
        """This rank's share of a mini-batch, packed under the token budget; every rank gets the same count
        (padding micro-batches) because ZeRO-3 reduces gradients inside backward."""
        cfg = self.cfg
        mine = groups[self.dist.rank::self.dist.world_size]
        plans = plan_micro_batches(mine, cfg.trainer.max_tokens_per_micro_batch)
        with_anchors = cfg.algorithm.hidden_align_coef > 0
        mbs = [build_micro_batch(p, cfg.rollout.group_size, cfg.rollout.max_new_tokens, with_anchors)
               for p in plans]
        n = gdist.all_reduce_max_int(len(mbs), self.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        mbs += [padding_micro_batch(pad_id) for _ in range(n - len(mbs))]
        return [mb.to(self.device) for mb in mbs]

    @torch.no_grad()
    def _fill_old_logprobs(self, mbs: list[MicroBatch], metrics: UpdateMetrics) -> None:
        self.engine.eval()
        for mb in mbs:
            lp, _, _ = self.engine(mb, self.cfg.rollout.temperature, with_entropy=False)
            mb.old_logprob = lp.float()
            metrics.add_mismatch(mb.old_logprob, mb.rollout_logprob, mb.mask)
            if self.ref_engine is not None:
                mb.ref_logprob = self.ref_engine(mb, self.cfg.rollout.temperature, with_entropy=False)[0].float()
        self.engine.train()

    def update(self, groups: list[Group], step: int) -> dict:
        """ppo_epochs x mini_batches optimizer steps over the step's groups (docs/algorithms.md §3). A step whose
        loss is not finite on some rank is skipped (weights and optimizer untouched). Metrics accumulate on the
        device and are reduced once per step (grpo_core.metrics.UpdateMetrics)."""
        cfg = self.cfg
        t0 = time.time()
        m = cfg.trainer.mini_batches
        per_mini = math.ceil(len(groups) / m) if groups else 0
        minis = [groups[i * per_mini:(i + 1) * per_mini] for i in range(m)]
        minis = [mi for mi in minis if mi]
        # Old logprobs: the first mini-batch's first pass runs before any optimizer step of this rollout batch, so
        # it is exactly on-policy (ratio = 1): its old logprobs are that forward's own, detached, and kept for later
        # epochs. Only the other mini-batches need the separate pass, made before the first step. A KL reference
        # needs its own pass anyway, so with one every mini-batch takes the pass.
        first_on_policy = self.ref_engine is None
        packed = [self._rank_micro_batches(mi) for mi in minis]
        metrics = UpdateMetrics()
        # The rollout/trainer mismatch compares the rollout engine's logprobs with the trainer's pre-update
        # (old) ones, once per rollout batch: here, or in the on-policy pass below.
        for i, mbs in enumerate(packed):
            if not (i == 0 and first_on_policy):
                self._fill_old_logprobs(mbs, metrics)
        t_old = time.time() - t0
        skipped = 0
        for epoch in range(cfg.trainer.ppo_epochs):
            for mi, mbs in enumerate(packed):
                on_policy = first_on_policy and epoch == 0 and mi == 0
                norm = LossNormalizer.from_step([mb.mask for mb in mbs], [mb.seq_ids for mb in mbs],
                                                gen_max_len=cfg.rollout.max_new_tokens)
                n_align = self._count_align_groups(minis[mi])
                objective = PolicyObjective(cfg.algorithm, seed=cfg.trainer.seed, step=self.opt_steps,
                                            backend=cfg.model.kernel_backend, with_kl=self.ref_engine is not None)
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                for k, mb in enumerate(mbs):
                    self.engine.set_gradient_accumulation_boundary(k == len(mbs) - 1)
                    loss = self._micro_batch_loss(objective, mb, norm, n_align, on_policy, metrics)
                    # No host sync per micro-batch: the loss's finiteness accumulates on the device and is read
                    # once per optimizer step. A non-finite loss still runs backward (same collectives on every
                    # rank); its gradients are dropped with the step (_optimizer_step), like a non-finite gradient.
                    finite &= torch.isfinite(loss.detach())
                    self.engine.backward(loss * backward_scale(self.dist.world_size), scale_wrt_gas=False)
                finite = gdist.all_reduce_max_int(0 if bool(finite) else 1, self.device) == 0
                lr = lr_at(cfg, self.opt_steps)
                for group in self.engine.optimizer.param_groups:
                    group["lr"] = lr
                metrics.optimizer_steps += 1
                if not self._optimizer_step(finite, step):
                    skipped += 1
        out = metrics.compute() if packed else {}  # dynamic sampling may keep no group: nothing to train on
        out.update({"lr": lr_at(cfg, max(self.opt_steps - 1, 0)), "train/skipped_steps": float(skipped),
                    "time/old_logprob_s": t_old if packed else 0.0, "time/update_s": time.time() - t0})
        gn = self.engine.get_global_grad_norm() if packed and hasattr(self.engine, "get_global_grad_norm") else None
        if gn is not None:
            out["grad_norm"] = float(gn)
        return out

    def _optimizer_step(self, loss_finite: bool, step: int) -> bool:
        """One optimizer step, unless the loss (on any rank) or a gradient is non-finite: then the gradients are
        dropped and weights, optimizer state and the optimizer-step counter stay as they were (the same on every
        rank). trainer.max_consecutive_skips skips in a row stop the run (NonFiniteError)."""
        finite = loss_finite and self._grads_finite()
        if finite:
            self.engine.step()
            self.opt_steps += 1
            self._consecutive_skips = 0
            return True
        # DeepSpeed's engine.zero_grad() only clears param.grad: the ZeRO optimizer's own zero_grad also drops the
        # reduced gradient partitions and restarts accumulation, else they would be added into the next step.
        if hasattr(self.engine.optimizer, "zero_grad"):
            self.engine.optimizer.zero_grad(set_to_none=True)
        self.engine.zero_grad()
        self._consecutive_skips += 1
        limit = self.cfg.trainer.max_consecutive_skips
        if self.dist.is_main:
            print(f"[grpo] step {step}: non-finite {'loss' if not loss_finite else 'gradient'}, optimizer step "
                  f"skipped ({self._consecutive_skips} in a row, limit {limit})", flush=True)
        if self._consecutive_skips >= limit:
            raise NonFiniteError(
                f"stopped at step {step}: {limit} optimizer steps in a row had a non-finite loss or gradient "
                f"(trainer.max_consecutive_skips); the weights are unchanged since the last good step and the last "
                f"checkpoint is kept; lower trainer.lr, check the data and model, then --resume auto")
        return False

    def _grads_finite(self) -> bool:
        """Whether every gradient of this optimizer step is finite, on all ranks. DeepSpeed checks this only for
        fp16 loss scaling; in fp32/bf16 a non-finite gradient would step the weights to NaN."""
        opt = getattr(self.engine, "optimizer", None)
        if hasattr(opt, "has_overflow"):  # ZeRO 1-3: the reduced gradient partitions, all-reduced over ranks
            return not opt.has_overflow(partition_gradients=True)
        bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in self.module.parameters())
        return gdist.all_reduce_max_int(int(bad), self.device) == 0

    def _count_align_groups(self, groups: list[Group]) -> int:
        if self.cfg.algorithm.hidden_align_coef <= 0:
            return 0
        return sum(1 for g in groups if sum(1 for s in g.samples if s.correct and s.anchor is not None) >= 2)

    def _micro_batch_loss(self, objective: PolicyObjective, mb: MicroBatch, norm: LossNormalizer, n_align: int,
                          on_policy: bool, metrics: UpdateMetrics) -> torch.Tensor:
        """One packed micro-batch's share of the optimizer step's loss (losses.PolicyObjective), its metrics
        recorded. With model.fused_lm_head_loss the objective's token part runs inside the LM head's forward."""
        temperature = self.cfg.rollout.temperature
        if self.cfg.model.fused_lm_head_loss:
            loss_fn = objective.token_loss_fn(mb, norm, on_policy)
            total, logprob, entropy, anchor_h = self.engine(mb, temperature, with_entropy=True, loss_fn=loss_fn)
            loss, terms = objective.finish(total, anchor_h, n_align)
        else:
            logprob, entropy, anchor_h = self.engine(mb, temperature, with_entropy=True)
            loss, terms = objective(mb, norm, logprob, entropy, on_policy, anchor_h, n_align)
        old = logprob.detach() if on_policy else mb.old_logprob
        if on_policy:
            mb.old_logprob = old.float()  # the old policy's logprobs for this mini-batch's later epochs
            metrics.add_mismatch(old, mb.rollout_logprob, mb.mask)
        metrics.add_objective(terms)
        metrics.add_tokens(logprob, old, entropy, mb.mask)
        return loss

    # ------------------------------------------------------------------------------------------ loop
    def evaluate(self) -> dict:
        """Held-out accuracy, greedy (`accuracy`, what the summary reports) and sampled at the rollout
        temperature (`accuracy_sampled`)."""
        self.sync_rollout_weights()
        args = (self.rollout_engine, self.run.eval_set, self.run.verifier, self.cfg, self.dist)
        res = evaluate_accuracy(*args)
        sampled = evaluate_accuracy(*args, greedy=not self.cfg.trainer.eval_greedy)
        res[f"accuracy_{'sampled' if self.cfg.trainer.eval_greedy else 'greedy'}"] = sampled["accuracy"]
        self.rollout_engine.sleep()  # free the engine's weights (and vLLM's KV cache) for training
        return res

    def fit(self) -> dict:
        cfg = self.cfg
        if self.step == 0 and self.run.eval_set is not None and not self._stop_requested():
            res = self.evaluate()
            self.eval_before = res["accuracy"]
            self.log.log(0, res, phase="eval")
            self.log.write(f"held-out accuracy before RL: {res['accuracy']:.3f} ({res['n']} prompts)")
        while self.step < cfg.trainer.max_steps and not self._stop_requested():
            step = self.step + 1
            t_sync = self.sync_rollout_weights()
            groups, metrics = self.rollout(step)                # rollout + verify + reward (+ dynamic sampling)
            self.rollout_engine.sleep()                         # the engine frees its weights (+ KV cache) for the update
            self.assign_advantages(groups)                      # advantage (+ EDAS)
            metrics.update(self.update(groups, step))           # loss + optimizer steps
            metrics.update({"time/weight_sync_s": t_sync, "time/elapsed_s": time.time() - self.t0,
                            "train/opt_steps": float(self.opt_steps)})
            if self.device.type == "cuda":
                metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.step = step
            self.log.log(step, metrics)
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < cfg.trainer.max_steps \
                    and self.run.eval_set is not None:
                self.log.log(step, self.evaluate(), phase="eval")
            if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0:
                self.save()
        if self._stopped_by is not None:
            return self.finish(stopped_by=STOP.signal_name or self._stopped_by)
        return self.finish()

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM / SIGUSR1 / SIGINT (collective: all ranks stop after the same step)."""
        if gdist.all_reduce_max_int(int(STOP.requested), self.device):
            self._stopped_by = STOP.signal_name or "a signal on another rank"
            return True
        return False

    def finish(self, stopped_by: Optional[str] = None) -> dict:
        summary = {"steps": self.step, "eval_accuracy_before_rl": self.eval_before}
        if stopped_by is None and self.run.eval_set is not None:
            res = self.evaluate()
            self.log.log(self.step, res, phase="eval")
            summary["eval_accuracy_after_rl"] = res["accuracy"]
            self.log.write(f"held-out accuracy after RL: {res['accuracy']:.3f} (before: {self.eval_before})")
        ckpt = self.out / "checkpoints" / f"step_{self.step:06d}"
        if self.step > 0 and self._saved_step != self.step:
            self.save()
        summary.update(self.run.warm_start_summary)
        summary["wall_seconds"] = time.time() - self.t0
        summary["final_checkpoint"] = str(ckpt / "hf") if ckpt.exists() else None
        summary["checkpoint"] = str(ckpt) if ckpt.exists() else None
        summary["opt_steps"] = self.opt_steps
        if stopped_by is not None:
            summary["stopped_by"] = stopped_by
        summary["provenance"] = self.provenance
        if self.dist.is_main:
            if self.cfg.logging.plot and stopped_by is None:
                plot_curves(self.out / "metrics.jsonl", self.out / "curves.png", title="grpo-core")
            tmp = self.out / ".summary.json.tmp"
            with naming(tmp):
                tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
            tmp.replace(self.out / "summary.json")
        self.log.close()
        gdist.barrier()  # every rank exits after the summary is written (a launcher may kill the rest at the first exit)
        useless = next(filter(None, gdist.all_gather_objects(self.run.verifier.never_succeeded())), None)
        if useless and stopped_by is None:
            from grpo_core.scoring import RewardFunctionError

            raise RewardFunctionError(useless)
        return summary

    # ------------------------------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        return {"step": self.step, "opt_steps": self.opt_steps, "sampler": self.sampler.state_dict(),
                "dynamic_sampling": self.dyn.state_dict(), "eval_accuracy_before_rl": self.eval_before,
                "warm_start": self.run.warm_start_summary,
                "world_size": self.dist.world_size, "zero_stage": self.zero_stage, "config": self.cfg.to_dict(),
                "run_id": self.run_id}

    def save(self) -> None:
        state = self.trainer_state()
        save_checkpoint(self.out, self.step, engine=self.engine, trainer_state=state, rank=self.dist.rank,
                        export_hf=self._export_hf if self.cfg.checkpoint.export_hf else None,
                        keep_last=self.cfg.checkpoint.keep_last, run_id=self.run_id)
        self._saved_step = self.step

    def _export_hf(self, directory: Path) -> None:
        sd = self.gathered_state_dict()
        if self.dist.is_main:
            self.run.policy.save_pretrained(directory, state_dict=sd)
            self.tokenizer.save_pretrained(directory)

    def _select_checkpoint(self, resume: str) -> Optional[Path]:
        """Rank 0 picks (and verifies) the checkpoint to resume; every rank gets its choice."""
        self._stopped_by: Optional[str] = None
        choice: tuple = (None, None)
        if self.dist.is_main:
            try:
                ckpt = select_checkpoint(self.out, resume, say=lambda m: print(m, flush=True))
                choice = (str(ckpt) if ckpt is not None else None, None)
            except Exception as e:  # shared, so that every rank raises it instead of waiting
                choice = (None, e)
        path, error = gdist.all_gather_objects(choice)[0]
        if error is not None:
            raise error
        return Path(path) if path is not None else None

    def _maybe_resume(self, force: bool) -> None:
        ckpt = self._resume_from
        if ckpt is None:
            return
        state = load_trainer_state(ckpt)
        diff = [d for d in config_diff(state["config"], self.cfg.to_dict())
                if not d.startswith(("trainer.max_steps", "trainer.max_consecutive_skips", "checkpoint.", "logging."))]
        if diff and not force:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise CheckpointError(f"refusing to resume from {ckpt}: the config differs ({shown}); pass --force to "
                                  f"resume anyway, or set a new trainer.output_dir to start fresh")
        self._check_layout(ckpt, state)
        self.engine.load_checkpoint(str(ckpt / "ds"), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        self.step, self.opt_steps = state["step"], state["opt_steps"]
        self._saved_step = self.step
        self.run_id = state.get("run_id") or self.run_id
        self.sampler.load_state_dict(state["sampler"])
        self.dyn.load_state_dict(state["dynamic_sampling"])
        self.eval_before = state.get("eval_accuracy_before_rl")
        self.run.warm_start_summary = state.get("warm_start", {})
        load_rng(ckpt, self.dist.rank)
        if self.dist.is_main:
            print(f"resumed from {ckpt} at step {self.step}", flush=True)

    def _check_layout(self, ckpt: Path, state: dict) -> None:
        """DeepSpeed's optimizer state is saved per rank and per ZeRO stage (stage 0 keeps it in one file, stages
        1-3 partition it by rank), so a checkpoint resumes only with the world size and effective ZeRO stage that
        wrote it; --force cannot bridge that, so this is refused before DeepSpeed's own loader fails obscurely."""
        saved = {"ranks": state.get("world_size"), "ZeRO stage": state.get("zero_stage")}
        now = {"ranks": self.dist.world_size, "ZeRO stage": self.zero_stage}
        differ = [f"{k} {saved[k]} -> {now[k]}" for k in saved if saved[k] is not None and saved[k] != now[k]]
        if differ:
            hint = (" (one rank runs unpartitioned, stage 0, unless deepspeed.one_rank_unpartitioned=false)"
                    if 1 in (saved["ranks"], now["ranks"]) else "")
            raise CheckpointError(
                f"cannot resume from {ckpt}: it was written with {saved['ranks']} rank(s) at ZeRO stage "
                f"{saved['ZeRO stage']}, this run has {now['ranks']} at stage {now['ZeRO stage']} "
                f"({'; '.join(differ)}){hint}; resume with the same ranks and deepspeed settings"
                + (f", or start fresh from its HF export: model.path={ckpt / 'hf'} in a new trainer.output_dir"
                   if (ckpt / "hf" / "config.json").exists() else ""))


def _mix(*values: int) -> int:
    """A deterministic 63-bit mix of integers (seeds for a step's sampling and NSR streams)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def train(cfg: Config, resume: str = "none", force: bool = False) -> dict:
    trainer = Trainer(cfg, resume=resume, force=force)
    return trainer.fit()

