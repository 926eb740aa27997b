"""grpo_kernels.hidden_align against the explicit pairwise-cosine reference (float64)."""
import math

import pytest
import torch

from grpo_kernels.hidden_align import hidden_align_loss
from grpo_kernels.reference.hidden_align import hidden_align_loss_ref

BACKENDS = ["triton", "torch"]

SHAPES = [  # id, group sizes (shuffled ids), D
    ("one-pair", [2], 61),
    ("sizes-0-1-2-many", [1, 2, 7, 1, 3], 61),
    ("many-groups", [2, 5, 1, 4, 17, 3, 2], 130),
    ("wide-d", [3, 2], 1100),  # more than one D tile on GPU
    ("singletons-only", [1, 1, 1], 37),
]


def _rows(sizes, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n,), 1000 - 7 * k, dtype=torch.int64) for k, n in enumerate(sizes)])
    perm = torch.randperm(ids.numel(), generator=g)  # unsorted, non-contiguous groups
    ids = ids[perm]
    base = torch.randn(len(sizes), d, generator=g, dtype=torch.float64)
    # rows share a group direction plus noise, so cosines are spread rather than all ~0
    group_index = {1000 - 7 * k: k for k in range(len(sizes))}
    idx = torch.tensor([group_index[int(i)] for i in ids])
    h = base[idx] + 0.8 * torch.randn(ids.numel(), d, generator=g, dtype=torch.float64)
    return h.to(dtype), ids


# fp32 kernels against the fp64 reference; fp64 inputs are still reduced in fp32.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-5)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case_id, sizes, d", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_reference(case_id, sizes, d, dtype, tol, backend, nan_empty):
    h, ids = _rows(sizes, d, dtype=dtype)
    h.requires_grad_()
    loss, mean_cos = hidden_align_loss(h, ids, backend=backend)
    h_ref = h.detach().double().requires_grad_()
    ref, ref_cos = hidden_align_loss_ref(h_ref, ids)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and mean_cos.dim() == 0
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(mean_cos.double(), ref_cos, rtol=tol, atol=tol)
    grad_out = torch.randn((), dtype=torch.float64) + 2.0
    (g,) = torch.autograd.grad(loss, h, grad_out.float())
    (g_ref,) = torch.autograd.grad(ref, h_ref, grad_out)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)
    if case_id == "singletons-only":
        assert float(loss.detach()) == 0.0 and bool((g == 0).all())


def test_multiple_d_tiles(monkeypatch):
    # On CPU the interpreter uses one wide tile; force 16-wide tiles (61 = 3 * 16 + 13) to cover the D loops.
    import grpo_kernels.hidden_align as mod

    monkeypatch.setattr(mod, "_block_d", lambda d: 16)
    h, ids = _rows([3, 1, 20], 61, seed=5)
    h.requires_grad_()
    loss, _ = hidden_align_loss(h, ids, backend="triton")
    h_ref = h.detach().double().requires_grad_()
    ref, _ = hidden_align_loss_ref(h_ref, ids)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(loss, h)
    (g_ref,) = torch.autograd.grad(ref, h_ref)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_cases(backend):
    # orthogonal pair -> cos 0, loss 1; parallel pair (any scale) -> cos 1, loss 0; antiparallel -> cos -1
    h = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    loss, cos = hidden_align_loss(h, torch.tensor([4, 4]), backend=backend)
    assert math.isclose(float(loss.detach()), 1.0, abs_tol=1e-6) and math.isclose(float(cos), 0.0, abs_tol=1e-6)
    h = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [-1.0, -2.0, -3.0], [0.0, 0.0, 5.0]])
    loss, cos = hidden_align_loss(h, torch.tensor([9, 9, 3, 3]), backend=backend)
    c2 = -3.0 / math.sqrt(14.0)  # cos((-1,-2,-3), (0,0,5))
    assert math.isclose(float(cos), (1.0 + c2) / 2, abs_tol=1e-6)
    assert math.isclose(float(loss.detach()), ((1 - 1.0) + (1 - c2)) / 2, abs_tol=1e-6)
    # three unit vectors at 120 degrees in a plane: every pair has cos -1/2
    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    h = torch.stack([ang.cos(), ang.sin()], 1)
    loss, cos = hidden_align_loss(h, torch.zeros(3, dtype=torch.int64), backend=backend)
    assert math.isclose(float(cos), -0.5, abs_tol=1e-6) and math.isclose(float(loss.detach()), 1.5, abs_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_no_valid_group(backend):
    h = torch.zeros(0, 8, requires_grad=True)
    loss, cos = hidden_align_loss(h, torch.zeros(0, dtype=torch.int64), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(cos) == 0.0 and h.grad.shape == (0, 8)
    h = torch.randn(3, 8, requires_grad=True)
    loss, cos = hidden_align_loss(h, torch.tensor([1, 2, 3]), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((h.grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_row_uses_eps(backend):
    h, ids = _rows([4], 61)
    h[1] = 0.0  # a zero row: u = 0, cosines with it are 0 in the pairwise form too
    h.requires_grad_()
    loss, _ = hidden_align_loss(h, ids, backend=backend)
    h_ref = h.detach().double().requires_grad_()
    ref, _ = hidden_align_loss_ref(h_ref, ids)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(loss, h)
    (g_ref,) = torch.autograd.grad(ref, h_ref)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-4 * float(g_ref.abs().max()))


def test_bf16_input():
    h, ids = _rows([3, 5], 64, dtype=torch.bfloat16)
    h.requires_grad_()
    loss, _ = hidden_align_loss(h, ids, backend="triton")
    (g,) = torch.autograd.grad(loss, h)
    ref, _ = hidden_align_loss(h.detach().float(), ids, backend="torch")
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_gradient_descent_raises_cosine():
    h, ids = _rows([4, 3], 16, seed=3)
    h.requires_grad_()
    before, cos0 = hidden_align_loss(h, ids, backend="triton")
    (g,) = torch.autograd.grad(before, h)
    after, cos1 = hidden_align_loss(h.detach() - 0.5 * g, ids, backend="triton")
    assert float(after) < float(before.detach()) and float(cos1) > float(cos0)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(3), torch.zeros(3, dtype=torch.int64)), "2-D float"),
    ((torch.zeros(3, 4), torch.zeros(3)), "group_ids must be an int64"),
    ((torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64)), "group_ids must be an int64"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        hidden_align_loss(*args)


@pytest.mark.gpu
def test_cuda_kernel_matches_reference():
    h, ids = _rows([2, 9, 1, 33, 4], 4099)  # D spans several GPU tiles
    h = h.cuda().requires_grad_()
    loss, cos = hidden_align_loss(h, ids.cuda(), backend="triton")
    (g,) = torch.autograd.grad(loss, h)
    h_ref = h.detach().cpu().double().requires_grad_()
    ref, ref_cos = hidden_align_loss_ref(h_ref, ids)
    (g_ref,) = torch.autograd.grad(ref, h_ref)
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.cpu().double(), g_ref, rtol=1e-4, atol=1e-6)
