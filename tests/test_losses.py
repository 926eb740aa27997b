"""Loss aggregation split invariance, KL terms, policy objective and TIS (spec 3)."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_core.losses import (
    AGG_MODES,
    LossNormalizer,
    aggregate,
    aggregation_weights,
    backward_scale,
    kl_penalty,
    logprob_mismatch_stats,
    policy_objective,
    tis_weights,
)

T = torch.tensor
GEN_MAX = 16


def _batch(seed=0, num_seqs=8, dim=5):
    """Packed batch of sequences with random lengths and some masked tokens; loss depends on a parameter."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, GEN_MAX + 1, (num_seqs,), generator=g)
    seq_ids = torch.arange(num_seqs).repeat_interleave(lengths)
    n = int(lengths.sum())
    mask = torch.rand(n, generator=g) < 0.8
    mask[torch.cumsum(lengths, 0) - 1] = True  # every sequence keeps at least one valid token
    mask[seq_ids == 2] = False  # ... except one, fully masked: it must count nowhere
    feats = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return lengths, seq_ids, mask, feats


def _loss_fn(weight, feats):
    return torch.tanh(feats @ weight) ** 2


@pytest.mark.parametrize("mode", AGG_MODES)
def test_split_invariance_one_vs_four_micro_batches(mode):
    lengths, seq_ids, mask, feats = _batch()
    weight = torch.randn(feats.shape[1], dtype=torch.float64, requires_grad=True)

    norm1 = LossNormalizer.from_step([mask], [seq_ids], GEN_MAX)
    loss1 = aggregate(_loss_fn(weight, feats), mask, seq_ids, mode, norm1)
    (grad1,) = torch.autograd.grad(loss1, weight)

    # four micro-batches of whole sequences (2 each), with local ids restarting at 0 in each
    bounds = torch.cumsum(lengths, 0).tolist()
    cuts = [0, bounds[1], bounds[3], bounds[5], bounds[7]]
    parts = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    local_ids = [seq_ids[p] - seq_ids[p][0] for p in parts]
    norm4 = LossNormalizer.from_step([mask[p] for p in parts], local_ids, GEN_MAX)
    assert (norm4.global_tokens, norm4.global_seqs) == (norm1.global_tokens, norm1.global_seqs) == (
        float(mask.sum()), 7.0)
    total, grad4 = 0.0, torch.zeros_like(weight)
    for p, ids in zip(parts, local_ids):
        loss = aggregate(_loss_fn(weight, feats[p]), mask[p], ids, mode, norm4)
        (g,) = torch.autograd.grad(loss, weight)
        total, grad4 = total + loss.detach(), grad4 + g
    torch.testing.assert_close(total, loss1.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad4, grad1, atol=1e-6, rtol=0)


def test_aggregate_values_match_formulas():
    # seq 0: losses [1, 2, (masked 100)], seq 1: [4], seq 2: [(masked nan)]
    loss = T([1.0, 2.0, 100.0, 4.0, float("nan")], dtype=torch.float64)
    mask = T([True, True, False, True, False])
    ids = T([0, 0, 0, 1, 2])
    norm = LossNormalizer.from_step([mask], [ids], gen_max_len=10)
    assert (norm.global_tokens, norm.global_seqs) == (3.0, 2.0)
    # token-mean: (1 + 2 + 4) / 3
    assert aggregate(loss, mask, ids, "token-mean", norm).item() == pytest.approx(7 / 3)
    # seq-mean-token-mean: ((1 + 2) / 2 + 4 / 1) / 2 = 2.75
    assert aggregate(loss, mask, ids, "seq-mean-token-mean", norm).item() == pytest.approx(2.75)
    # seq-sum-constant: ((1 + 2) / 10 + 4 / 10) / 2 = 0.35
    assert aggregate(loss, mask, ids, "seq-sum-constant", norm).item() == pytest.approx(0.35)
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate(loss, mask, ids, "sum", norm)
    with pytest.raises(ValueError, match="mask"):
        aggregate(loss, mask.long(), ids, "token-mean", norm)
    with pytest.raises(ValueError, match="gen_max_len"):
        LossNormalizer(1, 1, 0)
    assert backward_scale(4) == 4.0


