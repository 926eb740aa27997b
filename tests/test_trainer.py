"""The trainer on CPU: micro-batch invariance of the update, the non-finite step guard, rollout/trainer
logprob parity, dynamic sampling bounds, and a short end-to-end run whose reward goes up."""
import copy
import json
import math

import pytest
import torch

from grpo_core.config import load_config

TINY = [
    "model.tiny_hidden_size=32", "model.tiny_num_layers=1", "model.tiny_num_heads=2", "model.tiny_num_kv_heads=1",
    "model.tiny_intermediate_size=64", "model.kernel_backend=torch",
    "data.synthetic_kinds=[arith]", "data.synthetic_level=1", "data.synthetic_train_size=200",
    "data.synthetic_eval_size=20", "data.prompt_template={prompt}\n",
    "rollout.group_size=4", "rollout.max_new_tokens=12", "trainer.train_batch_prompts=4",
    "trainer.device=cpu", "trainer.lr=1e-3", "logging.progress_bar=false", "logging.tensorboard=false",
    "logging.plot=false", "warm_start.steps=0", "algorithm.dynamic_sampling=false",
]


def make_trainer(tmp_path, *extra):
    from grpo_core.trainer import Trainer

    cfg = load_config(None, TINY + [f"trainer.output_dir={tmp_path}"] + list(extra))
    return Trainer(cfg)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.gathered_state_dict().items()}


