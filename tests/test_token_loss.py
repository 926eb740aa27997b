"""grpo_kernels.token_loss (3-GEMM loss-fused LM head) vs autograd through the float64 materialized reference."""
import pytest
import torch

from grpo_kernels.reference.logprob_entropy import logprob_entropy_reference
from grpo_kernels.token_loss import fused_token_loss

BACKENDS = ["triton", "torch"]  # conftest sets TRITON_INTERPRET=1 on CPU, so "triton" runs there

# (N, D, V, chunk_size): odd sizes, one chunk and several with a partial last one.
SHAPES = {
    "N1_D16_V100": (1, 16, 100, None),
    "N37_D60_V1031_chunk16": (37, 60, 1031, 16),
    "N50_D32_V512": (50, 32, 512, None),
}
TOL = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10), torch.bfloat16: (2e-2, 3e-2)}


def _inputs(n, d, v, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.3
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[1::4] = -100
    old_logprob = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3 - 6.5
    advantages = torch.randn(n, generator=gen, dtype=torch.float64)
    token_weight = torch.rand(n, generator=gen, dtype=torch.float64) / n
    return hidden, weight, targets, (old_logprob, advantages, token_weight)


def _grpo_terms(logprob, entropy, old_logprob, advantages, token_weight):
    """Per-token clipped-ratio loss (eps 0.2 / 0.28) minus an entropy bonus, times fixed weights."""
    ratio = torch.exp(logprob - old_logprob)
    clipped = torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.28) * advantages)
    return (-clipped - 0.01 * entropy) * token_weight


def _loss_fn(consts):
    def loss_fn(logprob, entropy, start, end):
        parts = [c[start:end].to(logprob.dtype) for c in consts]
        return _grpo_terms(logprob, entropy, *parts).sum()
    return loss_fn


def _reference(hidden, weight, targets, temperature, consts, dtype, upstream):
    h = hidden.to(dtype).double().clone().requires_grad_()
    w = weight.to(dtype).double().clone().requires_grad_()
    logprob, entropy = logprob_entropy_reference(h, w, targets, temperature)
    loss = _grpo_terms(logprob, entropy, *consts).sum()
    (loss * upstream).backward()
    return loss.detach(), logprob.detach(), entropy.detach(), h.grad, w.grad


def _fused(hidden, weight, targets, temperature, consts, dtype, upstream, **kwargs):
    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    loss, logprob, entropy = fused_token_loss(h, w, targets, _loss_fn(consts), temperature, **kwargs)
    (loss * upstream).backward()
    assert not logprob.requires_grad and not entropy.requires_grad
    return loss.detach(), logprob, entropy, h.grad, w.grad