def test_aggregation_weights_match_aggregate():
    """Hand values for the three modes, and sum(w * l) == aggregate(l) for random finite l."""
    mask = T([True, True, False, True, False])
    ids = T([0, 0, 0, 1, 2])
    norm = LossNormalizer.from_step([mask], [ids], gen_max_len=10)
    expected = {"token-mean": [1 / 3, 1 / 3, 0, 1 / 3, 0], "seq-mean-token-mean": [0.25, 0.25, 0, 0.5, 0],
                "seq-sum-constant": [0.05, 0.05, 0, 0.05, 0]}
    gen = torch.Generator().manual_seed(0)
    for mode, want in expected.items():
        w = aggregation_weights(mask, ids, mode, norm)
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.double(), T(want, dtype=torch.float64), atol=1e-7, rtol=0)
        loss = torch.randn(5, generator=gen)
        torch.testing.assert_close((w * loss).sum(), aggregate(loss, mask, ids, mode, norm), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregation_weights(mask, ids, "sum", norm)


def test_empty_step_gives_zero_loss():
    mask = torch.zeros(3, dtype=torch.bool)
    ids = T([0, 0, 1])
    norm = LossNormalizer.from_step([mask], [ids], GEN_MAX)
    for mode in AGG_MODES:
        assert aggregate(torch.ones(3), mask, ids, mode, norm).item() == 0.0


def test_kl_penalty_values():
    lp = torch.log(T([0.5, 0.5], dtype=torch.float64))
    ref = torch.log(T([0.25, 1.0], dtype=torch.float64))
    # k1 = log(pi / pi_ref): ln 2, ln 0.5
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), T([math.log(2), math.log(0.5)], dtype=torch.float64))
    # k3: x = ref - lp = -ln 2 -> 0.5 + ln 2 - 1 = 0.1931472; x = ln 2 -> 2 - ln 2 - 1 = 0.3068528
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), T([0.1931472, 0.3068528], dtype=torch.float64),
                               atol=1e-7, rtol=0)
    # x = 5: e^5 - 6 = 142.4 -> clamped to 10; x = 100 would overflow without the pre-clamp: gradient stays finite
    lp = T([0.0, -100.0], dtype=torch.float64, requires_grad=True)
    k3 = kl_penalty(lp, T([5.0, 0.0], dtype=torch.float64), "k3")
    assert k3.tolist() == [10.0, 10.0]
    k3.sum().backward()
    assert torch.isfinite(lp.grad).all()
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, lp, "k2")


def test_policy_objective_combines_terms():
    lengths, seq_ids, mask, feats = _batch(seed=1)
    w = torch.randn(feats.shape[1], dtype=torch.float64, requires_grad=True)
    pg, ent, kl = _loss_fn(w, feats), torch.sigmoid(feats @ w), 0.1 * (feats @ w) ** 2
    norm = LossNormalizer.from_step([mask], [seq_ids], GEN_MAX)
    mode = "seq-mean-token-mean"
    total, metrics = policy_objective(pg, mask, seq_ids, mode, norm, entropy=ent, entropy_coef=0.01,
                                      kl=kl, kl_coef=0.5)
    expected = (aggregate(pg, mask, seq_ids, mode, norm) - 0.01 * aggregate(ent, mask, seq_ids, mode, norm)
                + 0.5 * aggregate(kl, mask, seq_ids, mode, norm))
    torch.testing.assert_close(total, expected)
    assert total.requires_grad and all(not v.requires_grad and v.dim() == 0 for v in metrics.values())
    torch.testing.assert_close(metrics["loss/policy"] + metrics["loss/entropy_bonus"] + metrics["loss/kl"],
                               metrics["loss/total"])
    with pytest.raises(ValueError, match="entropy"):
        policy_objective(pg, mask, seq_ids, mode, norm, entropy_coef=0.01)


def test_tis_weights_token_and_sequence():
    old = T([0.5, 1.0, -1.0, 0.2, 0.3, 7.0], dtype=torch.float64)
    rollout = torch.zeros(6, dtype=torch.float64)
    mask = T([True, True, True, True, True, False])
    ids = T([0, 0, 0, 1, 1, 1])
    # token: min(exp(d), 2) = [e^0.5 = 1.6487213, e^1 -> 2, e^-1 = 0.3678794, e^0.2, e^0.3], masked -> 1
    tok = tis_weights(old, rollout, mask, ids, "token", clip=2.0)
    torch.testing.assert_close(tok, T([1.6487213, 2.0, 0.3678794, math.exp(0.2), math.exp(0.3), 1.0],
                                      dtype=torch.float64), atol=1e-7, rtol=0)
    # sequence: seq 0 sum 0.5 -> e^0.5; seq 1 sum 0.2 + 0.3 = 0.5 (masked 7.0 ignored) -> e^0.5
    seq = tis_weights(old, rollout, mask, ids, "sequence", clip=2.0)
    e = math.exp(0.5)
    torch.testing.assert_close(seq, T([e, e, e, e, e, 1.0], dtype=torch.float64))
    # a large sequence sum is truncated at C without overflow
    big = tis_weights(T([400.0, 400.0]), T([0.0, 0.0]), T([True, True]), T([0, 0]), "sequence", clip=3.0)
    assert big.tolist() == pytest.approx([3.0, 3.0])
    assert not tis_weights(old.requires_grad_(), rollout, mask, ids).requires_grad
    with pytest.raises(ValueError, match="level"):
        tis_weights(old, rollout, mask, ids, "batch")


