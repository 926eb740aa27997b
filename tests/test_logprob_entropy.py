"""kernels.logprob_entropy vs the float64 materialized-logits reference: forward and both gradients."""
import pytest
import torch

from kernels import logprob_entropy as lpe
from kernels.logprob_entropy import default_chunk_size, fused_logprob_entropy
from kernels.reference.logprob_entropy import logprob_entropy_reference

BACKENDS = ["triton", "torch"]  # conftest sets TRITON_INTERPRET=1 on CPU, so "triton" runs there

# (N, D, V, chunk_size, weight_scale): odd sizes; V below (100), at (512) and above (1031) the
# interpreter's 512-wide tile; chunk_size 16 forces 3 chunks with a partial last one.
SHAPES = {
    "N1_D16_V100": (1, 16, 100, None, 0.3),
    "N37_D60_V1031_chunk16": (37, 60, 1031, 16, 0.3),
    "N50_D32_V512": (50, 32, 512, None, 0.5),
}
# Tolerances per input dtype against the float64 reference (absolute, relative); the absolute one
# is multiplied by max(1, max|reference|). bf16: CPU GEMMs round logits (~15) to bf16 (ulp 0.06) and
# d logits are rounded to bf16 before the gradient GEMMs, as bf16 autograd would.
TOL = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10), torch.bfloat16: (1e-2, 2e-2)}


def _make_inputs(n, d, v, weight_scale, ignore_every=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * weight_scale
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore_every and n > 1:
        targets[1::ignore_every] = -100
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, temperature, dtype, g_lp, g_ent, **kwargs):
    """Forward + backward with upstream gradients g_lp, g_ent (None = output unused)."""
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    logprob, entropy = fn(h, w, targets, temperature, **kwargs)
    loss = 0.0
    if g_lp is not None:
        loss = loss + (logprob.double() * g_lp).sum()
    if g_ent is not None:
        loss = loss + (entropy.double() * g_ent).sum()
    loss.backward()
    return logprob.detach(), entropy.detach(), h.grad, w.grad


def _reference(hidden, weight, targets, temperature, g_lp, g_ent, dtype=torch.float64):
    # The reference sees the same (rounded) inputs as the kernel, computed in float64.
    return _run(logprob_entropy_reference, hidden.to(dtype).double(), weight.to(dtype).double(), targets,
                temperature, torch.float64, g_lp, g_ent)


