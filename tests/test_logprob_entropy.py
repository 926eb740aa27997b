"""grpo_kernels.logprob_entropy vs the float64 materialized-logits reference: forward and both gradients."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_kernels import logprob_entropy as lpe
from grpo_kernels.logprob_entropy import backward_blocks, default_chunk_size, fused_logprob_entropy
from grpo_kernels.reference.logprob_entropy import logprob_entropy_reference

BACKENDS = ["triton", "torch"]  # conftest sets TRITON_INTERPRET=1 on CPU, so "triton" runs there

# (N, D, V, chunk_size, vocab_chunk_size, weight_scale): odd sizes; V below (100), at (512) and above
# (1031) the interpreter's 512-wide tile; chunk_size 16 forces 3 token chunks/blocks with a partial last
# one; vocab_chunk_size 300 forces 4 backward vocabulary slices (partial last, targets in every slice).
SHAPES = {
    "N1_D16_V100": (1, 16, 100, None, None, 0.3),
    "N37_D60_V1031_chunk16": (37, 60, 1031, 16, None, 0.3),
    "N37_D60_V1031_vslice300": (37, 60, 1031, None, 300, 0.3),
    "N37_D60_V1031_chunk16_vslice300": (37, 60, 1031, 16, 300, 0.3),
    "N50_D32_V512": (50, 32, 512, None, None, 0.5),
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
    n, d, v, chunk, vchunk, scale = SHAPES[shape]
    hidden, weight, targets = _make_inputs(n, d, v, scale)
    g_lp = torch.randn(n, dtype=torch.float64) if grads in ("both", "logprob") else None
    g_ent = torch.randn(n, dtype=torch.float64) if grads in ("both", "entropy") else None
    got = _run(fused_logprob_entropy, hidden, weight, targets, temperature, torch.float32, g_lp, g_ent,
               chunk_size=chunk, vocab_chunk_size=vchunk, backend=backend)
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
# Blocks: token blocks only (fp32 [V, D] d weight accumulator for 16-bit), vocabulary slices only
# (d weight written per slice, fp32 [N, D] d hidden accumulator), and both.
@pytest.mark.parametrize("blocks", [(16, None), (None, 300), (16, 300)], ids=["rows16", "cols300", "rows16-cols300"])
@pytest.mark.parametrize("backend,dtype,tol", [
    ("torch", torch.float64, torch.float64), ("triton", torch.float64, torch.float32),
    ("torch", torch.bfloat16, torch.bfloat16)], ids=["torch-fp64", "triton-fp64", "torch-bf16"])
def test_other_dtypes(backend, dtype, tol, blocks):
    """float64 through the torch path is exact to 1e-10; bf16 inputs vs float64 on the same rounded inputs."""
    hidden, weight, targets = _make_inputs(37, 60, 1031, 0.3)
    g_lp, g_ent = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    got = _run(fused_logprob_entropy, hidden, weight, targets, 0.6, dtype, g_lp, g_ent,
               chunk_size=blocks[0], vocab_chunk_size=blocks[1], backend=backend)
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
    from grpo_kernels.common import backend_summary, resolve_backend

    # "auto" on CPU is the torch path even with the interpreter on (an exported TRITON_INTERPRET=1
    # must not turn a CPU run into a 10x slower interpreter run); "triton" asks for the interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert backend_summary("auto", torch.device("cpu")) == {
        "lm_head": "torch", "policy_loss": "torch", "gspo_loss": "torch", "hidden_align": "torch"}
    assert backend_summary("triton", torch.device("cpu"))["lm_head"] == "triton-interpreter"
    with pytest.raises(ValueError, match="model.kernel_backend: backend must be one of"):
        backend_summary("cuda", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_logprob_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), backend="triton")


def test_default_chunk_size():
    assert default_chunk_size(10, 151936) == 10
    chunk = default_chunk_size(100_000, 151936)
    assert chunk == 1280 and chunk * 151936 * 4 <= lpe._WORKSPACE_BYTES  # 1280 = 768 MiB // (4 V) -> x128
    assert default_chunk_size(100_000, 32000) == 6272
    assert default_chunk_size(100_000, 10**7) == 128  # never below 128 rows (GEMM efficiency)


MIB = 1 << 20


@pytest.mark.parametrize("n,d,dtype,expected", [
    # The point: bf16, N=16384, D=4096, V=151936. One block of all tokens; d hidden fp32
    # accumulator 16384*4096*4 = 256 MiB; slices of (768-256) MiB // (16384 * (4 + 2)) -> 5376 columns.
    (16384, 4096, torch.bfloat16, (16384, 5376)),
    # N=32768: 512 MiB accumulator, 256 MiB left -> 1365 -> 1280 columns.
    (32768, 4096, torch.bfloat16, (32768, 1280)),
    # fp32: no accumulator (d hidden is the output), d logits overwrite the logits: 768 MiB // (16384*4).
    (16384, 4096, torch.float32, (16384, 12288)),
    # Few tokens: the whole vocabulary in one slice.
    (64, 4096, torch.bfloat16, (64, 151936)),
])
def test_backward_blocks(n, d, dtype, expected):
    rows, cols = backward_blocks(n, 151936, d, dtype)
    assert (rows, cols) == expected
    acc = rows * d * 4 if dtype == torch.bfloat16 else 0
    per_elem = 4 + (2 if dtype == torch.bfloat16 else 0)
    if cols < 151936:
        assert acc + rows * cols * per_elem <= lpe._WORKSPACE_BYTES


def test_backward_blocks_more_tokens_than_vocab():
    # N > V: an [N, D] accumulator would exceed a [V, D] one, so tokens are split into blocks.
    rows, cols = backward_blocks(1_000_000, 1000, 4096, torch.bfloat16)
    assert rows == (lpe._WORKSPACE_BYTES // 2) // (4096 * 4) // 128 * 128 and cols == 1000
    assert backward_blocks(100, 1000, 64, torch.bfloat16, chunk_size=7, vocab_chunk_size=33) == (7, 33)


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages created under the mode that are still alive (CPU stand-in for
    torch.cuda.max_memory_allocated): peak, and the largest single storage."""

    def __init__(self, external):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in external}
        self.refs, self.live, self.peak, self.largest = {}, 0, 0, 0

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key == 0 or key in self.external:
                continue
            if self.refs.get(key, 0) == 0:
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
            self.refs[key] = self.refs.get(key, 0) + 1
            weakref.finalize(t, self._release, key, nbytes)
        return out


