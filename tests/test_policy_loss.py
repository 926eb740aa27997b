"""grpo_kernels.policy_loss (clipped ratio + dual clip + NSR, GSPO) against the float64 references."""
import math

import pytest
import torch
import triton
import triton.language as tl

from grpo_kernels.policy_loss import clipped_policy_loss, gspo_policy_loss, philox_uniform
from grpo_kernels.reference.policy_loss import clipped_policy_loss_ref, gspo_policy_loss_ref

BACKENDS = ["triton", "torch"]


@triton.jit
def _tl_rand_kernel(p_out, N, seed, offset, BLOCK: tl.constexpr):
    o_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(p_out + o_i, tl.rand(seed, offset + o_i.to(tl.int64)), mask=o_i < N)


def _tl_rand(seed, offset, n):
    out = torch.empty(n)
    _tl_rand_kernel[(triton.cdiv(n, 512),)](out, n, seed, offset, BLOCK=512)
    return out


def _inputs(n, seed=0, spread=0.4, mask_frac=0.2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(n, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) >= mask_frac
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def _ref_counts(logp, old, adv, mask, rescued, eps_low, eps_high):
    r = torch.exp(logp.double() - old.double())
    a = adv.double()
    return {
        "n_tokens": int(mask.sum()),
        "n_clip_low": int((mask & (a < 0) & (r < 1 - eps_low)).sum()),
        "n_clip_high": int((mask & (a > 0) & (r > 1 + eps_high)).sum()),
        "n_rescued": int(rescued.sum()),
    }


@pytest.mark.parametrize("seed, offset, step", [(0, 0, 0), (12345, 7, 0), (2**40 + 3, 2**32 - 300, 0)])
def test_philox_bit_exact_with_tl_rand(seed, offset, step):
    n = 700  # crosses the 2^32 counter boundary in the last case
    index = offset + torch.arange(n, dtype=torch.int64)
    assert torch.equal(philox_uniform(seed, index, step), _tl_rand(seed, offset, n))


def test_philox_range_and_step():
    index = torch.arange(20_000, dtype=torch.int64)
    u = philox_uniform(3, index)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.015
    assert not torch.equal(u, philox_uniform(3, index, step=1))
    assert not torch.equal(u, philox_uniform(4, index))


CASES = [  # id, n, kwargs
    ("plain-clip", 37, dict(eps_low=0.2, eps_high=0.2)),
    ("clip-higher", 1031, dict(eps_low=0.2, eps_high=0.28)),
    ("dual-clip", 1031, dict(eps_low=0.2, eps_high=0.28, dual_clip=1.5)),
    ("nsr-scaled", 2500, dict(nsr="scaled", seed=11, offset=5)),
    ("nsr-scaled-dual", 517, dict(nsr="scaled", dual_clip=3.0, seed=2, step=9)),
    ("nsr-band", 2500, dict(nsr="band", nsr_prob=0.6, nsr_band=0.3, seed=7)),
    ("single", 1, dict(nsr="scaled")),
    ("empty", 0, dict(nsr="scaled")),
]


# Tolerances: kernels compute in fp32; the reference in fp64 (fp32 inputs) or the input dtype.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 2e-6)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case_id, n, kwargs", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case_id, n, kwargs, dtype, tol, backend, nan_empty):
    logp, old, adv, mask = _inputs(n, seed=n, dtype=dtype)
    logp = logp.requires_grad_()
    loss, stats = clipped_policy_loss(logp, old, adv, mask, backend=backend, **kwargs)

    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("seed", "offset", "step")}
    u = None
    if kwargs.get("nsr", "off") != "off":
        index = kwargs.get("offset", 0) + torch.arange(n, dtype=torch.int64)
        u = philox_uniform(kwargs.get("seed", 0), index, kwargs.get("step", 0)).double()
    logp_ref = logp.detach().double().requires_grad_()
    ref, rescued = clipped_policy_loss_ref(logp_ref, old.double(), adv.double(), mask, u, **ref_kwargs)

    assert loss.dtype == torch.float32 and loss.shape == (n,)
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    grad_out = torch.randn(n, dtype=torch.float64)
    (g,) = torch.autograd.grad(loss, logp, grad_out.to(loss.dtype))
    (g_ref,) = torch.autograd.grad(ref, logp_ref, grad_out)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)
    assert bool((loss[~mask] == 0).all()) and bool((g[~mask] == 0).all())

    counts = _ref_counts(logp.detach(), old, adv, mask, rescued, kwargs.get("eps_low", 0.2),
                         kwargs.get("eps_high", 0.28))
    for key, value in counts.items():
        assert int(stats[key]) == value, key
    denom = max(counts["n_tokens"], 1)
    assert math.isclose(float(stats["clip_low_frac"]), counts["n_clip_low"] / denom, rel_tol=1e-6)
    assert math.isclose(float(stats["clip_high_frac"]), counts["n_clip_high"] / denom, rel_tol=1e-6)
    assert math.isclose(float(stats["rescue_frac"]), counts["n_rescued"] / denom, rel_tol=1e-6)
    assert all(v.dim() == 0 for v in stats.values())