def fake_groups(trainer, step=1):
    """A rollout batch with mixed rewards, so every group carries signal."""
    groups, _ = trainer.rollout(step)
    for g in groups:
        for i, s in enumerate(g.samples):
            s.reward = float(i % 2)
            s.correct = bool(i % 2)
    trainer.assign_advantages(groups)
    return groups


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-sum-constant"])
def test_update_invariant_to_micro_batching(tmp_path, agg):
    """One micro-batch vs one per group give the same update to 1e-6. AdamW with a large eps makes the
    update proportional to the gradient, so this compares accumulated gradients, not Adam's sign noise on
    near-zero entries."""
    common = [f"algorithm.loss_agg={agg}", "algorithm.nsr=scaled", "trainer.ppo_epochs=2",
              "algorithm.hidden_align_coef=0.1", "trainer.adam_eps=1.0", "trainer.lr=0.5", "trainer.grad_clip=0"]
    big = make_trainer(tmp_path / "big", "trainer.max_tokens_per_micro_batch=100000", *common)
    groups = fake_groups(big)
    for g in groups:  # anchors on the correct samples so Hidden-Align contributes
        for s in g.samples:
            s.anchor = len(s.response_ids) - 1 if s.correct else None
    before = weights(big)
    big.update(copy.deepcopy(groups), step=1)
    w_big = weights(big)

    budget = max(g.num_tokens for g in groups)  # whole groups (Hidden-Align pairs), one per micro-batch
    small = make_trainer(tmp_path / "small", f"trainer.max_tokens_per_micro_batch={budget}", *common)
    assert all(torch.equal(before[k], v) for k, v in weights(small).items())
    n_mbs = len(small._rank_micro_batches(groups))
    assert n_mbs >= 4, n_mbs
    small.update(copy.deepcopy(groups), step=1)
    w_small = weights(small)
    moved = max((w_big[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-4  # the update did something
    for k in w_big:
        torch.testing.assert_close(w_small[k], w_big[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("agg,kl", [("token-mean", 0.0), ("seq-mean-token-mean", 0.05)], ids=["token-mean", "seq-kl"])
def test_fused_lm_head_loss_matches_unfused(tmp_path, agg, kl):
    """model.fused_lm_head_loss (the loss made inside the LM head's forward, 3 GEMMs) gives the same update
    and the same metrics as the unfused path: NSR, entropy bonus, KL, Hidden-Align, 2 epochs (off-policy)."""
    common = [f"algorithm.loss_agg={agg}", "algorithm.nsr=scaled", "trainer.ppo_epochs=2", "algorithm.entropy_coef=0.01",
              f"algorithm.kl_coef={kl}", "algorithm.hidden_align_coef=0.1", "trainer.adam_eps=1.0", "trainer.lr=0.5",
              "trainer.grad_clip=0", "trainer.max_tokens_per_micro_batch=100"]
    plain = make_trainer(tmp_path / "plain", *common)
    groups = fake_groups(plain)
    for g in groups:
        for s in g.samples:
            s.anchor = len(s.response_ids) - 1 if s.correct else None
    before = weights(plain)
    m_plain = plain.update(copy.deepcopy(groups), step=1)
    fused = make_trainer(tmp_path / "fused", "model.fused_lm_head_loss=true", *common)
    m_fused = fused.update(copy.deepcopy(groups), step=1)
    w_plain, w_fused = weights(plain), weights(fused)
    assert max((w_plain[k] - before[k]).abs().max().item() for k in before) > 1e-4
    for k in w_plain:
        torch.testing.assert_close(w_fused[k], w_plain[k], atol=1e-6, rtol=0)
    for key, value in m_plain.items():
        if isinstance(value, float) and not math.isnan(value) and not key.startswith("time/"):
            assert math.isclose(m_fused[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, m_fused[key], value)


def test_fused_lm_head_loss_refuses_coupled_losses():
    from grpo_core.config import ConfigError

    with pytest.raises(ConfigError, match="model.fused_lm_head_loss.*policy_loss=gspo"):
        load_config(None, ["model.fused_lm_head_loss=true", "algorithm.policy_loss=gspo"])
    with pytest.raises(ConfigError, match="algorithm.tis"):
        load_config(None, ["model.fused_lm_head_loss=true", "algorithm.tis=token"])


def test_non_finite_loss_skips_step(tmp_path):
    trainer = make_trainer(tmp_path)
    groups = fake_groups(trainer)
    groups[0].samples[0].advantage = float("nan")
    before = weights(trainer)
    out = trainer.update(groups, step=1)
    assert out["train/skipped_steps"] == 1.0
    for k, v in weights(trainer).items():
        assert torch.equal(v, before[k]), k
    # the next, finite step trains normally
    out = trainer.update(fake_groups(trainer, step=2), step=2)
    assert out["train/skipped_steps"] == 0.0
    assert any(not torch.equal(v, before[k]) for k, v in weights(trainer).items())


def test_rollout_logprobs_match_trainer(tmp_path):
    """On-policy in fp32, the engine's sampling logprobs equal the trainer's recomputed ones."""
    trainer = make_trainer(tmp_path, "rollout.temperature=0.7")
    trainer.sync_rollout_weights()
    out = trainer.update(fake_groups(trainer), step=1)
    assert out["mismatch/mean_abs"] < 1e-4, out["mismatch/mean_abs"]
    assert out["mismatch/max_abs"] < 1e-3


def test_mismatch_metric_uses_pre_update_logprobs(tmp_path):
    """The rollout/trainer mismatch compares the rollout engine's logprobs with the trainer's *old*
    (pre-update) logprobs once per rollout batch: with 2 mini-batches and 2 epochs, step 1's mismatch does
    not depend on the learning rate (the policy's own update is not a mismatch)."""
    out = {}
    for lr in ("1e-12", "5e-3"):
        trainer = make_trainer(tmp_path / lr, f"trainer.lr={lr}", "trainer.mini_batches=2", "trainer.ppo_epochs=2",
                               "rollout.temperature=0.7")
        trainer.sync_rollout_weights()
        before = weights(trainer)
        out[lr] = trainer.update(fake_groups(trainer), step=1)
        moved = max((v - before[k]).abs().max().item() for k, v in weights(trainer).items())
        assert (moved > 1e-4) == (lr == "5e-3"), (lr, moved)
    for key in ("mismatch/mean_abs", "mismatch/max_abs"):
        assert out["1e-12"][key] == out["5e-3"][key], key
    assert out["5e-3"]["mismatch/max_abs"] < 1e-3  # fp32, same weights: engine and trainer agree


def test_dynamic_sampling_bound(tmp_path):
    """An untrained model earns no reward: every group is uninformative, the bound stops generation."""
    trainer = make_trainer(tmp_path, "algorithm.dynamic_sampling=true", "algorithm.max_gen_batches=2")
    groups, metrics = trainer.rollout(1)
    assert metrics["dynamic_sampling/rounds"] <= 2
    assert all(g.informative for g in groups)
    if metrics["dynamic_sampling/bound_hit"]:
        assert len(groups) < 4


def test_lr_schedule():
    from grpo_core.trainer import lr_at

    cfg = load_config(None, ["trainer.lr=1.0", "trainer.warmup_steps=4", "trainer.lr_schedule=cosine",
                             "trainer.max_steps=14", "trainer.min_lr_ratio=0.1"])
    assert lr_at(cfg, 0) == pytest.approx(0.25)
    assert lr_at(cfg, 3) == pytest.approx(1.0)
    assert lr_at(cfg, 4) == pytest.approx(1.0)
    assert lr_at(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 14) == pytest.approx(0.1)


def test_end_to_end_reward_goes_up(tmp_path):
    """The CPU demo recipe, shortened (smaller data, 30 RL steps, ~1 min): from its supervised warm start,
    RL raises the mean train reward and the held-out greedy accuracy. Seeded, so it is the same every run."""
    from pathlib import Path

    from grpo_core.trainer import train

    recipe = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
    cfg = load_config(recipe, [
        f"trainer.output_dir={tmp_path}", "trainer.max_steps=30", "trainer.eval_every=0",
        "trainer.eval_max_prompts=100", "data.synthetic_train_size=1000", "data.synthetic_eval_size=100",
        "model.kernel_backend=torch", "logging.progress_bar=false", "checkpoint.keep_last=1",
    ])
    summary = train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if r["phase"] == "train"]
    assert len(train_rows) == 30
    first = sum(r["reward/mean"] for r in train_rows[:10]) / 10
    last = sum(r["reward/mean"] for r in train_rows[-10:]) / 10
    assert last > first, (first, last)
    assert summary["eval_accuracy_after_rl"] > summary["eval_accuracy_before_rl"], summary
    for key in ("step", "reward/mean", "accuracy", "entropy/mean", "clip/high_frac", "nsr/rescue_frac",
                "hidden_align/cos", "response_len/mean"):
        assert key in train_rows[-1], key
    evals = [r for r in rows if r["phase"] == "eval"]
    assert len(evals) == 2 and all("accuracy_sampled" in r for r in evals)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("eval_accuracy_before_rl", "eval_accuracy_after_rl", "wall_seconds"):
        assert key in on_disk
    assert (tmp_path / "curves.png").exists() and list((tmp_path / "tb").iterdir())
    hf = tmp_path / "checkpoints" / "step_000030" / "hf"
    assert (hf / "config.json").exists() and list(hf.glob("*.safetensors"))