def test_workspace_bounds_live_memory(monkeypatch):
    """With a 1 MiB workspace, forward + backward never hold more than the workspace plus the outputs
    and gradients, and never a tensor as large as the [N, V] logits (1.24 MB here)."""
    n, d, v = 300, 24, 1031
    monkeypatch.setattr(lpe, "_WORKSPACE_BYTES", MIB)
    hidden, weight, targets = _make_inputs(n, d, v, 0.3)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    # Forward: the 128-row minimum chunk (528 KB); backward: one block of 300 rows x 768 columns (922 KB).
    assert backward_blocks(n, v, d, torch.float32) == (n, 768)
    tracker = _LiveBytes([h, w, targets, g_lp, g_ent])
    with tracker:
        logprob, entropy = fused_logprob_entropy(h, w, targets, backend="triton")
        torch.autograd.backward([logprob, entropy], [g_lp, g_ent])
    outputs_and_grads = (h.numel() + w.numel()) * 4 + 8 * n * 4
    assert tracker.largest == n * 768 * 4 < n * v * 4
    assert tracker.peak <= MIB + outputs_and_grads + 16 * 1024, tracker.peak
    # The tracker does see a materialized [N, V]: the reference holds several.
    tracker = _LiveBytes([h, w, targets])
    with tracker:
        logprob_entropy_reference(h.detach(), w.detach(), targets, 1.0)
    assert tracker.largest >= n * v * 4


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
    (dict(vocab_chunk_size=2.5), ValueError, "vocab_chunk_size"),
    (dict(backend="cuda"), ValueError, "backend must be"),
], ids=["hidden3d", "D_mismatch", "dtype_mismatch", "int_hidden", "targets_len", "targets_float",
        "target_ge_V", "target_negative", "temp0", "temp_neg", "temp_nan", "chunk0", "vchunk_float", "bad_backend"])
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
@pytest.mark.parametrize("n,d", [(16384, 4096), (8192, 1024)], ids=["N16384_D4096", "N8192_D1024"])
def test_gpu_peak_memory_bounded(n, d):
    """The issue's bound: beyond inputs, outputs and the returned gradients, forward + backward at
    V=151936 (bf16) use at most the 768 MiB workspace plus allocator/cuBLAS slack, and under 1 GB."""
    v = 151936
    dev = torch.device("cuda")
    h = (torch.randn(n, d, device=dev) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device=dev) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device=dev)
    # Autotune the forward kernel for this V and create cuBLAS handles outside the measurement.
    logprob, entropy = fused_logprob_entropy(h[:8], w, t[:8])
    (logprob.sum() + entropy.sum()).backward()
    h.grad = w.grad = None
    del logprob, entropy
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logprob, entropy = fused_logprob_entropy(h, w, t)
    (logprob.sum() + entropy.sum()).backward()
    torch.cuda.synchronize()
    grads = h.numel() * 2 + w.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra <= lpe._WORKSPACE_BYTES + 64 * n + (64 << 20), extra
    assert extra <= 10**9


@pytest.mark.parametrize("with_entropy", [True, False])
def test_small_torch_problems_take_plain_autograd_with_the_same_result(monkeypatch, with_entropy):
    """The torch backend with default chunk sizes runs plain autograd over the [N, V] logits when they are at most
    PLAIN_MAX_LOGITS elements (faster on CPU), else the chunked algorithm: same values and gradients."""
    import grpo_kernels.logprob_entropy as le

    torch.manual_seed(1)
    n, d, v = 37, 24, 101
    h0, w0 = torch.randn(n, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    targets[[3, 20]] = -100
    g_lp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    out = {}
    for name, limit in (("plain", n * v), ("chunked", n * v - 1)):
        monkeypatch.setattr(le, "PLAIN_MAX_LOGITS", limit)
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp, ent = fused_logprob_entropy(h, w, targets, 0.7, backend="torch", with_entropy=with_entropy)
        ((lp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0)).backward()
        out[name] = (lp.detach(), ent.detach(), h.grad, w.grad)
    for a, b in zip(out["plain"], out["chunked"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert not with_entropy or out["plain"][1].abs().sum() > 0