def test_logprob_mismatch_stats():
    trainer = T([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    rollout = T([-1.1, -1.8, -0.5, 0.0], dtype=torch.float64)
    mask = T([True, True, True, False])
    ids = T([0, 0, 1, 1])
    s = logprob_mismatch_stats(trainer, rollout, mask, ids)
    # d = trainer - rollout = [0.1, -0.2, 0 | masked]; mean |d| = 0.3 / 3 = 0.1; max 0.2
    assert s["mismatch/mean_abs_diff"].item() == pytest.approx(0.1, abs=1e-6)
    assert s["mismatch/max_abs_diff"].item() == pytest.approx(0.2, abs=1e-6)
    # k3(d) = e^d - d - 1: 0.0051709, 0.0187308, 0; seq 0 mean 0.0119508, seq 1: 0 -> mean 0.0059754
    assert s["mismatch/kl_k3"].item() == pytest.approx(0.0059754, abs=1e-6)
    # k1 = rollout - trainer: seq 0 mean (-0.1 + 0.2) / 2 = 0.05, seq 1: 0 -> 0.025
    assert s["mismatch/kl_k1"].item() == pytest.approx(0.025, abs=1e-6)
    assert s["mismatch/num_tokens"].item() == 3 and s["mismatch/num_seqs"].item() == 2


# --- data parallel: real processes on gloo ---------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank, world, port, mode, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        lengths, seq_ids, mask, feats = _batch()
        torch.manual_seed(0)
        weight = torch.randn(feats.shape[1], dtype=torch.float64, requires_grad=True)
        # rank r holds sequences 4r .. 4r + 3, as two micro-batches of two sequences
        bounds = [0] + torch.cumsum(lengths, 0).tolist()
        mbs = [slice(bounds[4 * rank + 2 * j], bounds[4 * rank + 2 * j + 2]) for j in range(2)]
        norm = LossNormalizer.from_step([mask[p] for p in mbs], [seq_ids[p] for p in mbs], GEN_MAX)
        grad = torch.zeros_like(weight)
        for p in mbs:
            loss = aggregate(_loss_fn(weight, feats[p]), mask[p], seq_ids[p], mode, norm) * backward_scale(world)
            grad += torch.autograd.grad(loss, weight)[0]
        dist.all_reduce(grad)  # what DDP / ZeRO do: average over ranks
        grad /= world
        torch.save({"grad": grad, "tokens": norm.global_tokens, "seqs": norm.global_seqs},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_gradient_matches_single_process(tmp_path):
    mode = "seq-mean-token-mean"
    mp.spawn(_dp_worker, args=(2, _free_port(), mode, str(tmp_path)), nprocs=2, join=True)
    lengths, seq_ids, mask, feats = _batch()
    torch.manual_seed(0)
    weight = torch.randn(feats.shape[1], dtype=torch.float64, requires_grad=True)
    norm = LossNormalizer.from_step([mask], [seq_ids], GEN_MAX)
    (ref,) = torch.autograd.grad(aggregate(_loss_fn(weight, feats), mask, seq_ids, mode, norm), weight)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert (got["tokens"], got["seqs"]) == (norm.global_tokens, norm.global_seqs)
        torch.testing.assert_close(got["grad"], ref, atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    lengths, seq_ids, mask, feats = _batch()
    loss = _loss_fn(torch.randn(feats.shape[1], dtype=torch.float64), feats)
    for mode in AGG_MODES:
        ref = aggregate(loss, mask, seq_ids, mode, LossNormalizer.from_step([mask], [seq_ids], GEN_MAX))
        norm = LossNormalizer.from_step([mask.cuda()], [seq_ids.cuda()], GEN_MAX)
        got = aggregate(loss.cuda(), mask.cuda(), seq_ids.cuda(), mode, norm)
        torch.testing.assert_close(got.cpu(), ref)
    w = tis_weights(loss.cuda(), torch.zeros_like(loss).cuda(), mask.cuda(), seq_ids.cuda(), "sequence")
    torch.testing.assert_close(w.cpu(), tis_weights(loss, torch.zeros_like(loss), mask, seq_ids, "sequence"))
