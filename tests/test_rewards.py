"""Reward shaping (docs/algorithms.md §2) and TTRL majority vote, against hand-computed values."""
import pytest
import torch

from grpo_core.rewards import (
    RewardSettings,
    compute_reward_components,
    compute_rewards,
    correctness_reward,
    correctness_rewards,
    format_reward,
    format_rewards,
    majority_fraction,
    majority_vote_labels,
    overlong_penalty,
)


def test_correctness_scalar_and_vectorised():
    assert correctness_reward(True) == 1.0
    assert correctness_reward(False) == 0.0
    assert correctness_reward(False, correct_value=2.0, incorrect_value=-1.0) == -1.0
    out = correctness_rewards([True, False, True], incorrect_value=-1.0)
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, -1.0, 1.0]
    out = correctness_rewards(torch.tensor([False, True]), correct_value=0.5)
    assert out.tolist() == [0.0, 0.5]


def test_overlong_penalty_boundaries():
    # L_max = 20, L_cache = 8: threshold 12; ramp (12 - L) / 8 on (12, 20]; -1 beyond 20.
    lengths = torch.tensor([0, 11, 12, 13, 16, 19, 20, 21, 100])
    expected = [0.0, 0.0, 0.0, -1 / 8, -4 / 8, -7 / 8, -1.0, -1.0, -1.0]
    out = overlong_penalty(lengths, max_len=20, cache_len=8)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx(expected, abs=1e-7)
    # Lists work too; the value is continuous at L_max (ramp reaches exactly -1).
    assert overlong_penalty([20], 20, 8).item() == -1.0


def test_overlong_penalty_rejects_bad_args():
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty([1], max_len=8, cache_len=8)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty([1], max_len=8, cache_len=0)
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty([1], max_len=0, cache_len=0)
    with pytest.raises(ValueError, match="integer"):
        overlong_penalty(torch.tensor([1.5]), max_len=8, cache_len=2)
    with pytest.raises(ValueError, match=">= 0"):
        overlong_penalty([-1], max_len=8, cache_len=2)
    with pytest.raises(ValueError, match="overlong_cache_len"):
        RewardSettings(overlong_enabled=True, overlong_max_len=10, overlong_cache_len=12)
    RewardSettings(overlong_enabled=False, overlong_max_len=10, overlong_cache_len=12)  # unused: no check


def test_format_reward():
    assert format_reward(None, 0.1) == 0.0
    assert format_reward("42", 0.1) == pytest.approx(0.1)
    assert format_rewards(["1", None, ""], 0.5).tolist() == [0.5, 0.0, 0.5]


def test_majority_vote_ties_none_and_groups():
    answers = ["3", "4", "4", "3",  # group a: tie 2-2 -> "3" occurs first
               None, "7", None, None,  # group b: None never wins -> "7"
               None, None,  # group c: all None -> None
               "1", "2", "2"]  # group d, interleaved below
    groups = ["a", "a", "a", "a", "b", "b", "b", "b", "c", "c", "d", "d", "d"]
    assert majority_vote_labels(answers, groups) == ["3"] * 4 + ["7"] * 4 + [None] * 2 + ["2"] * 3
    fractions = majority_fraction(answers, groups)
    assert fractions == pytest.approx([0.5] * 4 + [0.25] * 4 + [0.0] * 2 + [2 / 3] * 3)
    # Groups need not be contiguous: the same votes shuffled give the same labels per response.
    order = [12, 1, 5, 10, 3, 8, 0, 4, 11, 2, 9, 6, 7]
    labels = majority_vote_labels([answers[i] for i in order], [groups[i] for i in order])
    by_index = dict(zip(order, labels))
    assert by_index[0] == "4"  # group a is still a 2-2 tie, but now "4" (index 1) is seen first
    assert by_index[12] == "2" and by_index[5] == "7" and by_index[8] is None
    with pytest.raises(ValueError, match="group ids"):
        majority_vote_labels(["1"], ["a", "b"])


def test_compute_rewards_combines_terms():
    settings = RewardSettings(correct_value=1.0, incorrect_value=-1.0, format_value=0.25,
                              overlong_enabled=True, overlong_max_len=10, overlong_cache_len=4)
    correct = [True, False, False, True]
    extracted = ["5", "6", None, "5"]
    lengths = torch.tensor([3, 8, 12, 10])  # threshold 6: 0, -0.5, -1, -1
    parts = compute_reward_components(correct, extracted, lengths, settings)
    assert parts["correctness"].tolist() == [1.0, -1.0, -1.0, 1.0]
    assert parts["format"].tolist() == [0.25, 0.25, 0.0, 0.25]
    assert parts["overlong"].tolist() == [0.0, -0.5, -1.0, -1.0]
    total = compute_rewards(correct, extracted, lengths, settings)
    assert total.dtype == torch.float32 and total.shape == (4,)
    assert total.tolist() == [1.25, -1.25, -2.0, 0.25]
    # Overlong off: lengths do not matter.
    plain = compute_rewards(correct, extracted, [100, 100, 100, 100], RewardSettings())
    assert plain.tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="one entry per response"):
        compute_rewards([True], ["1", "2"], [1], settings)


def test_settings_from_config():
    class FakeRewardConfig:
        correct, incorrect, format_reward, overlong_shaping, overlong_cache_len = 1.0, -0.5, 0.1, True, 16

    s = RewardSettings.from_config(FakeRewardConfig, max_new_tokens=64)
    assert (s.correct_value, s.incorrect_value, s.format_value) == (1.0, -0.5, 0.1)
    assert (s.overlong_enabled, s.overlong_max_len, s.overlong_cache_len) == (True, 64, 16)


def test_ttrl_rewards_with_project_verifier():
    verify_mod = pytest.importorskip("grpo_core.verify")
    if not all(hasattr(verify_mod, n) for n in ("verify", "canonical_answer", "extract_answer")):
        pytest.skip("grpo_core.verify API not available")
    rambling = "I am not sure what the result is here. " * 3  # long and answer-free: nothing to extract
    responses = ["so \\boxed{4}", "\\boxed{4}", "\\boxed{5}", rambling,  # prompt 0: majority 4
                 "\\boxed{7}", "\\boxed{8}", "", "\\boxed{9}"]  # prompt 1: 3-way tie -> 7 (first)
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    canonical = [verify_mod.canonical_answer(r) for r in responses]
    labels = majority_vote_labels(canonical, groups)
    correct = [label is not None and verify_mod.verify(r, label) for r, label in zip(responses, labels)]
    assert correct == [True, True, False, False, True, False, False, False]
    extracted = [verify_mod.extract_answer(r) for r in responses]
    assert [e is None for e in extracted] == [False, False, False, True, False, False, True, False]
    rewards = compute_rewards(correct, extracted, [3] * 8, RewardSettings(format_value=0.5))
    assert rewards.tolist() == [1.5, 1.5, 0.5, 0.0, 1.5, 0.5, 0.0, 0.5]
