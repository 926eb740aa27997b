"""pass@k / avg@k / maj@k, entropy metrics, approx KL, lengths and the metric accumulator (docs/algorithms.md §6)."""
import math
import os
import socket
from math import comb

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_core.metrics import (
    MetricAccumulator,
    approx_kl,
    avg_at_k,
    entropy_area_score,
    entropy_stats,
    maj_at_k,
    majority_answer,
    pass_at_k,
    pass_at_k_batch,
    response_length_stats,
)

T = torch.tensor
LN2 = math.log(2.0)


def test_pass_at_k_values():
    # 1 - C(7, 5) / C(10, 5) = 1 - 21 / 252 = 0.9166667
    assert pass_at_k(10, 3, 5) == pytest.approx(0.9166667, abs=1e-7)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c = 4 < k
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # large n: the product form agrees with exact big-integer binomials
    assert pass_at_k(200, 7, 50) == pytest.approx(1 - comb(193, 50) / comb(200, 50), rel=1e-12)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 2)


def test_pass_at_k_batch_matches_scalar():
    n = [10, 10, 10, 200, 16, 5]
    c = [3, 0, 6, 7, 16, 1]
    k = 5
    got = pass_at_k_batch(n, c, k)
    torch.testing.assert_close(got, T([pass_at_k(a, b, k) for a, b in zip(n, c)], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k_batch([4, 10], [0, 0], 5)


def test_avg_at_k():
    correct = [[True, False, True, True], [False, False, False, True]]
    # first 2 samples: prompt 0 -> 1/2, prompt 1 -> 0 -> mean 0.25; k = 4: (3/4 + 1/4) / 2 = 0.5
    assert avg_at_k(correct, 2) == pytest.approx(0.25)
    assert avg_at_k(T(correct), 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="fewer than k"):
        avg_at_k(correct, 5)


def test_maj_at_k_ties_and_none():
    # tie between "2" and "3" (two votes each): "3" occurs first -> wins
    assert majority_answer(["3", "2", "2", "3", None]) == 0
    # None never votes, even when it is the most frequent entry
    assert majority_answer([None, None, None, "7"]) == 3
    assert majority_answer([None, None]) is None
    answers = [["3", "2", "2", "3"], [None, None, "5", "4"], [None, None, None, None], ["1", "1", "9", "9"]]
    correct = [[False, True, True, False], [False, False, True, False], [False] * 4, [True, True, False, False]]
    # k = 4: prompt 0 majority "3" (tie, earliest) -> wrong; prompt 1 tie "5" vs "4" -> "5" correct;
    #        prompt 2 no answer -> 0; prompt 3 tie "1" vs "9" -> "1" correct  => 2 / 4
    assert maj_at_k(answers, correct, 4) == pytest.approx(0.5)
    # k = 3: prompt 0 "2" has two votes -> correct; prompt 1 "5" -> correct; prompt 3 "1" -> correct => 3 / 4
    assert maj_at_k(answers, correct, 3) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="rows"):
        maj_at_k(answers[:2], correct, 2)


def test_entropy_area_score_bits():
    # entropies ln2, 2 ln2, 0.5 ln2 nats = 1, 2, 0.5 bits; the masked 9.0 is ignored -> 3.5 bits
    h = T([[LN2, 2 * LN2, 0.5 * LN2, 9.0], [LN2, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = T([[True, True, True, False], [True, False, False, False]])
    torch.testing.assert_close(entropy_area_score(h, mask), T([3.5, 1.0], dtype=torch.float64))
    packed = entropy_area_score(h[mask], mask[mask], seq_ids=T([4, 4, 4, 9]))
    torch.testing.assert_close(packed, T([3.5, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="seq_ids"):
        entropy_area_score(h[mask], mask[mask])


def test_entropy_stats():
    ent = torch.arange(12, dtype=torch.float32)  # valid: 0..9, masked: 10, 11
    mask = torch.arange(12) < 10
    s = entropy_stats(ent, mask)
    # mean 4.5; top 20% of 10 valid tokens = {9, 8} -> 8.5
    assert s["entropy/mean"].item() == pytest.approx(4.5)
    assert s["entropy/top20_mean"].item() == pytest.approx(8.5)
    # top 25% of 10 = ceil(2.5) = 3 tokens {9, 8, 7} -> 8
    assert entropy_stats(ent, mask, top_frac=0.25)["entropy/top25_mean"].item() == pytest.approx(8.0)
    assert entropy_stats(ent, torch.zeros(12, dtype=torch.bool))["entropy/mean"].item() == 0.0


def test_approx_kl_and_lengths():
    lp = T([0.0, math.log(2.0), 5.0])
    old = T([0.0, 0.0, 0.0])
    # k3 with r = 1, 2: (0) and (2 - 1 - ln 2) = 0.3068528; third token masked -> mean 0.1534264
    assert approx_kl(lp, old, T([True, True, False])).item() == pytest.approx(0.1534264, abs=1e-6)
    s = response_length_stats([10, 20, 30, 40], truncated=[False, False, False, True])
    assert s["response_len/mean"].item() == 25.0
    assert s["response_len/std"].item() == pytest.approx(math.sqrt(125.0))
    assert (s["response_len/min"].item(), s["response_len/max"].item()) == (10.0, 40.0)
    assert s["response_len/truncated_frac"].item() == 0.25
    assert "response_len/truncated_frac" not in response_length_stats([3])
    with pytest.raises(ValueError, match="2 truncation flags for 1 lengths"):
        response_length_stats([3], truncated=[True, False])


def test_rollout_metrics_hand_values():
    from grpo_core.experience import Group, Response
    from grpo_core.metrics import rollout_metrics

    def resp(n, reward, correct, reason="stop"):
        return Response(group_index=0, sample_index=0, prompt_ids=[1], response_ids=[2] * n, rollout_logprobs=[0.0] * n,
                        finish_reason=reason, reward=reward, correct=correct)

    g1 = Group("a", "1", [resp(4, 1.0, True), resp(8, 0.0, False, "length")])
    g2 = Group("b", "2", [resp(2, 0.0, False), resp(2, 0.0, False)])
    m = rollout_metrics([g1, g2], kept=[g1])
    assert m["reward/mean"] == 0.25 and m["accuracy"] == 0.25
    assert m["response_len/mean"] == 4.0 and m["response_len/max"] == 8.0
    assert m["response_len/truncated_frac"] == 0.25
    assert m["groups/kept"] == 1.0 and m["groups/all_wrong_frac"] == 0.5 and m["groups/all_correct_frac"] == 0.0


def test_update_metrics_fractions_and_mismatch():
    from grpo_core.metrics import UpdateMetrics

    um = UpdateMetrics()
    mask = T([True, True, False, True])
    counts = {"count/n_tokens": T(3.0), "count/n_clip_low": T(1.0), "count/n_clip_high": T(0.0),
              "count/n_rescued": T(1.0), "count/n_dual_clip": T(0.0), "loss/policy": T(0.5),
              "hidden_align/cos_sum": T(1.6), "hidden_align/groups": T(2.0)}
    for _ in range(2):  # two optimizer steps over the same micro-batch
        um.add_objective(counts)
        um.add_tokens(T([-1.0, -2.0, 0.0, -1.0]), T([-1.0, -2.0, 0.0, -1.0 - math.log(2.0)]), T([1.0, 2.0, 9.0, 3.0]),
                      mask)
        um.optimizer_steps += 1
    um.add_mismatch(T([-1.0, -2.0, 5.0, -1.5]), T([-1.25, -2.0, 0.0, -1.0]), mask)  # once per rollout batch
    out = um.compute()
    assert out["loss/policy"] == pytest.approx(0.5)  # mean over the 2 optimizer steps of the summed shares
    assert out["clip/low_frac"] == pytest.approx(1 / 3) and out["nsr/rescue_frac"] == pytest.approx(1 / 3)
    assert out["entropy/mean"] == pytest.approx(2.0)  # masked 9.0 dropped
    # k3 of r = 2 on one of three tokens: (2 - 1 - ln 2) / 3
    assert out["kl_old/approx"] == pytest.approx((1 - math.log(2.0)) / 3)
    assert out["mismatch/mean_abs"] == pytest.approx(0.75 / 3) and out["mismatch/max_abs"] == pytest.approx(0.5)
    assert out["hidden_align/cos"] == pytest.approx(0.8)


def test_metric_accumulator_single_process():
    acc = MetricAccumulator()
    for i, (loss, ent, tokens) in enumerate([(0.25, 2.0, 10), (0.5, 4.0, 30)]):
        acc.add("loss/policy", T(loss), reduce="sum")
        acc.add("entropy/mean", T(ent), reduce="mean", weight=tokens)
        acc.add("len/max", T(float(i + 7)), reduce="max")
        acc.add("len/min", T(float(i + 7)), reduce="min")
        acc.add("plain", T(float(i)))
    out = acc.compute()
    # weighted mean (2 * 10 + 4 * 30) / 40 = 3.5; plain mean (0 + 1) / 2
    assert out == pytest.approx({"loss/policy": 0.75, "entropy/mean": 3.5, "len/max": 8.0, "len/min": 7.0,
                                 "plain": 0.5})
    assert acc.compute() == {}  # reset after compute
    acc.add("x", 1.0, reduce="sum")
    with pytest.raises(ValueError, match="reduce"):
        acc.add("x", 1.0, reduce="mean")
    with pytest.raises(ValueError, match="scalar"):
        acc.add("y", torch.ones(2))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _acc_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        acc = MetricAccumulator()
        for mb in range(2):
            acc.add("loss", T(0.1 * (rank + 1) + mb), reduce="sum")
            acc.add("ent", T(float(rank)), weight=T(float(rank + 1)))
            acc.add("top", T(float(10 * rank + mb)), reduce="max")
            acc.add("low", T(float(10 * rank + mb)), reduce="min")
        torch.save(acc.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_metric_accumulator_reduces_across_ranks(tmp_path):
    mp.spawn(_acc_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    # loss: rank 0: 0.1 + 1.1, rank 1: 0.2 + 1.2 -> 2.6; ent: (0 * 1 * 2 + 1 * 2 * 2) / (2 + 4) = 2/3
    expected = {"loss": 2.6, "ent": 2 / 3, "top": 11.0, "low": 0.0}
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(expected)
