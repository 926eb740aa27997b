"""Loss aggregation split invariance, KL terms, policy objective and TIS (docs/algorithms.md §3)."""
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


def _objective_batch(seed=3):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    lengths = [3, 5, 1, 4]
    n = sum(lengths)
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    cu = torch.tensor([0, 3, 8, 9, 13])
    mask = torch.rand(n, generator=g) > 0.2
    old = -torch.rand(n, generator=g) * 2
    adv_seq = torch.randn(len(lengths), generator=g)
    mb = SimpleNamespace(mask=mask, seq_ids=seq_ids, advantages=adv_seq[seq_ids], old_logprob=old,
                         rollout_logprob=old + 0.01, ref_logprob=old - 0.1, token_index=torch.arange(n) + 100,
                         seq_index=torch.arange(len(lengths)) + 7, response_cu=cu,
                         anchor_groups=torch.zeros(0, dtype=torch.long))
    logprob = (old + 0.3 * torch.randn(n, generator=g)).requires_grad_()
    entropy = torch.rand(n, generator=g).requires_grad_()
    return mb, logprob, entropy


def _algo(**kw):
    from grpo_core.config import AlgorithmConfig

    a = AlgorithmConfig(**kw)
    a.validate("algorithm")
    return a


@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_objective_is_the_formula(mode):
    """PolicyObjective = agg(l) - c_H agg(H) + c_KL agg(kl) with l from grpo_kernels.clipped_policy_loss (NSR on)."""
    from grpo_kernels import clipped_policy_loss

    from grpo_core.losses import PolicyObjective

    mb, logprob, entropy = _objective_batch()
    norm = LossNormalizer.from_step([mb.mask], [mb.seq_ids], GEN_MAX)
    a = _algo(loss_agg=mode, entropy_coef=0.01, kl_coef=0.5, nsr="scaled")
    obj = PolicyObjective(a, seed=5, step=2, backend="torch", with_kl=True)
    total, metrics = obj(mb, norm, logprob, entropy, on_policy=False)
    per_tok, st = clipped_policy_loss(logprob, mb.old_logprob, mb.advantages, mb.mask, eps_low=a.eps_low,
                                      eps_high=a.eps_high, nsr="scaled", seed=5, step=2, token_index=mb.token_index)
    expected = (aggregate(per_tok, mb.mask, mb.seq_ids, mode, norm)
                - 0.01 * aggregate(entropy, mb.mask, mb.seq_ids, mode, norm)
                + 0.5 * aggregate(kl_penalty(logprob, mb.ref_logprob, "k3"), mb.mask, mb.seq_ids, mode, norm))
    torch.testing.assert_close(total, expected)
    g_obj = torch.autograd.grad(total, [logprob, entropy])
    g_exp = torch.autograd.grad(expected, [logprob, entropy])
    for x, y in zip(g_obj, g_exp):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(metrics["loss/policy"] + metrics["loss/entropy_bonus"] + metrics["loss/kl"],
                               metrics["loss/total"])
    assert metrics["count/n_tokens"].item() == mb.mask.sum().item() == st["n_tokens"].item()
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_policy_objective_fused_chunks_equal_whole():
    """The fused LM head calls token_loss_fn chunk by chunk: same total and same metrics as one call."""
    from grpo_core.losses import PolicyObjective

    mb, logprob, entropy = _objective_batch(seed=4)
    norm = LossNormalizer.from_step([mb.mask], [mb.seq_ids], GEN_MAX)
    a = _algo(loss_agg="seq-mean-token-mean", entropy_coef=0.02, kl_coef=0.1, nsr="band", dual_clip=3.0)
    whole, m_whole = PolicyObjective(a, seed=1, step=0, with_kl=True)(mb, norm, logprob, entropy, on_policy=False)
    obj = PolicyObjective(a, seed=1, step=0, with_kl=True)
    fn = obj.token_loss_fn(mb, norm, on_policy=False)
    chunked = sum(fn(logprob[s:e], entropy[s:e], s, e) for s, e in ((0, 5), (5, 6), (6, 13)))
    total, m_chunks = obj.finish(chunked, None, 0)
    torch.testing.assert_close(total, whole)
    assert m_chunks.keys() == m_whole.keys()
    for k in m_whole:
        torch.testing.assert_close(m_chunks[k], m_whole[k])


def test_policy_objective_coupled_losses():
    """GSPO / FIPO / TIS run on the whole micro-batch; the fused path refuses them with a clear error."""
    from grpo_kernels import gspo_policy_loss

    from grpo_core.losses import PolicyObjective

    mb, logprob, entropy = _objective_batch(seed=5)
    norm = LossNormalizer.from_step([mb.mask], [mb.seq_ids], GEN_MAX)
    a = _algo(policy_loss="gspo", eps_low=3e-4, eps_high=4e-4, loss_agg="seq-mean-token-mean", tis="sequence")
    obj = PolicyObjective(a, seed=9, step=1)
    total, _ = obj(mb, norm, logprob, entropy, on_policy=False)
    per_tok, _ = gspo_policy_loss(logprob, mb.old_logprob, mb.advantages, mb.mask, mb.response_cu, eps_low=3e-4,
                                  eps_high=4e-4, nsr=a.nsr, seed=9, step=1, seq_index=mb.seq_index)
    w = tis_weights(mb.old_logprob, mb.rollout_logprob, mb.mask, mb.seq_ids, "sequence", a.tis_clip)
    torch.testing.assert_close(total, aggregate(per_tok * w, mb.mask, mb.seq_ids, "seq-mean-token-mean", norm))
    with pytest.raises(ValueError, match="token-separable"):
        obj.token_loss_fn(mb, norm, on_policy=False)


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