def _assert_close(got, ref, dtype):
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("loss", "logprob", "entropy", "grad_hidden", "grad_weight"), got, ref):
        assert a.dtype == (dtype if name.startswith("grad") else (torch.float64 if dtype == torch.float64
                                                                   else torch.float32)), name
        scaled = atol * max(1.0, b.abs().max().item()) if b.numel() else atol
        torch.testing.assert_close(a.double(), b, atol=scaled, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_fp32(backend, shape, temperature):
    n, d, v, chunk = SHAPES[shape]
    hidden, weight, targets, consts = _inputs(n, d, v)
    got = _fused(hidden, weight, targets, temperature, consts, torch.float32, 2.5, chunk_size=chunk, backend=backend)
    ref = _reference(hidden, weight, targets, temperature, consts, torch.float32, 2.5)
    _assert_close(got, ref, torch.float32)
    ignored = targets == -100
    assert not got[3][ignored].any()  # no gradient through ignored rows, whatever loss_fn did with them


@pytest.mark.parametrize("fp32_acc", [True, False], ids=["fp32acc", "bf16acc"])
def test_bf16_and_fp64(fp32_acc):
    hidden, weight, targets, consts = _inputs(37, 60, 1031)
    for dtype in (torch.float64, torch.bfloat16):
        got = _fused(hidden, weight, targets, 0.6, consts, dtype, -1.3, chunk_size=16, backend="torch",
                     fp32_grad_weight_accumulator=fp32_acc)
        ref = _reference(hidden, weight, targets, 0.6, consts, dtype, -1.3)
        _assert_close(got, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_fused_logprob_entropy_path(backend):
    """Same loss and gradients as fused_logprob_entropy + the loss in plain autograd (the 4-GEMM path)."""
    from grpo_kernels import fused_logprob_entropy

    hidden, weight, targets, consts = _inputs(37, 60, 1031)
    consts32 = [c.float() for c in consts]
    h1, w1 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logprob, entropy = fused_logprob_entropy(h1, w1, targets, 0.6, chunk_size=16, backend=backend)
    loss1 = _grpo_terms(logprob, entropy, *consts32).sum()
    loss1.backward()
    h2, w2 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss2, _, _ = fused_token_loss(h2, w2, targets, _loss_fn(consts32), 0.6, chunk_size=16, backend=backend)
    loss2.backward()
    torch.testing.assert_close(loss2, loss1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-6, rtol=1e-5)


def test_chunk_without_dependence_and_frozen_weight():
    """A chunk whose loss ignores logprob/entropy gets zero gradient; a frozen weight gets none."""
    hidden, weight, targets, _ = _inputs(37, 60, 1031)
    h, w = hidden.float().requires_grad_(), weight.float()

    def loss_fn(logprob, entropy, start, end):
        return logprob.sum() if start == 0 else torch.tensor(1.0)

    loss, logprob, _ = fused_token_loss(h, w, targets, loss_fn, chunk_size=16, backend="torch")
    loss.backward()
    assert torch.isclose(loss, logprob[:16].sum() + 2.0)
    assert not h.grad[16:].any() and h.grad[:16].abs().sum() > 0


def test_without_entropy_and_no_grad():
    hidden, weight, targets, consts = _inputs(37, 60, 1031)
    seen = []

    def loss_fn(logprob, entropy, start, end):
        seen.append(entropy.clone())
        return logprob.sum()

    with torch.no_grad():
        loss, logprob, entropy = fused_token_loss(hidden.float().requires_grad_(), weight.float(), targets,
                                                  loss_fn, with_entropy=False, chunk_size=16, backend="torch")
    assert not loss.requires_grad and not entropy.any() and all(not e.any() for e in seen)
    ref_lp, _ = logprob_entropy_reference(hidden, weight, targets)
    torch.testing.assert_close(loss.double(), ref_lp.sum(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("loss_fn,error,match", [
    (lambda lp, ent, s, e: lp, ValueError, "scalar tensor"),
    (lambda lp, ent, s, e: 1.0, ValueError, "scalar tensor"),
    ("not callable", TypeError, "loss_fn must be callable"),
], ids=["vector", "float", "not_callable"])
def test_bad_loss_fn(loss_fn, error, match):
    hidden, weight, targets, _ = _inputs(5, 8, 20)
    with pytest.raises(error, match=match):
        fused_token_loss(hidden.float().requires_grad_(), weight.float(), targets, loss_fn, backend="torch")


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_qwen_vocab_matches_reference(dtype):
    n, d, v = 512, 1024, 151936
    hidden, weight, targets, consts = _inputs(n, d, v)
    dev = torch.device("cuda")
    hidden, weight, targets = hidden.to(dev), weight.to(dev) * 0.2, targets.to(dev)
    consts = [c.to(dev) for c in consts]
    got = _fused(hidden, weight, targets, 0.6, [c.float() for c in consts], dtype, 1.0, chunk_size=192)
    ref = _reference(hidden, weight, targets, 0.6, consts, dtype, 1.0)
    atol, rtol = (1e-3, 1e-3) if dtype == torch.float32 else (2e-2, 2e-2)
    for name, a, b in zip(("loss", "logprob", "entropy", "grad_hidden", "grad_weight"), got, ref):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, atol=atol * max(1.0, scale), rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")
