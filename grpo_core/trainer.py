"""The GRPO-family trainer: rollout -> verify -> advantage -> update, on a DeepSpeed ZeRO-3 engine.

`train(cfg)` reads top to bottom as the algorithm (spec: shared/specs/algorithms.md):

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

import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from grpo_core import distributed as gdist
from grpo_core.config import Config, config_diff, deepspeed_config
from grpo_core.experience import Group, MicroBatch, Sample, build_micro_batch, padding_micro_batch, plan_micro_batches


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
        from grpo_core.run_setup import prepare_run
        from grpo_core.runinfo import announce_deepspeed_build, print_header, provenance, quiet_known_warnings

        self.cfg = cfg
        self.t0 = time.time()
        quiet_known_warnings()
        self.provenance = provenance(cfg)  # versions, threads, commit, seed: printed now, kept in summary.json
        print_header(cfg, self.provenance, resume)
        announce_deepspeed_build(cfg.trainer.device)
        self.dist = gdist.init_distributed(cfg.trainer.device)
        self.device = self.dist.device
        self.out = Path(cfg.trainer.output_dir)
        set_seed(cfg.trainer.seed)
        from grpo_core.checkpoint import find_checkpoint

        self._resume_from = find_checkpoint(self.out, resume)
        # tokenizer, model dir, datasets, verifier, warm start (skipped when resuming: the checkpoint has it)
        self.run = prepare_run(cfg, self.dist, resuming=self._resume_from is not None)
        self.tokenizer = self.run.tokenizer
        self.step = 0
        self.opt_steps = 0
        self._build_engines()
        from grpo_core.advantages import DynamicSamplingBuffer
        from grpo_core.data.sampler import PromptSampler

        self.sampler = PromptSampler(len(self.run.train_set), cfg.trainer.train_batch_prompts, seed=cfg.trainer.seed)
        self.dyn = DynamicSamplingBuffer(cfg.trainer.train_batch_prompts, cfg.algorithm.max_gen_batches)
        self.eval_before: Optional[float] = None
        self._maybe_resume(force)
        # Test seam for the kill-and-resume tests: GRPO_FAULT_INJECT="kill_after_step=N" SIGKILLs this process
        # right after step N is logged (and checkpointed, if due).
        fault = os.environ.get("GRPO_FAULT_INJECT", "")
        self._kill_after = int(fault.split("=", 1)[1]) if fault.startswith("kill_after_step=") else None
        from grpo_core.tracking import MetricsLogger

        self.log = MetricsLogger(self.out, enabled=self.dist.is_main, tensorboard=cfg.logging.tensorboard,
                                 progress_bar=cfg.logging.progress_bar, total_steps=cfg.trainer.max_steps,
                                 initial_step=self.step)

    # ------------------------------------------------------------------------------------------ set-up
    def _build_engines(self) -> None:
        import deepspeed

        from grpo_core.model import CausalLM
        from grpo_core.rollout import build_engine

        cfg = self.cfg
        use_cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if (cfg.deepspeed.bf16 == "on" or (cfg.deepspeed.bf16 == "auto" and use_cuda)) \
            else torch.float32
        r = cfg.rollout
        if r.engine == "vllm":
            # Before the trainer takes GPU memory: vLLM sizes its KV cache from what is free now. It then
            # sleeps (weights and KV cache released) until the first weight sync wakes it.
            self.rollout_engine = build_engine(
                "vllm", model_dir=self.run.model_dir, tokenizer=self.tokenizer, dtype=self.dtype,
                gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
                sleep_mode=r.sleep_mode, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                seed=cfg.trainer.seed)
            self.rollout_engine.sleep()
        policy = self.run.policy  # plain module, warm-started when configured
        policy.set_activation_checkpointing(cfg.model.activation_checkpointing)
        self.module = PolicyForward(policy, cfg.model.kernel_backend)
        ds_cfg = deepspeed_config(cfg, world_size=self.dist.world_size, use_cuda=use_cuda)
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, config=ds_cfg,
                                                    model_parameters=[p for p in self.module.parameters()])
        self.ref_engine = None
        if cfg.algorithm.kl_coef > 0:  # frozen reference: partitioned by ZeRO-3, no optimizer state
            ref = PolicyForward(CausalLM.from_pretrained(self.run.reference_dir, dtype=torch.float32),
                                cfg.model.kernel_backend)
            ref.requires_grad_(False)
            ref_cfg = {k: v for k, v in ds_cfg.items() if k not in ("optimizer", "gradient_clipping")}
            self.ref_engine, *_ = deepspeed.initialize(model=ref, config=ref_cfg)
            self.ref_engine.eval()
        if r.engine == "torch":
            # The torch engine owns a plain (unpartitioned) inference copy, refreshed once per rollout phase.
            infer = CausalLM.from_pretrained(self.run.model_dir, dtype=self.dtype, device=self.device)
            # It frees the copy's weights while the trainer updates (sleep) and re-allocates them at each sync.
            self.rollout_engine = build_engine("torch", model=infer, tokenizer=self.tokenizer,
                                               max_batch_size=r.max_batch_size, device=self.device,
                                               release_on_sleep=True)

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """The full policy weights under HF names (collective under ZeRO-3: every rank must call it)."""
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k[len("policy."):]: v.detach().clone() for k, v in self.module.state_dict().items()
                    if k.startswith("policy.")}

    def sync_rollout_weights(self) -> float:
        """Stream the policy into the rollout engine bucket by bucket (one ZeRO-3 submodule gathered at a time;
        collective: every rank). Wakes a sleeping vLLM engine. Returns seconds."""
        from grpo_core.weight_sync import sync_engine_weights

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
        metrics = self._rollout_metrics(all_groups, kept)
        metrics.update({"dynamic_sampling/rounds": rounds, "dynamic_sampling/filtered_frac": stats.filtered_fraction,
                        "dynamic_sampling/bound_hit": float(stats.bound_hit), "time/rollout_s": time.time() - t0})
        return kept, metrics

    def _generate_groups(self, prompt_indices: list[int], step: int, round_index: int) -> list[Group]:
        from grpo_core.anchor import find_anchor
        from grpo_core.rollout.base import SamplingParams

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
        results = self.run.verifier.score(texts, golds, [g.prompt_index for g in gens])
        local = [Group(prompt_uid=s.uid, answer=s.answer) for s in samples]
        rewards = self.run.rewards(results, [len(g.token_ids) for g in gens], [g.finish_reason for g in gens], texts)
        for g, text, res, r in zip(gens, texts, results, rewards):
            sample = Sample(group_index=-1, sample_index=g.sample_index, prompt_ids=samples[g.prompt_index].prompt_ids,
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

    def _rollout_metrics(self, all_groups: list[Group], kept: list[Group]) -> dict:
        samples = [s for g in all_groups for s in g.samples]
        lengths = [len(s.response_ids) for s in samples]
        return {
            "reward/mean": float(np.mean([s.reward for s in samples])),
            "accuracy": float(np.mean([s.correct for s in samples])),
            "response_len/mean": float(np.mean(lengths)),
            "response_len/max": float(np.max(lengths)),
            "response_len/truncated_frac": float(np.mean([s.finish_reason == "length" for s in samples])),
            "groups/kept": float(len(kept)),
            "groups/all_correct_frac": float(np.mean([all(s.correct for s in g.samples) for g in all_groups])),
            "groups/all_wrong_frac": float(np.mean([not any(s.correct for s in g.samples) for g in all_groups])),
        }

    # ------------------------------------------------------------------------------------------ advantages
    def assign_advantages(self, groups: list[Group]) -> None:
        from grpo_core.advantages import compute_advantages, edas_shape

        a = self.cfg.algorithm
        samples = [s for g in groups for s in g.samples]
        if not samples:
            return
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        group_ids = torch.tensor([s.group_index for s in samples], dtype=torch.long)
        adv = compute_advantages(rewards, group_ids, a.advantage, eps=a.adv_eps)
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
        mbs = [build_micro_batch(p, cfg.rollout.max_new_tokens, with_anchors) for p in plans]
        n = gdist.all_reduce_max_int(len(mbs), self.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        mbs += [padding_micro_batch(pad_id) for _ in range(n - len(mbs))]
        return [mb.to(self.device) for mb in mbs]

    @torch.no_grad()
    def _fill_old_logprobs(self, mbs: list[MicroBatch]) -> None:
        self.engine.eval()
        for mb in mbs:
            lp, _, _ = self.engine(mb, self.cfg.rollout.temperature, with_entropy=False)
            mb.old_logprob = lp.float()
            if self.ref_engine is not None:
                mb.ref_logprob = self.ref_engine(mb, self.cfg.rollout.temperature, with_entropy=False)[0].float()
        self.engine.train()

    def update(self, groups: list[Group], step: int) -> dict:
        from grpo_core.losses import LossNormalizer
        from grpo_core.metrics import MetricAccumulator

        cfg = self.cfg
        t0 = time.time()
        m = cfg.trainer.mini_batches
        per_mini = math.ceil(len(groups) / m) if groups else 0
        minis = [groups[i * per_mini:(i + 1) * per_mini] for i in range(m)]
        minis = [mi for mi in minis if mi]
        # Old logprobs: reuse the update's own forward when exactly on-policy (ratio = 1 at the first pass).
        on_policy = cfg.trainer.ppo_epochs == 1 and len(minis) == 1 and self.ref_engine is None
        packed = [self._rank_micro_batches(mi) for mi in minis]
        if not on_policy:
            for mbs in packed:
                self._fill_old_logprobs(mbs)
        t_old = time.time() - t0
        acc = MetricAccumulator()
        skipped = 0
        for _epoch in range(cfg.trainer.ppo_epochs):
            for mi, mbs in enumerate(packed):
                norm = LossNormalizer.from_step([mb.mask for mb in mbs], [mb.seq_ids for mb in mbs],
                                                gen_max_len=cfg.rollout.max_new_tokens)
                n_align = self._count_align_groups(minis[mi])
                finite = True
                for k, mb in enumerate(mbs):
                    self.engine.set_gradient_accumulation_boundary(k == len(mbs) - 1)
                    loss, metrics, mism_max = self._micro_batch_loss(mb, norm, n_align, on_policy)
                    ok = bool(torch.isfinite(loss))  # one host sync per micro-batch, not per token
                    if not ok:
                        finite = False
                        loss = self._zero_touch(mb)
                    self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)
                    acc.add_dict({k: v.nan_to_num(0.0, 0.0, 0.0) for k, v in metrics.items()}, reduce="sum")
                    acc.add("mismatch/max_abs", mism_max.nan_to_num(0.0, 0.0, 0.0), reduce="max")
                finite = gdist.all_reduce_max_int(0 if finite else 1, self.device) == 0
                lr = lr_at(cfg, self.opt_steps)
                for group in self.engine.optimizer.param_groups:
                    group["lr"] = lr
                if finite:
                    self.engine.step()
                    self.opt_steps += 1
                else:  # a non-finite loss: drop this step's gradients, leave weights and optimizer untouched
                    skipped += 1
                    self.engine.zero_grad()
        if not packed:  # dynamic sampling kept no group: nothing to train on this step
            return {"lr": lr_at(cfg, max(self.opt_steps - 1, 0)), "train/skipped_steps": 0.0,
                    "time/old_logprob_s": 0.0, "time/update_s": time.time() - t0}
        out = acc.compute()
        out = {_rename(k): v / (cfg.trainer.ppo_epochs * len(packed)) if k.startswith(("loss/", "actor/")) else v
               for k, v in out.items()}
        out.update(self._ratio_metrics(out))
        out.update({"lr": lr_at(cfg, max(self.opt_steps - 1, 0)), "train/skipped_steps": float(skipped),
                    "time/old_logprob_s": t_old, "time/update_s": time.time() - t0})
        gn = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        if gn is not None:
            out["grad_norm"] = float(gn)
        return out

    def _zero_touch(self, mb: MicroBatch) -> torch.Tensor:
        """A zero loss through every parameter, replacing a non-finite one so collectives stay in step."""
        lp, _, _ = self.engine(mb, self.cfg.rollout.temperature, with_entropy=False)
        return lp.sum() * 0.0

    def _count_align_groups(self, groups: list[Group]) -> int:
        if self.cfg.algorithm.hidden_align_coef <= 0:
            return 0
        return sum(1 for g in groups if sum(1 for s in g.samples if s.correct and s.anchor is not None) >= 2)

    def _micro_batch_loss(self, mb: MicroBatch, norm, n_align: int, on_policy: bool):
        """Loss of one packed micro-batch (its share of the optimizer step's loss) and metric tensors. Every
        micro-batch on every rank returns the same metric keys, so they reduce in one collective."""
        from kernels import clipped_policy_loss, gspo_policy_loss

        from grpo_core.advantages import fipo_weights
        from grpo_core.losses import kl_penalty, logprob_mismatch_stats, policy_objective, tis_weights

        cfg, a = self.cfg, self.cfg.algorithm
        # NSR draws: Philox keyed by the run seed, counters (global token id, optimizer step): independent of
        # micro-batching and of the number of ranks.
        common = dict(eps_low=a.eps_low, eps_high=a.eps_high, nsr=a.nsr, nsr_prob=a.nsr_prob, nsr_band=a.nsr_band,
                      seed=cfg.trainer.seed, step=self.opt_steps % 2**32)
        if cfg.model.fused_lm_head_loss:
            loss_fn, sums = self._token_loss_fn(mb, norm, on_policy, common)
            total, logprob, entropy, anchor_h = self.engine(mb, cfg.rollout.temperature, with_entropy=True,
                                                            loss_fn=loss_fn)
            old = logprob if on_policy else mb.old_logprob
            st = {k: sums[k] for k in ("n_clip_low", "n_clip_high", "n_rescued")}
            metrics = {"loss/policy": sums["policy"], "actor/entropy": sums["entropy"],
                       "loss/entropy_bonus": -a.entropy_coef * sums["entropy"]}
            if self.ref_engine is not None:
                metrics.update({"actor/kl_ref": sums["kl"], "loss/kl": a.kl_coef * sums["kl"]})
            metrics["loss/total"] = total.detach()
        else:
            logprob, entropy, anchor_h = self.engine(mb, cfg.rollout.temperature, with_entropy=True)
            old = logprob.detach() if on_policy else mb.old_logprob
            adv = mb.advantages
            if a.fipo:
                adv = adv * fipo_weights(logprob.detach(), old, mb.mask, adv, seq_ids=mb.seq_ids, tau=a.fipo_tau,
                                         eps_f=a.fipo_eps, high_only=a.fipo_high_only)
            if a.policy_loss == "gspo":
                starts = _seq_starts(mb.seq_ids)
                cu = torch.cat([starts, starts.new_tensor([mb.seq_ids.numel()])])
                per_tok, st = gspo_policy_loss(logprob, old, adv, mb.mask, cu,
                                               seq_index=mb.token_index[starts] // cfg.rollout.max_new_tokens, **common)
            else:
                per_tok, st = clipped_policy_loss(logprob, old, adv, mb.mask, dual_clip=a.dual_clip,
                                                  token_index=mb.token_index, backend=cfg.model.kernel_backend, **common)
            if a.tis != "off":
                per_tok = per_tok * tis_weights(old, mb.rollout_logprob, mb.mask, mb.seq_ids, level=a.tis, clip=a.tis_clip)
            kl = kl_penalty(logprob, mb.ref_logprob, a.kl_type) if self.ref_engine is not None else None
            total, metrics = policy_objective(per_tok, mb.mask, mb.seq_ids, a.loss_agg, norm, entropy=entropy,
                                              entropy_coef=a.entropy_coef, kl=kl, kl_coef=a.kl_coef)
        align = cos_sum = torch.zeros((), device=logprob.device)
        n_here = 0
        if n_align > 0 and anchor_h.shape[0] > 1:
            from kernels import hidden_align_loss

            n_here = _groups_with_pairs(mb.anchor_groups)
            if n_here:
                align_mean, cos = hidden_align_loss(anchor_h.float(), mb.anchor_groups)
                align = align_mean * (n_here / n_align)  # this micro-batch's share of the step's group mean
                total = total + a.hidden_align_coef * align
                cos_sum = cos.detach() * n_here
        masked = mb.mask.float()
        lp_d = logprob.detach().float()
        metrics.update({
            "hidden_align/loss": align.detach(), "hidden_align/cos_sum": cos_sum,
            "hidden_align/groups": torch.tensor(float(n_here)),
            "tokens": masked.sum(),
            "count/n_clip_low": st["n_clip_low"].float(), "count/n_clip_high": st["n_clip_high"].float(),
            "count/n_rescued": st["n_rescued"].float(),
            "entropy/sum": (entropy.detach().float() * masked).sum(),
            "kl_old/sum": ((old - lp_d) * masked).sum(),
            "mismatch/abs_sum": ((lp_d - mb.rollout_logprob).abs() * masked).sum(),
        })
        mism = logprob_mismatch_stats(lp_d, mb.rollout_logprob, mb.mask, mb.seq_ids)
        return total, metrics, mism["mismatch/max_abs_diff"]

    def _token_loss_fn(self, mb: MicroBatch, norm, on_policy: bool, common: dict):
        """The micro-batch's policy objective as a token-separable loss of (logprob, entropy) for
        kernels.fused_token_loss: per chunk of rows, sum_t w_t (l_t - c_H H_t + c_KL kl_t) with the aggregation
        as per-token weights w (losses.aggregation_weights). Same value and gradients as the unfused path;
        `sums` collects the metric sums (detached) across chunks."""
        from kernels import clipped_policy_loss

        from grpo_core.losses import aggregation_weights, kl_penalty

        a, backend = self.cfg.algorithm, self.cfg.model.kernel_backend
        weights = aggregation_weights(mb.mask, mb.seq_ids, a.loss_agg, norm)
        names = ("policy", "entropy", "kl", "n_clip_low", "n_clip_high", "n_rescued")
        sums = {k: torch.zeros((), dtype=torch.float32, device=mb.mask.device) for k in names}

        def weighted_sum(values, s, e):
            # where(), not multiplication, as losses.aggregate: non-finite values at masked tokens are dropped.
            return (torch.where(mb.mask[s:e], values.float(), 0.0) * weights[s:e]).sum()

        def loss_fn(logprob, entropy, s, e):
            old = logprob.detach() if on_policy else mb.old_logprob[s:e]
            per_tok, st = clipped_policy_loss(logprob, old, mb.advantages[s:e], mb.mask[s:e], dual_clip=a.dual_clip,
                                              token_index=mb.token_index[s:e], backend=backend, **common)
            policy, ent = weighted_sum(per_tok, s, e), weighted_sum(entropy, s, e)
            total = policy - a.entropy_coef * ent
            sums["policy"] += policy.detach()
            sums["entropy"] += ent.detach()
            if self.ref_engine is not None:
                kl = weighted_sum(kl_penalty(logprob, mb.ref_logprob[s:e], a.kl_type), s, e)
                total = total + a.kl_coef * kl
                sums["kl"] += kl.detach()
            for k in ("n_clip_low", "n_clip_high", "n_rescued"):
                sums[k] += st[k].float()
            return total

        return loss_fn, sums

    def _ratio_metrics(self, out: dict) -> dict:
        tokens = max(out.pop("tokens", 0.0), 1.0)
        res = {
            "clip/low_frac": out.pop("count/n_clip_low", 0.0) / tokens,
            "clip/high_frac": out.pop("count/n_clip_high", 0.0) / tokens,
            "nsr/rescue_frac": out.pop("count/n_rescued", 0.0) / tokens,
            "entropy/mean": out.pop("entropy/sum", 0.0) / tokens,
            "kl_old/approx": out.pop("kl_old/sum", 0.0) / tokens,
            "mismatch/mean_abs": out.pop("mismatch/abs_sum", 0.0) / tokens,
        }
        groups = out.pop("hidden_align/groups", 0.0)
        cos_sum = out.pop("hidden_align/cos_sum", 0.0)
        res["hidden_align/cos"] = cos_sum / groups if groups else float("nan")
        return res

    # ------------------------------------------------------------------------------------------ loop
    def evaluate(self) -> dict:
        """Held-out accuracy, greedy (`accuracy`, what the summary reports) and sampled at the rollout
        temperature (`accuracy_sampled`)."""
        from grpo_core.evaluate import evaluate_accuracy

        self.sync_rollout_weights()
        args = (self.rollout_engine, self.run.eval_set, self.run.verifier, self.cfg, self.dist)
        res = evaluate_accuracy(*args)
        sampled = evaluate_accuracy(*args, greedy=not self.cfg.trainer.eval_greedy)
        res[f"accuracy_{'sampled' if self.cfg.trainer.eval_greedy else 'greedy'}"] = sampled["accuracy"]
        self.rollout_engine.sleep()  # free the engine's weights (and vLLM's KV cache) for training
        return res

    def fit(self) -> dict:
        cfg = self.cfg
        if self.step == 0 and self.run.eval_set is not None:
            res = self.evaluate()
            self.eval_before = res["accuracy"]
            self.log.log(0, res, phase="eval")
            self.log.write(f"held-out accuracy before RL: {res['accuracy']:.3f} ({res['n']} prompts)")
        while self.step < cfg.trainer.max_steps:
            step = self.step + 1
            t_sync = self.sync_rollout_weights()
            groups, metrics = self.rollout(step)                # rollout + verify + reward (+ dynamic sampling)
            self.rollout_engine.sleep()                         # the engine frees its weights (+ KV cache) for the update
            self.assign_advantages(groups)                      # advantage (+ EDAS)
            metrics.update(self.update(groups, step))           # loss + optimizer steps
            metrics.update({"time/weight_sync_s": t_sync, "time/elapsed_s": time.time() - self.t0})
            if self.device.type == "cuda":
                metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.step = step
            self.log.log(step, metrics)
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < cfg.trainer.max_steps \
                    and self.run.eval_set is not None:
                self.log.log(step, self.evaluate(), phase="eval")
            if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0:
                self.save()
            if self._kill_after == step:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.finish()

    def finish(self) -> dict:
        summary = {"steps": self.step, "eval_accuracy_before_rl": self.eval_before}
        if self.run.eval_set is not None:
            res = self.evaluate()
            self.log.log(self.step, res, phase="eval")
            summary["eval_accuracy_after_rl"] = res["accuracy"]
            self.log.write(f"held-out accuracy after RL: {res['accuracy']:.3f} (before: {self.eval_before})")
        if not (self.out / "checkpoints" / f"step_{self.step:06d}").exists():
            self.save()
        summary.update(self.run.warm_start_summary)
        summary["wall_seconds"] = time.time() - self.t0
        summary["final_checkpoint"] = str(self.out / "checkpoints" / f"step_{self.step:06d}" / "hf")
        summary["provenance"] = self.provenance
        if self.dist.is_main:
            import json

            if self.cfg.logging.plot:
                from grpo_core.tracking import plot_curves

                plot_curves(self.out / "metrics.jsonl", self.out / "curves.png", title="grpo-core")
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        self.log.close()
        return summary

    # ------------------------------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict:
        return {"step": self.step, "opt_steps": self.opt_steps, "sampler": self.sampler.state_dict(),
                "dynamic_sampling": self.dyn.state_dict(), "eval_accuracy_before_rl": self.eval_before,
                "warm_start": self.run.warm_start_summary,
                "world_size": self.dist.world_size, "config": self.cfg.to_dict()}

    def save(self) -> None:
        from grpo_core.checkpoint import save_checkpoint

        state = self.trainer_state()
        save_checkpoint(self.out, self.step, engine=self.engine, trainer_state=state, rank=self.dist.rank,
                        export_hf=self._export_hf if self.cfg.checkpoint.export_hf else None,
                        keep_last=self.cfg.checkpoint.keep_last, crash_hook=getattr(self, "_crash_hook", None))

    def _export_hf(self, directory: Path) -> None:
        sd = self.gathered_state_dict()
        if self.dist.is_main:
            self.run.policy.save_pretrained(directory, state_dict=sd)
            self.tokenizer.save_pretrained(directory)

    def _maybe_resume(self, force: bool) -> None:
        from grpo_core.checkpoint import load_rng, load_trainer_state

        ckpt = self._resume_from
        if ckpt is None:
            return
        state = load_trainer_state(ckpt)
        diff = [d for d in config_diff(state["config"], self.cfg.to_dict())
                if not d.startswith(("trainer.max_steps", "checkpoint.", "logging."))]
        if diff and not force:
            raise SystemExit("refusing to resume from {}: the config differs:\n  {}\n(pass --force to resume anyway)"
                             .format(ckpt, "\n  ".join(diff)))
        self.engine.load_checkpoint(str(ckpt / "ds"), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        self.step, self.opt_steps = state["step"], state["opt_steps"]
        self.sampler.load_state_dict(state["sampler"])
        self.dyn.load_state_dict(state["dynamic_sampling"])
        self.eval_before = state.get("eval_accuracy_before_rl")
        self.run.warm_start_summary = state.get("warm_start", {})
        load_rng(ckpt, self.dist.rank)
        if self.dist.is_main:
            print(f"resumed from {ckpt} at step {self.step}", flush=True)


def _mix(*values: int) -> int:
    """A deterministic 63-bit mix of integers (seeds for a step's sampling and NSR streams)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _seq_starts(seq_ids: torch.Tensor) -> torch.Tensor:
    first = torch.ones_like(seq_ids, dtype=torch.bool)
    first[1:] = seq_ids[1:] != seq_ids[:-1]
    return first.nonzero().squeeze(1)


def _groups_with_pairs(group_ids: torch.Tensor) -> int:
    if group_ids.numel() == 0:
        return 0
    _, counts = torch.unique(group_ids, return_counts=True)
    return int((counts >= 2).sum())


def _rename(key: str) -> str:
    return {"actor/entropy": "loss/entropy_agg"}.get(key, key)


def train(cfg: Config, resume: str = "none", force: bool = False) -> dict:
    trainer = Trainer(cfg, resume=resume, force=force)
    return trainer.fit()