def test_clip_sides_hand_values():
    # r = 2 (A = +1, upper clip), r = 0.5 (A = -1, lower clip), r = 1 (inside), r = 4 (A = -1, dual clip)
    logp = torch.log(torch.tensor([2.0, 0.5, 1.0, 4.0])).requires_grad_()
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0])
    mask = torch.ones(4, dtype=torch.bool)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                                      backend="torch")
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, -2.0, 3.0]))
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, torch.tensor([0.0, 0.0, -2.0, 0.0]))
    assert [int(stats[k]) for k in ("n_clip_low", "n_clip_high", "n_dual_clip")] == [1, 1, 1]


@pytest.mark.parametrize("backend, n", [("torch", 40_000), ("triton", 8192)])
def test_nsr_scaled_statistics(backend, n):
    """Identical out-of-bound tokens: rescue rate -> rho, mean gradient weight -> rho^2 / 2."""
    half = n // 2
    r = torch.cat([torch.full((half,), 1.6), torch.full((n - half,), 0.6)])  # upper: rho=0.8, lower: 0.75
    adv = torch.cat([torch.ones(half), -torch.ones(n - half)])
    logp = torch.log(r).requires_grad_()
    loss, stats = clipped_policy_loss(logp, torch.zeros(n), adv, torch.ones(n, dtype=torch.bool), nsr="scaled",
                                      seed=99, backend=backend)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    weight = g / (-r * adv)  # gradient weight relative to the unclipped surrogate
    for sl, rho in ((slice(0, half), 1.28 / 1.6), (slice(half, n), 0.6 / 0.8)):
        w = weight[sl]
        k = w.numel()
        rate = float((w > 0).float().mean())
        assert abs(rate - rho) < 5 * math.sqrt(rho * (1 - rho) / k)
        var = rho**3 / 3 - (rho**2 / 2) ** 2
        assert abs(float(w.mean()) - rho**2 / 2) < 5 * math.sqrt(var / k)
    assert abs(float(stats["rescue_frac"]) - float((weight > 0).float().mean())) < 1e-6


