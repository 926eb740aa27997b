"""DeepSpeed ZeRO stages 0/1/2/3 on one rank give the same update, and the generated DeepSpeed JSON scales its
bucket and persistence sizes to the model."""
import copy

import pytest
import torch

from grpo_core.config import ConfigError, deepspeed_config, effective_zero_stage, load_config

TINY = [
    "model.tiny_hidden_size=32", "model.tiny_num_layers=1", "model.tiny_num_heads=2", "model.tiny_num_kv_heads=1",
    "model.tiny_intermediate_size=64", "model.kernel_backend=torch",
    "data.synthetic_kinds=[arith]", "data.synthetic_level=1", "data.synthetic_train_size=64",
    "data.synthetic_eval_size=0", "data.prompt_template={prompt}\n",
    "rollout.group_size=4", "rollout.max_new_tokens=8", "trainer.train_batch_prompts=4", "trainer.mini_batches=2",
    "trainer.device=cpu", "trainer.lr=1e-2", "trainer.grad_clip=0.5", "logging.progress_bar=false",
    "logging.tensorboard=false", "logging.plot=false", "warm_start.steps=0", "algorithm.dynamic_sampling=false",
    "algorithm.nsr=scaled", "algorithm.kl_coef=0.05", "algorithm.hidden_align_coef=0.1",
    "deepspeed.one_rank_unpartitioned=false",
]


def _trainer(tmp_path, stage):
    from grpo_core.trainer import Trainer

    return Trainer(load_config(None, TINY + [f"deepspeed.zero_stage={stage}", f"trainer.output_dir={tmp_path}"]))


def _groups(trainer):
    groups, _ = trainer.rollout(1)
    for g in groups:  # mixed rewards and anchors, so every loss term acts
        for i, s in enumerate(g.samples):
            s.reward, s.correct = float(i % 2), bool(i % 2)
            s.anchor = len(s.response_ids) - 1 if s.correct else None
    trainer.assign_advantages(groups)
    return groups


def test_zero_stages_give_the_same_update_on_one_rank(tmp_path):
    """Two rollout batches x two mini-batches (off-policy second step, clipping, NSR, KL to a reference,
    Hidden-Align, grad clipping) under each stage: same weights and metrics as stage 0."""
    results = {}
    groups = None
    for stage in (0, 1, 2, 3):
        trainer = _trainer(tmp_path / f"s{stage}", stage)
        assert trainer.zero_stage == stage
        if groups is None:
            groups, start = _groups(trainer), trainer.gathered_state_dict()
        metrics = [trainer.update(copy.deepcopy(groups), step) for step in (1, 2)]
        results[stage] = (trainer.gathered_state_dict(), metrics)
    base_w, base_m = results[0]
    assert max((base_w[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the updates did something
    for stage in (1, 2, 3):
        w, m = results[stage]
        for k in base_w:  # the project's cross-layout tolerance (2 ranks vs 1): Adam amplifies rounding in
            # near-zero gradient entries to lr-sized steps, so bit equality across flat/partitioned buffers is moot
            torch.testing.assert_close(w[k], base_w[k], atol=1e-5, rtol=0, msg=lambda e, s=stage, k=k: f"stage {s}, {k}: {e}")
        for a, b in zip(m, base_m):
            assert "grad_norm" in a and "grad_norm" in b and set(a) == set(b)
            for k in a:  # every metric (losses, KL, Hidden-Align, clip fractions, grad norm), timings aside
                if not k.startswith("time/"):
                    assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6, nan_ok=True), (stage, k)


def test_one_rank_runs_unpartitioned_by_default():
    cfg = load_config(None, ["deepspeed.zero_stage=3"])
    assert effective_zero_stage(cfg, world_size=1) == 0
    assert effective_zero_stage(cfg, world_size=2) == 3
    assert effective_zero_stage(load_config(None, ["deepspeed.offload_optimizer=true"]), world_size=1) == 3
    assert effective_zero_stage(load_config(None, ["deepspeed.one_rank_unpartitioned=false"]), world_size=1) == 3


def test_deepspeed_sizes_scale_with_the_model():
    cfg = load_config(None)
    zero = deepspeed_config(cfg, world_size=8, use_cuda=True, hidden_size=4096)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_param_persistence_threshold"] == 40960  # norms and biases stay whole
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 ** 2)
    assert zero["reduce_bucket_size"] == 4096 ** 2
    small = deepspeed_config(cfg, world_size=8, use_cuda=True, hidden_size=64)["zero_optimization"]
    assert small["stage3_param_persistence_threshold"] == 640 and small["reduce_bucket_size"] == 64 ** 2
    fixed = load_config(None, ["deepspeed.param_persistence_threshold=0", "deepspeed.reduce_bucket_size=123"])
    zero = deepspeed_config(fixed, world_size=2, use_cuda=False, hidden_size=4096)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0 and zero["reduce_bucket_size"] == 123
    two = deepspeed_config(load_config(None, ["deepspeed.zero_stage=2"]), world_size=2, use_cuda=False,
                           hidden_size=256)["zero_optimization"]
    assert two["stage"] == 2 and two["allgather_bucket_size"] == 256 ** 2
    assert not any(k.startswith("stage3_") for k in two)
    assert deepspeed_config(cfg, world_size=1, use_cuda=False)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("override,key", [
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["deepspeed.reduce_bucket_size=-2"], "deepspeed.reduce_bucket_size"),
    (["deepspeed.zero_stage=2", "deepspeed.offload_param=true"], "deepspeed.offload_param"),
    (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer"),
])
def test_bad_deepspeed_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, override)
