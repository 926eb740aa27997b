"""grpo_core.packing: plan_micro_batches (token budget, whole groups, Hidden-Align samples kept together) and the
packed streams (positions, cu_seqlens, response positions, global token ids)."""
from grpo_core.experience import Group, Response
from grpo_core.packing import plan_micro_batches


def _group(index, lengths, correct=()):
    samples = [Response(group_index=index, sample_index=i, prompt_ids=[1] * 4, response_ids=[2] * (n - 4),
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


# --- packed streams ------------------------------------------------------------------------------------------

def test_pack_sequences_positions_and_targets():
    import torch

    from grpo_core.packing import pack_sequences

    p = pack_sequences([[5, 6], [7], [8, 9, 10]], [[1, 2, 3], [], [4]])
    assert p.input_ids.tolist() == [[5, 6, 1, 2, 3, 7, 8, 9, 10, 4]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 0, 1, 2, 3]]
    assert p.cu_seqlens.tolist() == [0, 5, 6, 10] and p.cu_seqlens.dtype == torch.int32
    # the hidden state at prompt_end - 1 + t predicts response token t
    assert p.response_positions.tolist() == [1, 2, 3, 8]
    assert p.targets.tolist() == [1, 2, 3, 4]
    assert p.input_ids[0, p.response_positions + 1].tolist() == p.targets.tolist()
    assert p.response_cu.tolist() == [0, 3, 3, 4] and p.seq_ids.tolist() == [0, 0, 0, 2]


def test_plan_sequences_budget():
    from grpo_core.packing import plan_sequences

    assert plan_sequences([3, 4, 2, 9, 1], max_tokens=7) == [[0, 1], [2], [3], [4]]


def test_micro_batch_global_ids_do_not_depend_on_packing():
    """Token id = (group * G + sample) * max_new_tokens + t: unique, and the same whatever the micro-batch split."""
    from grpo_core.packing import build_micro_batch, padding_micro_batch

    groups = [_group(0, [6, 7], correct=(1,)), _group(1, [5, 9], correct=(0, 1))]
    responses = [r for g in groups for r in g.samples]
    whole = build_micro_batch(responses, group_size=2, max_response_len=8, with_anchors=True)
    ids = {}
    for r, s, e in zip(responses, whole.response_cu[:-1].tolist(), whole.response_cu[1:].tolist()):
        ids[(r.group_index, r.sample_index)] = whole.token_index[s:e].tolist()
    assert ids[(0, 0)] == [0, 1] and ids[(0, 1)] == [8, 9, 10]
    assert ids[(1, 0)] == [16] and ids[(1, 1)] == [24, 25, 26, 27, 28]
    assert whole.seq_index.tolist() == [0, 1, 2, 3]
    for r in responses:  # one micro-batch per response: the same ids
        alone = build_micro_batch([r], group_size=2, max_response_len=8, with_anchors=True)
        assert alone.token_index.tolist() == ids[(r.group_index, r.sample_index)]
    # anchors: stream position of prompt_end + anchor (0 here) for correct responses, with their group
    assert whole.anchor_groups.tolist() == [0, 1, 1]
    assert whole.anchor_positions.tolist() == [6 + 4, 13 + 4, 18 + 4]
    assert whole.advantages.numel() == whole.mask.numel() == whole.targets.numel() == 11
    pad = padding_micro_batch(0)
    assert pad.is_padding and not pad.mask.any() and pad.num_sequences == 0


def test_micro_batch_rejects_out_of_range_ids():
    import pytest

    from grpo_core.packing import build_micro_batch

    g = _group(0, [6, 7])
    with pytest.raises(ValueError, match="outside a group of 1"):
        build_micro_batch(g.samples, group_size=1, max_response_len=8, with_anchors=False)
    with pytest.raises(ValueError, match="longer than max_response_len=2"):
        build_micro_batch(g.samples, group_size=2, max_response_len=2, with_anchors=False)


def test_pack_sequences_matches_a_per_sequence_reference():
    """The vectorised packer against the obvious per-sequence loop, on random shapes (empty responses, one
    sequence, none)."""
    import random

    import torch

    from grpo_core.packing import pack_sequences

    rng = random.Random(3)
    for _ in range(100):
        n = rng.randint(0, 7)
        prompts = [[rng.randrange(50) for _ in range(rng.randint(1, 6))] for _ in range(n)]
        responses = [[rng.randrange(50) for _ in range(rng.randint(0, 6))] for _ in range(n)]
        ids, pos, cu, resp_pos, targets, resp_cu, seq = [], [], [0], [], [], [0], []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            start = cu[-1]
            ids += p + r
            pos += list(range(len(p) + len(r)))
            resp_pos += [start + len(p) - 1 + t for t in range(len(r))]
            targets += r
            seq += [i] * len(r)
            cu.append(start + len(p) + len(r))
            resp_cu.append(resp_cu[-1] + len(r))
        got = pack_sequences(prompts, responses)
        want = {"input_ids": [ids], "position_ids": [pos], "cu_seqlens": cu, "response_positions": resp_pos,
                "targets": targets, "response_cu": resp_cu, "seq_ids": seq}
        for name, value in want.items():
            tensor = getattr(got, name)
            assert tensor.tolist() == value, (name, prompts, responses)
            assert tensor.dtype == (torch.int32 if name == "cu_seqlens" else torch.long), name
