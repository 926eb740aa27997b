"""Advantage estimators, EDAS, dynamic sampling and FIPO against hand-computed numbers (docs/algorithms.md §1, §5)."""
import io
import math

import pytest
import torch

from grpo_core.advantages import (
    DynamicSamplingBuffer,
    compute_advantages,
    discounted_future_sum,
    edas_shape,
    fipo_weights,
    informative_groups,
)

T = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=0)


# --- estimators ----------------------------------------------------------------------------------------

def test_grpo_population_and_sample_std():
    # group 0: R = [1, 0, 0, 1]; mean 0.5, population std 0.5 -> A = +-0.5 / (0.5 + 1e-6)
    # group 1: R = [1, 0, 0]; mean 1/3, population var = ((2/3)^2 + 2 (1/3)^2) / 3 = 2/9, std = sqrt(2)/3
    #          -> A = (2/3) / (sqrt(2)/3) = sqrt(2), (-1/3) / (sqrt(2)/3) = -1/sqrt(2)   (eps negligible)
    r = T([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    g = T([0, 0, 0, 0, 1, 1, 1])
    a = compute_advantages(r, g, "grpo", std_unbiased=False)
    h = 0.5 / (0.5 + 1e-6)
    close(a[:4], [h, -h, -h, h])
    close(a[4:], [math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)], 1e-5)
    # sample std of group 0: sqrt(4 * 0.25 / 3) = sqrt(1/3) -> A = 0.5 / sqrt(1/3) = 0.8660254
    a_s = compute_advantages(r, g, "grpo", std_unbiased=True)
    close(a_s[:4], [0.8660254, -0.8660254, -0.8660254, 0.8660254], 1e-5)
    # group 1, sample std: var = (4/9 + 2/9) / 2 = 1/3 -> A = (2/3) * sqrt(3) = 1.1547005, (-1/3) * sqrt(3) = -0.5773503
    close(a_s[4:], [1.1547005, -0.5773503, -0.5773503], 1e-5)
    assert torch.equal(compute_advantages(r, g, "grpo"), a_s)  # the default divides by G - 1, as verl and TRL
    assert a.dtype == r.dtype


def test_grpo_std_unbiased_pairs_of_two():
    # G = 2, R = [1, 0]: mean 0.5; population std 0.5 -> A = +-1; sample std sqrt(0.5) -> A = +-0.5 / sqrt(0.5)
    # = +-0.7071068: the two conventions differ by sqrt(G / (G - 1)) = sqrt(2) = 1.41x.
    r, g = T([1.0, 0.0]), T([0, 0])
    pop = compute_advantages(r, g, "grpo", eps=0.0, std_unbiased=False)
    sample = compute_advantages(r, g, "grpo", eps=0.0, std_unbiased=True)
    close(pop, [1.0, -1.0])
    close(sample, [0.7071068, -0.7071068], 1e-6)


@pytest.mark.parametrize("estimator", ["drgrpo", "rloo"])
def test_std_convention_leaves_drgrpo_and_rloo_exact(estimator):
    r = T([1.0, 0.0, 0.0, 1.0, 0.5, 0.0])
    g = T([0, 0, 0, 1, 1, 1])
    assert torch.equal(compute_advantages(r, g, estimator, std_unbiased=True),
                       compute_advantages(r, g, estimator, std_unbiased=False))


def test_drgrpo_aggregation_pairing_is_announced():
    from grpo_core.advantages import aggregation_notice

    note = aggregation_notice("drgrpo", "token-mean")
    assert note is not None and "seq-sum-constant" in note and "token-mean" in note
    assert aggregation_notice("drgrpo", "seq-sum-constant") is None
    assert aggregation_notice("grpo", "token-mean") is None


def test_drgrpo_and_rloo():
    # Dr. GRPO, R = [1, 0, 0]: mean 1/3 -> [2/3, -1/3, -1/3]
    close(compute_advantages(T([1.0, 0.0, 0.0]), T([0, 0, 0]), "drgrpo"), [2 / 3, -1 / 3, -1 / 3])
    # RLOO, R = [1, 0, 0]: 1 - (0+0)/2 = 1; 0 - (1+0)/2 = -0.5 (twice)
    # RLOO, R = [1, 0.5, 0]: 1 - 0.25 = 0.75; 0.5 - 0.5 = 0; 0 - 0.75 = -0.75; singleton group -> 0
    r = T([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 3.0])
    g = T([0, 0, 0, 1, 1, 1, 2])
    close(compute_advantages(r, g, "rloo"), [1.0, -0.5, -0.5, 0.75, 0.0, -0.75, 0.0])


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_constant_groups_give_exact_zero(estimator):
    # 0.1 is not exactly representable: the mean of three 0.1s must still give exact zeros.
    r = T([0.1, 0.1, 0.1, 1.0, 0.0], dtype=torch.float32)
    a = compute_advantages(r, T([5, 5, 5, 2, 2]), estimator)
    assert torch.equal(a[:3], torch.zeros(3))
    assert (a[3:] != 0).all()


def test_arbitrary_group_ids_match_contiguous():
    torch.manual_seed(1)
    r = torch.randint(0, 2, (12,)).double() + 0.1 * torch.randn(12).double()
    contiguous = torch.arange(4).repeat_interleave(3)
    perm = torch.randperm(12)
    arbitrary = T([101, 7, 55, 3])[contiguous]
    for est in ("grpo", "drgrpo", "rloo"):
        ref = compute_advantages(r, contiguous, est)
        got = compute_advantages(r[perm], arbitrary[perm], est)
        close(got, ref[perm], 1e-12)


def test_estimator_bad_input():
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages(T([1.0]), T([0]), "ppo")
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(T([1.0, 0.0]), T([0]), "grpo")
    with pytest.raises(ValueError, match="floating"):
        compute_advantages(T([1, 0]), T([0, 0]), "grpo")


# --- EDAS ----------------------------------------------------------------------------------------------

def _edas_group():
    # one correct + three wrong with answers {a, a, b}; Dr. GRPO advantages of R = [1, 0, 0, 0]
    adv = T([0.75, -0.25, -0.25, -0.25], dtype=torch.float64)
    return adv, T([0, 0, 0, 0]), T([True, False, False, False])


def test_edas_k_greater_than_one():
    adv, g, correct = _edas_group()
    out = edas_shape(adv, g, correct, [None, "a", "a", "b"])
    # N_w = 3, S = 0.25, p_a = 2/3, p_b = 1/3; I_a = ln 1.5 = 0.4054651, I_b = ln 3 = 1.0986123
    # H = 2/3 ln 1.5 + 1/3 ln 3 = 0.6365142; ln N_w = 1.0986123
    # D_a = 0.4 * 0.25 * (0.4054651 - 0.6365142) / 1.0986123 = -0.0210310  (|D| < |A|/2 = 0.125)
    # D_b = 0.4 * 0.25 * (1.0986123 - 0.6365142) / 1.0986123 = +0.0420620
    close(out, [0.75, -0.25 - 0.0210310, -0.25 - 0.0210310, -0.25 + 0.0420620])
    assert torch.equal(adv, T([0.75, -0.25, -0.25, -0.25], dtype=torch.float64))  # input untouched


def test_edas_step_capped_at_abs_a_over_kappa():
    adv, g, correct = _edas_group()
    # alpha = 4: D_a = -0.2103099, D_b = +0.4206198, both beyond |A| / kappa = 0.125 -> steps of 0.125
    out = edas_shape(adv, g, correct, [None, "a", "a", "b"], alpha=4.0)
    close(out, [0.75, -0.375, -0.375, -0.125])


def test_edas_single_wrong_class_and_small_nw():
    # group 0: R = [1, 0, 0] Dr.GRPO -> [2/3, -1/3, -1/3], both wrong answers "x": K = 1,
    #   S = 1/3, D = -0.2 / 3 = -0.0666667, cap 1/6 -> A = -1/3 - 1/15 = -0.4
    # group 1: R = [1, 1, 0] -> N_w = 1 -> D = 0 (unchanged)
    adv = T([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3], dtype=torch.float64)
    g = T([0, 0, 0, 1, 1, 1])
    correct = T([True, False, False, True, True, False])
    out = edas_shape(adv, g, correct, [None, "x", "x", None, None, "y"])
    close(out, [2 / 3, -0.4, -0.4, 1 / 3, 1 / 3, -2 / 3])


def test_edas_none_class():
    adv, g, correct = _edas_group()
    # None keys share the class "none": {none, none, b} gives the same numbers as {a, a, b}
    close(edas_shape(adv, g, correct, [None, None, None, "b"]), edas_shape(adv, g, correct, [None, "a", "a", "b"]))
    # the string "none" is a real answer, distinct from None: three singleton classes, I_i = H -> D = 0
    close(edas_shape(adv, g, correct, [None, None, "none", "b"]), adv)


def test_edas_sign_preserved_and_zero_stays_zero():
    torch.manual_seed(3)
    n = 64
    adv = torch.randn(n, dtype=torch.float64)
    g = torch.arange(8).repeat_interleave(8)
    correct = torch.rand(n) < 0.3
    keys = [str(int(k)) if k < 3 else None for k in torch.randint(0, 4, (n,))]
    out = edas_shape(adv, g, correct, keys, alpha=50.0, beta=50.0)
    assert torch.equal(torch.sign(out), torch.sign(adv))
    assert torch.equal(out[correct], adv[correct])
    # an all-wrong group after GRPO has A = 0 everywhere and must stay there
    zeros = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(edas_shape(zeros, T([0, 0, 0]), T([False] * 3), ["a", "a", "b"]), zeros)


def test_edas_groups_are_independent_of_order():
    adv, g, correct = _edas_group()
    keys = [None, "a", "a", "b"]
    both = edas_shape(torch.cat([adv, adv]), T([9, 9, 9, 9, 4, 4, 4, 4]), torch.cat([correct, correct]), keys + keys)
    close(both[:4], edas_shape(adv, g, correct, keys))
    close(both[4:], both[:4])


def test_edas_bad_input():
    adv, g, correct = _edas_group()
    with pytest.raises(ValueError, match="wrong_answer_keys"):
        edas_shape(adv, g, correct, ["a"])
    with pytest.raises(ValueError, match="kappa"):
        edas_shape(adv, g, correct, [None, "a", "a", "b"], kappa=0.5)
    with pytest.raises(ValueError, match="correct"):
        edas_shape(adv, g, correct.long(), [None, "a", "a", "b"])


# --- dynamic sampling ----------------------------------------------------------------------------------

def test_informative_groups():
    r = T([1.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    g = T([3, 3, 8, 8, 1, 1, 1])  # sorted unique ids: 1, 3, 8
    assert informative_groups(r, g).tolist() == [True, False, False]


def test_dynamic_sampling_fills_and_drops_overflow():
    buf = DynamicSamplingBuffer(train_batch_prompts=4, max_gen_batches=3)
    buf.begin_step()
    rounds = [(["a", "b", "c"], [True, False, True]), (["d", "e", "f"], T([True, True, True]))]
    for groups, flags in rounds:
        assert buf.needs_more()
        buf.add_round(groups, flags)
    assert not buf.needs_more()
    batch, st = buf.take()
    assert batch == ["a", "c", "d", "e"]
    assert (st.rounds, st.groups_generated, st.groups_kept, st.groups_uninformative, st.groups_overflow) == (2, 6, 4, 1, 1)
    assert not st.bound_hit and st.filtered_fraction == pytest.approx(1 / 6)
    buf.begin_step()  # overflow "f" was dropped (carry_overflow=False)
    assert buf.needs_more()


def test_dynamic_sampling_bound_hit_trains_on_what_there_is():
    buf = DynamicSamplingBuffer(train_batch_prompts=4, max_gen_batches=2)
    buf.begin_step()
    while buf.needs_more():
        buf.add_round(["x", "y"], [False, True])
    batch, st = buf.take()
    assert batch == ["y", "y"] and st.rounds == 2 and st.bound_hit
    assert buf.steps_bound_hit == 1 and buf.total.groups_uninformative == 2
    buf.begin_step()
    buf.add_round(["z"], [True])
    buf.add_round(["z"], [True])
    with pytest.raises(RuntimeError, match="max_gen_batches"):
        buf.add_round(["z"], [True])


def test_dynamic_sampling_state_round_trip_with_carry():
    def run_step(buf, tag):
        buf.begin_step()
        while buf.needs_more():
            buf.add_round([f"{tag}{i}" for i in range(3)], [True, True, True])
        return buf.take()

    a = DynamicSamplingBuffer(train_batch_prompts=2, max_gen_batches=4, carry_overflow=True)
    batch, st = run_step(a, "s0_")
    assert batch == ["s0_0", "s0_1"] and st.groups_overflow == 1
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = DynamicSamplingBuffer(train_batch_prompts=2, max_gen_batches=4, carry_overflow=True)
    b.load_state_dict(torch.load(blob, weights_only=False))
    # resumed and original buffers continue identically: the carried group opens the next batch
    ra, rb = run_step(a, "s1_"), run_step(b, "s1_")
    assert ra[0] == rb[0] == ["s0_2", "s1_0"]
    assert ra[1] == rb[1] and ra[1].groups_carried_in == 1
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="train_batch_prompts"):
        DynamicSamplingBuffer(3, 4, True).load_state_dict(a.state_dict())


# --- FIPO ----------------------------------------------------------------------------------------------

def _fipo(d, mask=None, adv=None, seq_ids=None, **kw):
    d = T(d, dtype=torch.float64)
    n = d.numel()
    mask = T([True] * n) if mask is None else T(mask)
    adv = torch.ones(n, dtype=torch.float64) if adv is None else T(adv, dtype=torch.float64)
    seq_ids = torch.zeros(n, dtype=torch.long) if seq_ids is None else T(seq_ids)
    old = torch.full((n,), -1.0, dtype=torch.float64)
    return fipo_weights(old + d, old, mask, adv, seq_ids=seq_ids, **kw)


def test_fipo_hand_sequence():
    # tau = 1 -> gamma = 0.5; D = [0.1, -0.2, 0.3]
    # F_3 = 0.3; F_2 = -0.2 + 0.5 * 0.3 = -0.05; F_1 = 0.1 + 0.5 * -0.05 = 0.075
    # exp F = [1.0778842, 0.9512294, 1.3498588] -> clip [0.8, 1.2]
    close(_fipo([0.1, -0.2, 0.3], tau=1.0), [1.0778842, 0.9512294, 1.2])
    close(_fipo([0.1, -0.2, 0.3], tau=1.0, high_only=True), [1.0778842, 1.0, 1.2])
    # token 2 masked: F_2 = 0 + 0.15, F_1 = 0.1 + 0.075 = 0.175; the masked token's weight is 1
    close(_fipo([0.1, -0.2, 0.3], mask=[True, False, True], tau=1.0), [math.exp(0.175), 1.0, 1.2])
    # c = 1.3 (ln c = 0.2624): token 3 (D = 0.3) gets m = 0 -> F = [0.1 - 0.1, -0.2, 0] -> [1, e^-0.2, 1]
    close(_fipo([0.1, -0.2, 0.3], tau=1.0, c=1.3), [1.0, math.exp(-0.2), 1.0])


def test_fipo_negative_advantage_high_ratio_clamp():
    # one token with r = 5 (D = ln 5 < ln 10 is kept): exp F = 5 -> clip 1.2; A < 0 and r > 4 -> [0.8, 1] -> 1.0
    d = [math.log(5.0)]
    close(_fipo(d, adv=[1.0]), [1.2])
    close(_fipo(d, adv=[-1.0]), [1.0])
    # r = 3 < 4: no extra clamp for A < 0
    close(_fipo([math.log(3.0)], adv=[-1.0]), [1.2])
    # D clamped at -20 before the sum: exp(-20) -> clip low 0.8
    close(_fipo([-50.0], tau=1.0), [0.8])


def test_fipo_sequences_do_not_leak_and_cu_seqlens_matches():
    d = [0.1, -0.2, 0.3, 0.05, 0.05]
    w = _fipo(d, seq_ids=[0, 0, 0, 4, 4], tau=1.0)
    close(w[:3], _fipo(d[:3], tau=1.0))
    close(w[3:], _fipo(d[3:], tau=1.0))
    dd = T(d, dtype=torch.float64)
    w_cu = fipo_weights(dd, torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.bool),
                        torch.ones(5, dtype=torch.float64), cu_seqlens=T([0, 3, 5]), tau=1.0)
    close(w_cu, w)
    with pytest.raises(ValueError, match="contiguous"):
        _fipo(d, seq_ids=[0, 1, 0, 1, 1])
    with pytest.raises(ValueError, match="exactly one"):
        fipo_weights(dd, dd, torch.ones(5, dtype=torch.bool), dd)


def test_discounted_future_sum_long_sequences_match_loop():
    torch.manual_seed(0)
    lengths = [300, 1, 129, 128, 257]
    x = torch.randn(sum(lengths), dtype=torch.float64)
    seq_ids = torch.arange(len(lengths)).repeat_interleave(T(lengths))
    gamma = 2.0 ** (-1.0 / 32.0)
    got = discounted_future_sum(x, seq_ids, gamma, chunk=64)
    ref = torch.empty_like(x)
    start = 0
    for length in lengths:
        acc = 0.0
        for t in range(start + length - 1, start - 1, -1):
            acc = float(x[t]) + gamma * acc
            ref[t] = acc
        start += length
    close(got, ref, 1e-10)
    close(discounted_future_sum(x.float(), seq_ids, gamma), ref, 2e-4)


def test_fipo_is_detached():
    lp = torch.zeros(4, requires_grad=True)
    w = fipo_weights(lp, torch.zeros(4), torch.ones(4, dtype=torch.bool), torch.ones(4), seq_ids=T([0, 0, 1, 1]))
    assert not w.requires_grad


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    r = torch.randint(0, 2, (24,)).float()
    g = torch.arange(6).repeat_interleave(4)
    correct = r > 0
    keys = [None if i % 5 == 0 else str(i % 3) for i in range(24)]
    for est in ("grpo", "drgrpo", "rloo"):
        a_cpu = compute_advantages(r, g, est)
        a_gpu = compute_advantages(r.cuda(), g.cuda(), est)
        close(a_gpu.cpu(), a_cpu, 1e-6)
        close(edas_shape(a_gpu, g.cuda(), correct.cuda(), keys).cpu(), edas_shape(a_cpu, g, correct, keys), 1e-6)
    lengths = T([300, 5, 1000])
    seq_ids = torch.arange(3).repeat_interleave(lengths)
    n = int(lengths.sum())
    lp, old = 0.05 * torch.randn(n), 0.05 * torch.randn(n)
    mask, adv = torch.rand(n) < 0.9, torch.randn(n)
    w_cpu = fipo_weights(lp, old, mask, adv, seq_ids=seq_ids)
    w_gpu = fipo_weights(lp.cuda(), old.cuda(), mask.cuda(), adv.cuda(), seq_ids=seq_ids.cuda())
    close(w_gpu.cpu(), w_cpu, 1e-5)