# --- peer-parity table: the whole objective against the papers' formulas in plain Python float64 ------------------

PARITY = [  # (advantage, std_unbiased, loss_agg, policy_loss, eps_low, eps_high, dual_clip, kl_type, entropy_coef)
    ("grpo", True, "token-mean", "ppo", 0.2, 0.28, None, None, 0.0),  # DAPO (verl/TRL defaults)
    ("grpo", False, "seq-mean-token-mean", "ppo", 0.2, 0.2, None, "k3", 0.0),  # GRPO original, k3 KL
    ("grpo", True, "seq-mean-token-mean", "ppo", 0.2, 0.28, 3.0, "k1", 0.01),  # dual clip, k1, entropy bonus
    ("drgrpo", True, "seq-sum-constant", "ppo", 0.2, 0.2, None, None, 0.0),  # Dr. GRPO
    ("rloo", True, "token-mean", "ppo", 0.1, 0.1, None, None, 0.001),  # RLOO
    ("grpo", True, "seq-mean-token-mean", "gspo", 3e-4, 4e-4, None, None, 0.0),  # GSPO
]


def _formula_loss(case, rewards, groups, lp, old, ref, ent, lengths, gen_max):
    """Straight from docs/algorithms.md §1 and §3, one Python loop per quantity (no torch)."""
    est, unbiased, agg, kind, el, eh, dual, kl_type, c_h = case
    adv = []
    for i, r in enumerate(rewards):
        grp = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        g, mean = len(grp), sum(grp) / len(grp)
        if est == "grpo":
            var = sum((x - mean) ** 2 for x in grp) / ((g - 1) if unbiased else g)
            adv.append((r - mean) / (math.sqrt(var) + 1e-6))
        elif est == "drgrpo":
            adv.append(r - mean)
        else:
            adv.append(r - (sum(grp) - r) / (g - 1))
    per_seq, start = [], 0
    for i, n in enumerate(lengths):
        toks = range(start, start + n)
        start += n
        if kind == "gspo":
            s = math.exp(sum(lp[t] - old[t] for t in toks) / n)
            ratios = [s] * n
        else:
            ratios = [math.exp(lp[t] - old[t]) for t in toks]
        terms = []
        for t, r in zip(toks, ratios):
            a = adv[i]
            loss = -min(r * a, min(max(r, 1 - el), 1 + eh) * a)
            if dual is not None and a < 0:
                loss = min(loss, -dual * a)
            if kl_type == "k1":
                loss += 0.05 * (lp[t] - ref[t])
            elif kl_type == "k3":
                d = ref[t] - lp[t]
                loss += 0.05 * min(max(math.exp(d) - d - 1, -10.0), 10.0)
            terms.append(loss - c_h * ent[t])
        per_seq.append(terms)
    if agg == "token-mean":
        return sum(sum(x) for x in per_seq) / sum(lengths)
    if agg == "seq-mean-token-mean":
        return sum(sum(x) / len(x) for x in per_seq) / len(per_seq)
    return sum(sum(x) / gen_max for x in per_seq) / len(per_seq)


@pytest.mark.parametrize("case", PARITY, ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[7]}" for c in PARITY])
def test_peer_parity_table(case):
    from types import SimpleNamespace

    from grpo_core.advantages import compute_advantages
    from grpo_core.losses import PolicyObjective

    est, unbiased, agg, kind, el, eh, dual, kl_type, c_h = case
    rnd = torch.Generator().manual_seed(11)
    rewards, groups, lengths = [1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0], [0, 0, 0, 0, 1, 1, 1], [3, 1, 4, 2, 5, 2, 3]
    n = sum(lengths)
    old = (-torch.rand(n, generator=rnd, dtype=torch.float64) * 2).tolist()
    spread = 3e-4 if kind == "gspo" else 0.3  # GSPO's clip range is ~1e-4 wide: keep some sequences inside it
    lp = [o + spread * x for o, x in zip(old, torch.randn(n, generator=rnd, dtype=torch.float64).tolist())]
    ref = [o - 0.2 * x for o, x in zip(old, torch.rand(n, generator=rnd, dtype=torch.float64).tolist())]
    ent = torch.rand(n, generator=rnd, dtype=torch.float64).tolist()
    want = _formula_loss(case, rewards, groups, lp, old, ref, ent, lengths, GEN_MAX)

    adv = compute_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), est,
                             std_unbiased=unbiased)
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    cu = torch.tensor([0] + lengths).cumsum(0)
    mb = SimpleNamespace(mask=torch.ones(n, dtype=torch.bool), seq_ids=seq_ids, advantages=adv[seq_ids],
                         old_logprob=torch.tensor(old, dtype=torch.float64), rollout_logprob=None,
                         ref_logprob=torch.tensor(ref, dtype=torch.float64), token_index=torch.arange(n),
                         seq_index=torch.arange(len(lengths)), response_cu=cu, anchor_groups=torch.zeros(0).long())
    from grpo_core.config import AlgorithmConfig

    algo = AlgorithmConfig(advantage=est, adv_std_unbiased=unbiased, loss_agg=agg, policy_loss=kind, eps_low=el,
                           eps_high=eh, dual_clip=dual, nsr="off", kl_type=kl_type or "k3",
                           kl_coef=0.05 if kl_type else 0.0, entropy_coef=c_h)
    norm = LossNormalizer.from_step([mb.mask], [seq_ids], GEN_MAX)
    obj = PolicyObjective(algo, seed=0, step=0, backend="torch", with_kl=kl_type is not None)
    got, _ = obj(mb, norm, torch.tensor(lp, dtype=torch.float64), torch.tensor(ent, dtype=torch.float64),
                 on_policy=False)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)  # float32 kernel math vs float64 formulas