@pytest.mark.parametrize("backend, n", [("torch", 40_000), ("triton", 8192)])
def test_nsr_band_statistics(backend, n):
    """Inside the band: rescued with probability nsr_prob and weight 1; outside: never."""
    half = n // 2
    r = torch.cat([torch.full((half,), 1.3), torch.full((n - half,), 1.6)])  # rho = 0.985 (in), 0.8 (out)
    logp = torch.log(r).requires_grad_()
    loss, _ = clipped_policy_loss(logp, torch.zeros(n), torch.ones(n), torch.ones(n, dtype=torch.bool),
                                  nsr="band", nsr_prob=0.3, nsr_band=0.1, seed=5, backend=backend)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    w = g / -r
    inside = w[:half]
    torch.testing.assert_close(inside[inside > 0], torch.ones_like(inside[inside > 0]))  # weight 1
    rate = float((inside > 0).float().mean())
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / half)
    assert bool((w[half:] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_and_seed_dependent(backend):
    logp, old, adv, mask = _inputs(3000, spread=0.8)
    kw = dict(nsr="scaled", backend=backend)
    a, sa = clipped_policy_loss(logp, old, adv, mask, seed=1, **kw)
    b, _ = clipped_policy_loss(logp, old, adv, mask, seed=1, **kw)
    c, _ = clipped_policy_loss(logp, old, adv, mask, seed=2, **kw)
    d, _ = clipped_policy_loss(logp, old, adv, mask, seed=1, step=1, **kw)
    assert int(sa["n_rescued"]) > 50
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nsr", ["scaled", "band"])
def test_split_invariance(backend, nsr):
    n, cuts = 2900, [0, 611, 2048, 2900]  # 3 uneven pieces
    logp, old, adv, mask = _inputs(n, spread=0.8)
    kw = dict(nsr=nsr, nsr_band=0.5, seed=21, step=3, backend=backend)
    logp = logp.requires_grad_()
    full, stats = clipped_policy_loss(logp, old, adv, mask, offset=100, **kw)
    (g_full,) = torch.autograd.grad(full.sum(), logp)
    pieces, grads, rescued = [], [], 0
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        part = logp.detach()[lo:hi].clone().requires_grad_()
        loss, st = clipped_policy_loss(part, old[lo:hi], adv[lo:hi], mask[lo:hi], offset=100 + lo, **kw)
        (g,) = torch.autograd.grad(loss.sum(), part)
        pieces.append(loss)
        grads.append(g)
        rescued += int(st["n_rescued"])
    assert torch.equal(torch.cat(pieces), full.detach())
    assert torch.equal(torch.cat(grads), g_full)
    assert rescued == int(stats["n_rescued"]) > 0


def test_backends_agree_and_2d_input():
    logp, old, adv, mask = _inputs(1200, spread=0.8)
    kw = dict(nsr="scaled", seed=4, dual_clip=2.0)
    a, sa = clipped_policy_loss(logp, old, adv, mask, backend="triton", **kw)
    b, sb = clipped_policy_loss(logp, old, adv, mask, backend="torch", **kw)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(int(sa[k]) == int(sb[k]) for k in sa if k.startswith("n_"))
    c, _ = clipped_policy_loss(logp.view(30, 40), old.view(30, 40), adv.view(30, 40), mask.view(30, 40),
                               backend="torch", **kw)
    assert c.shape == (30, 40) and torch.equal(c.reshape(-1), b)


def test_bf16_input_gives_bf16_grad():
    logp, old, adv, mask = _inputs(333, dtype=torch.bfloat16)
    logp.requires_grad_()
    loss, _ = clipped_policy_loss(logp, old, adv, mask, nsr="scaled", backend="triton")
    (g,) = torch.autograd.grad(loss.sum(), logp)
    ref, _ = clipped_policy_loss(logp.detach().float(), old.float(), adv.float(), mask, nsr="scaled",
                                 backend="torch")
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("bad, match", [
    (dict(mask=torch.ones(5)), "mask must be a bool"),
    (dict(advantages=torch.ones(6)), "advantages has shape"),
    (dict(nsr="always"), "nsr must be one of"),
    (dict(seed=-1), "seed must be"),
    (dict(offset=-3), "offset must be"),
    (dict(dual_clip=0.5), "dual_clip must be"),
    (dict(nsr_prob=1.5), "nsr_prob"),
    (dict(backend="cuda"), "backend must be"),
])
def test_bad_input(bad, match):
    args = dict(logprob=torch.zeros(5), old_logprob=torch.zeros(5), advantages=torch.ones(5),
                mask=torch.ones(5, dtype=torch.bool))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        clipped_policy_loss(args.pop("logprob"), args.pop("old_logprob"), args.pop("advantages"),
                            args.pop("mask"), **args)


# ---------------------------------------------------------------------------------------------- GSPO
def _packed(lengths, seed=0, spread=1e-3):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int64)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 2
    # Per-sequence shifts of +-2e-3 / ~0 and alternating advantage signs put sequences on both clip sides
    # of the narrow GSPO range and inside it.
    b = len(lengths)
    shift = torch.tensor([2e-3, -2e-3, 1e-4])[torch.arange(b) % 3].double()
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    logp = old + shift[seq] + torch.randn(n, generator=g, dtype=torch.float64) * spread
    sign = 1.0 - 2.0 * (torch.arange(b) % 2).double()
    adv_seq = sign * (0.1 + torch.rand(b, generator=g, dtype=torch.float64))
    mask = torch.rand(n, generator=g) > 0.2
    adv = torch.where(mask, adv_seq[seq], torch.randn(n, generator=g, dtype=torch.float64))  # junk when masked
    return logp, old, adv, mask, cu


LENGTHS = [5, 1, 17, 0, 33, 2, 9, 61, 4, 12]


@pytest.mark.parametrize("nsr", ["off", "scaled", "band"])
def test_gspo_matches_reference(nsr):
    logp, old, adv, mask, cu = _packed(LENGTHS)
    mask[cu[1]:cu[2]] = False  # a fully masked sequence
    kw = dict(nsr=nsr, nsr_prob=0.5, nsr_band=1.0)
    logp = logp.requires_grad_()
    loss, stats = gspo_policy_loss(logp, old, adv, mask, cu, seed=8, offset=3, **kw)
    u_seq = philox_uniform(8, 3 + torch.arange(len(LENGTHS), dtype=torch.int64)).double()
    logp_ref = logp.detach().clone().requires_grad_()
    ref, rescued = gspo_policy_loss_ref(logp_ref, old, adv, mask, cu, u_seq, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn(logp.numel(), dtype=torch.float64)
    (g,) = torch.autograd.grad(loss, logp, grad_out.float())
    (g_ref,) = torch.autograd.grad(ref, logp_ref, grad_out)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert int(stats["seq_n_rescued"]) == int(rescued.sum())
    assert int(stats["n_seqs"]) == 8  # one empty, one fully masked
    if nsr == "off":
        assert int(stats["seq_n_clip_low"]) > 0 and int(stats["seq_n_clip_high"]) > 0


def test_gspo_hand_formula():
    # One sequence of 3 valid tokens with log ratios 0.1, 0.2, 0.3 -> s = exp(0.2); A = 1; wide clip range.
    old = torch.zeros(4)
    logp = torch.tensor([0.1, 0.2, 0.3, 5.0], requires_grad=True)
    mask = torch.tensor([True, True, True, False])
    loss, _ = gspo_policy_loss(logp, old, torch.ones(4), mask, torch.tensor([0, 4]), eps_low=0.5, eps_high=0.5)
    s = math.exp(0.2)
    torch.testing.assert_close(loss, torch.tensor([-s, -s, -s, 0.0]))
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, torch.tensor([-s, -s, -s, 0.0]))
    # clipped above (s > 1 + eps_high): value -(1 + eps_high) A, no gradient
    loss, st = gspo_policy_loss(logp, old, torch.ones(4), mask, torch.tensor([0, 4]), eps_low=0.1, eps_high=0.1)
    torch.testing.assert_close(loss, torch.tensor([-1.1, -1.1, -1.1, 0.0]))
    assert int(st["seq_n_clip_high"]) == 1 and int(st["n_clip_high"]) == 3


@pytest.mark.parametrize("nsr", ["scaled", "band"])
def test_gspo_split_invariance(nsr):
    logp, old, adv, mask, cu = _packed(LENGTHS, seed=3, spread=3e-3)
    kw = dict(nsr=nsr, nsr_band=2.0, seed=17, step=2)
    full, stats = gspo_policy_loss(logp, old, adv, mask, cu, offset=50, **kw)
    pieces, rescued = [], 0
    for s0, s1 in ((0, 3), (3, 4), (4, 10)):  # by sequences; offset counts sequences
        lo, hi = int(cu[s0]), int(cu[s1])
        loss, st = gspo_policy_loss(logp[lo:hi], old[lo:hi], adv[lo:hi], mask[lo:hi], cu[s0:s1 + 1] - lo,
                                    offset=50 + s0, **kw)
        pieces.append(loss)
        rescued += int(st["seq_n_rescued"])
    assert torch.equal(torch.cat(pieces), full)
    assert rescued == int(stats["seq_n_rescued"])


def test_gspo_bad_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens"):
        gspo_policy_loss(torch.zeros(5), torch.zeros(5), torch.ones(5), torch.ones(5, dtype=torch.bool),
                         torch.tensor([0, 3]))


@pytest.mark.gpu
@pytest.mark.parametrize("nsr", ["off", "scaled", "band"])
def test_cuda_kernel_matches_torch_backend(nsr):
    logp, old, adv, mask = _inputs(100_003, spread=0.8)
    args = [t.cuda() for t in (logp, old, adv, mask)]
    args[0].requires_grad_()
    kw = dict(nsr=nsr, seed=5, offset=2**31 + 17, step=3, dual_clip=3.0)
    loss, stats = clipped_policy_loss(*args, backend="triton", **kw)
    (g,) = torch.autograd.grad(loss.sum(), args[0])
    ref, ref_stats = clipped_policy_loss(logp, old, adv, mask, backend="torch", **kw)
    torch.testing.assert_close(loss.cpu(), ref, rtol=1e-5, atol=1e-6)
    assert all(int(stats[k]) == int(ref_stats[k]) for k in stats if k.startswith("n_"))
    index = kw["offset"] + torch.arange(1000, dtype=torch.int64)
    assert torch.equal(philox_uniform(5, index.cuda(), 3).cpu(), philox_uniform(5, index, 3))
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_index_counters(backend):
    """token_index = offset + arange matches `offset`; a shuffled batch with its counters gives the same draws."""
    n = 1500
    logp, old, adv, mask = _inputs(n, spread=0.8)
    kw = dict(nsr="scaled", seed=13, step=1, backend=backend)
    base, _ = clipped_policy_loss(logp, old, adv, mask, offset=40, **kw)
    idx = 40 + torch.arange(n, dtype=torch.int64)
    same, _ = clipped_policy_loss(logp, old, adv, mask, token_index=idx, **kw)
    assert torch.equal(same, base)
    perm = torch.randperm(n)
    shuffled, _ = clipped_policy_loss(logp[perm], old[perm], adv[perm], mask[perm], token_index=idx[perm], **kw)
    assert torch.equal(shuffled, base[perm])
    with pytest.raises(TypeError, match="token_index"):
        clipped_policy_loss(logp, old, adv, mask, token_index=idx.int(), **kw)


def test_gspo_seq_index():
    logp, old, adv, mask, cu = _packed(LENGTHS, seed=3, spread=3e-3)
    kw = dict(nsr="scaled", seed=17)
    base, _ = gspo_policy_loss(logp, old, adv, mask, cu, offset=50, **kw)
    seq_index = 50 + torch.arange(len(LENGTHS), dtype=torch.int64)
    same, _ = gspo_policy_loss(logp, old, adv, mask, cu, seq_index=seq_index, **kw)
    assert torch.equal(same, base)
    other, _ = gspo_policy_loss(logp, old, adv, mask, cu, seq_index=seq_index.flip(0), **kw)
    assert not torch.equal(other, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_log_ratio_clamp_edges(backend):
    """docs/algorithms.md "Numerical guards": log r is clamped to [-20, 20] before exp; the gradient is zero
    where the clamp binds (as autograd of clamp), and a huge log-ratio gives a finite loss, no inf/NaN."""
    lr = torch.tensor([19.5, 20.0, 20.5, 1e30, -19.5, -25.0, 0.0])
    adv = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    old = torch.full_like(lr, -1.0)
    logp = (old + lr).requires_grad_()
    mask = torch.ones(lr.numel(), dtype=torch.bool)
    loss, _ = clipped_policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, backend=backend)
    e = math.exp
    # A < 0, r above the clip: the unclipped -r A binds; A > 0, r below: -r A binds as well.
    want = torch.tensor([e(19.5), e(20.0), e(20.0), e(20.0), -e(-19.5), -e(-20.0), -1.0])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    want_g = torch.tensor([e(19.5), e(20.0), 0.0, 0.0, -e(-19.5), 0.0, -1.0])
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=0)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    # the float64 reference (autograd through torch.clamp) agrees on value and gradient
    logp_ref = (old.double() + lr.double()).requires_grad_()
    ref, _ = clipped_policy_loss_ref(logp_ref, old.double(), adv.double(), mask)
    (g_ref,) = torch.autograd.grad(ref.sum(), logp_ref)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=0)


def test_gspo_sequence_log_ratio_clamp_edges():
    """GSPO's sequence log-ratio is clamped to [-20, 10]: exp(10) already exceeds every clip range."""
    mean_lr = torch.tensor([9.5, 12.0, -25.0, 1e30])
    adv_seq = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(8)
    logp = mean_lr.repeat_interleave(2).clone().requires_grad_()
    adv = adv_seq.repeat_interleave(2)
    mask = torch.ones(8, dtype=torch.bool)
    cu = torch.tensor([0, 2, 4, 6, 8])
    loss, _ = gspo_policy_loss(logp, old, adv, mask, cu, eps_low=3e-4, eps_high=4e-4)
    e = math.exp
    want = torch.tensor([e(9.5), e(10.0), -e(-20.0), e(10.0)]).repeat_interleave(2)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    want_g = torch.tensor([e(9.5), 0.0, 0.0, 0.0]).repeat_interleave(2)
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=0)
    logp_ref = logp.detach().double().requires_grad_()
    ref, _ = gspo_policy_loss_ref(logp_ref, old.double(), adv.double(), mask, cu)
    (g_ref,) = torch.autograd.grad(ref.sum(), logp_ref)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=0)