def _assert_all_close(got, ref, dtype):
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("logprob", "entropy", "grad_hidden", "grad_weight"), got, ref):
        if b is None:
            assert a is None or not a.abs().any(), name
            continue
        assert a is not None, name
        scaled_atol = atol * max(1.0, b.abs().max().item()) if b.numel() else atol
        torch.testing.assert_close(a.double(), b, atol=scaled_atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("grads", ["both", "logprob", "entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_fp32(backend, shape, temperature, grads):
    n, d, v, chunk, scale = SHAPES[shape]
    hidden, weight, targets = _make_inputs(n, d, v, scale)
    g_lp = torch.randn(n, dtype=torch.float64) if grads in ("both", "logprob") else None
    g_ent = torch.randn(n, dtype=torch.float64) if grads in ("both", "entropy") else None
    got = _run(fused_logprob_entropy, hidden, weight, targets, temperature, torch.float32, g_lp, g_ent,
               chunk_size=chunk, backend=backend)
    ref = _reference(hidden, weight, targets, temperature, g_lp, g_ent)
    _assert_all_close(got, ref, torch.float32)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    ignored = targets == -100
    assert not got[0][ignored].any() and not got[1][ignored].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_logits(backend):
    """Logits of magnitude ~50: online logsumexp must not overflow; entropy near 0 stays accurate."""
    hidden, weight, targets = _make_inputs(37, 60, 1031, 6.0)
    g_lp, g_ent = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    got = _run(fused_logprob_entropy, hidden, weight, targets, 0.6, torch.float32, g_lp, g_ent,
               chunk_size=16, backend=backend)
    ref = _reference(hidden, weight, targets, 0.6, g_lp, g_ent)
    # fp32 logits of size ~80 carry ~1e-5 absolute rounding; scale the tolerance accordingly.
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=2e-3, rtol=1e-3)


# Triton bf16 runs only in the GPU tests: the interpreter's bf16 conversions are not faithful.
# The Triton epilogues compute in fp32 even for float64 inputs, hence the fp32 tolerance there.
@pytest.mark.parametrize("backend,dtype,tol", [
    ("torch", torch.float64, torch.float64), ("triton", torch.float64, torch.float32),
    ("torch", torch.bfloat16, torch.bfloat16)], ids=["torch-fp64", "triton-fp64", "torch-bf16"])
def test_other_dtypes(backend, dtype, tol):
    """float64 through the torch path is exact to 1e-10; bf16 inputs vs float64 on the same rounded inputs."""
    hidden, weight, targets = _make_inputs(37, 60, 1031, 0.3)
    g_lp, g_ent = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    got = _run(fused_logprob_entropy, hidden, weight, targets, 0.6, dtype, g_lp, g_ent,
               chunk_size=16, backend=backend)
    assert got[2].dtype == dtype and got[3].dtype == dtype
    ref = _reference(hidden, weight, targets, 0.6, g_lp, g_ent, dtype=dtype)
    _assert_all_close(got, ref, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    hidden, weight, targets = _make_inputs(9, 16, 100, 0.3)
    targets[:] = -100
    g = torch.randn(9, dtype=torch.float64)
    logprob, entropy, grad_h, grad_w = _run(fused_logprob_entropy, hidden, weight, targets, 1.0, torch.float32,
                                            g, g, backend=backend)
    for t in (logprob, entropy, grad_h, grad_w):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_entropy(backend):
    hidden, weight, targets = _make_inputs(37, 60, 1031, 0.3)
    g_lp = torch.randn(37, dtype=torch.float64)
    got = _run(fused_logprob_entropy, hidden, weight, targets, 0.6, torch.float32, g_lp, None,
               chunk_size=16, backend=backend, with_entropy=False)
    ref = _reference(hidden, weight, targets, 0.6, g_lp, None)
    assert torch.equal(got[1], torch.zeros(37))
    _assert_all_close((got[0], None, got[2], got[3]), (ref[0], None, ref[2], ref[3]), torch.float32)
    h = hidden.float().requires_grad_()
    _, entropy = fused_logprob_entropy(h, weight.float(), targets, with_entropy=False, backend=backend)
    assert not entropy.requires_grad


def test_unwritten_outputs_show_up(nan_empty):
    """With torch.empty NaN-filled, every output and gradient element must still be written."""
    hidden, weight, targets = _make_inputs(37, 60, 1031, 0.3)
    g_lp, g_ent = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    got = _run(fused_logprob_entropy, hidden, weight, targets, 1.0, torch.float32, g_lp, g_ent,
               chunk_size=16, backend="triton")
    assert all(torch.isfinite(t).all() for t in got)
    ref = _reference(hidden, weight, targets, 1.0, g_lp, g_ent)
    _assert_all_close(got, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_empty_batch(backend):
    hidden, weight, targets = _make_inputs(37, 60, 1031, 0.3)
    h = hidden.float().requires_grad_()
    logprob, entropy = fused_logprob_entropy(h, weight.float(), targets, backend=backend, chunk_size=16)
    (logprob.sum() + entropy.sum()).backward()
    h_ref = hidden.clone().requires_grad_()
    lp_ref, ent_ref = logprob_entropy_reference(h_ref, weight, targets)
    (lp_ref.sum() + ent_ref.sum()).backward()
    torch.testing.assert_close(h.grad.double(), h_ref.grad, atol=1e-4, rtol=1e-4)

    h0 = torch.zeros(0, 60, requires_grad=True)
    lp0, ent0 = fused_logprob_entropy(h0, weight.float(), targets[:0], backend=backend)
    assert lp0.shape == (0,) and ent0.shape == (0,)
    (lp0.sum() + ent0.sum()).backward()
    assert h0.grad.shape == (0, 60)


def test_backend_resolution(monkeypatch):
    assert lpe._resolve_backend("auto", torch.device("cpu")) == "triton"  # interpreter is on in tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert lpe._resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_logprob_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), backend="triton")


def test_default_chunk_size():
    assert default_chunk_size(10, 151936) == 10
    chunk = default_chunk_size(100_000, 151936)
    assert chunk % 128 == 0 and chunk * 151936 * 4 <= 1 << 30
    assert default_chunk_size(100_000, 32000) == 8192


_GOOD = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), targets=torch.tensor([0, -100, 4]))


@pytest.mark.parametrize("change,error,match", [
    (dict(hidden=torch.randn(3, 4, 1)), ValueError, "hidden must be a 2-D"),
    (dict(weight=torch.randn(5, 3)), ValueError, "disagree on D"),
    (dict(weight=torch.randn(5, 4, dtype=torch.float64)), TypeError, "must equal hidden dtype"),
    (dict(hidden=torch.ones(3, 4, dtype=torch.int32), weight=torch.ones(5, 4, dtype=torch.int32)),
     TypeError, "hidden dtype"),
    (dict(targets=torch.tensor([0, 1])), ValueError, r"targets must be a \[N\]=3"),
    (dict(targets=torch.tensor([0.0, 1.0, 2.0])), TypeError, "targets dtype"),
    (dict(targets=torch.tensor([0, 5, 1])), ValueError, r"found 5"),
    (dict(targets=torch.tensor([0, -1, 1])), ValueError, r"found -1"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(backend="cuda"), ValueError, "backend must be"),
], ids=["hidden3d", "D_mismatch", "dtype_mismatch", "int_hidden", "targets_len", "targets_float",
        "target_ge_V", "target_negative", "temp0", "temp_neg", "temp_nan", "chunk0", "bad_backend"])
def test_bad_inputs(change, error, match):
    kwargs = {**_GOOD, "temperature": 1.0, **change}
    with pytest.raises(error, match=match):
        fused_logprob_entropy(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets"),
                              kwargs.pop("temperature"), **kwargs)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_qwen_vocab_matches_reference(dtype):
    n, d, v = 512, 1024, 151936
    hidden, weight, targets = _make_inputs(n, d, v, 0.05)
    g_lp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    dev = torch.device("cuda")
    h, w, t = hidden.to(dev, dtype), weight.to(dev, dtype), targets.to(dev)
    got = _run(fused_logprob_entropy, h, w, t, 0.6, dtype, g_lp.to(dev), g_ent.to(dev), chunk_size=192)
    ref = _run(logprob_entropy_reference, h.double(), w.double(), t, 0.6, torch.float64,
               g_lp.to(dev), g_ent.to(dev))
    # bf16: d logits are rounded to bf16 before the d hidden / d weight GEMMs (as autograd would).
    atol, rtol = (1e-3, 1e-3) if dtype == torch.float32 else (2e-2, 2e-2)
    for name, a, b in zip(("logprob", "entropy", "grad_hidden", "grad_weight"), got, ref):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, atol=atol * max(1.0, scale), rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
def test_gpu_peak_memory_bounded():
    """Extra memory stays within the documented chunk bound, far below the [N, V] logits."""
    n, d, v, chunk = 8192, 1024, 151936, 1024
    dev = torch.device("cuda")
    h = (torch.randn(n, d, device=dev) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device=dev) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device=dev)
    # Autotune both kernels for this V outside the measurement (autotuning clones d logits).
    logprob, entropy = fused_logprob_entropy(h[:8], w, t[:8], chunk_size=chunk)
    (logprob.sum() + entropy.sum()).backward()
    h.grad = w.grad = None
    del logprob, entropy
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logprob, entropy = fused_logprob_entropy(h, w, t, chunk_size=chunk)
    (logprob.sum() + entropy.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = h.numel() * 2 + w.numel() * 2
    bound = chunk * v * (4 + 2) + v * d * 4 + grads + 64 * n + (64 << 20)
    assert extra <= bound, (extra, bound)
    assert extra < n * v * 2  # less than even bf16 [N, V] logits
