"""grpo_core.experience.plan_micro_batches: token budget, whole groups, Hidden-Align samples kept together."""
from grpo_core.experience import Group, Sample, plan_micro_batches


def _group(index, lengths, correct=()):
    samples = [Sample(group_index=index, sample_index=i, prompt_ids=[1] * 4, response_ids=[2] * (n - 4),
                      rollout_logprobs=[0.0] * (n - 4), reward=float(i in correct), correct=i in correct,
                      anchor=0 if i in correct else None)
               for i, n in enumerate(lengths)]
    return Group(prompt_uid=f"p{index}", answer="1", samples=samples)


def _ids(plans):
    return [[(s.group_index, s.sample_index) for s in plan] for plan in plans]


def test_whole_groups_first_fit():
    groups = [_group(0, [10, 10]), _group(1, [30, 10]), _group(2, [5, 5])]
    plans = plan_micro_batches(groups, max_tokens=50)
    assert _ids(plans) == [[(0, 0), (0, 1)], [(1, 0), (1, 1), (2, 0), (2, 1)]]
    assert all(sum(s.length for s in p) <= 50 for p in plans)


def test_split_group_keeps_anchored_samples_together():
    # Group 1 (80 tokens) exceeds the 50-token budget; its correct samples 1 and 3 (30 tokens together)
    # would straddle the partly filled first micro-batch, so the group starts a fresh one, anchored first.
    groups = [_group(0, [15, 15]), _group(1, [20, 15, 30, 15], correct=(1, 3))]
    plans = plan_micro_batches(groups, max_tokens=50)
    assert _ids(plans) == [[(0, 0), (0, 1)], [(1, 1), (1, 3), (1, 0)], [(1, 2)]]
    assert all(sum(s.length for s in p) <= 50 for p in plans)
    assert sorted(i for p in _ids(plans) for i in p) == sorted((g, i) for g, n in ((0, 2), (1, 4)) for i in range(n))


def test_long_sequence_alone_and_no_empty_micro_batches():
    groups = [_group(0, [5]), _group(1, [120, 5], correct=(0, 1))]
    plans = plan_micro_batches(groups, max_tokens=50)
    # The anchored samples (125 tokens) cannot fit one micro-batch: plain first fit, the long one alone.
    assert _ids(plans) == [[(0, 0)], [(1, 0)], [(1, 1)]]
    assert all(plans)
