"""Benchmark: fused clipped policy loss (+ NSR) and Hidden-Align vs the PyTorch references and torch.compile.

GPU only for real numbers (CUDA). For each size it times forward, backward and forward+backward of
    ours      kernels.clipped_policy_loss (Triton, one fused sweep writing loss and d loss / d logprob)
    torch     kernels.reference.clipped_policy_loss_ref (autograd through the formulas; u from philox_uniform)
    compile   torch.compile of that reference
and reports time, peak extra memory and memory-bandwidth utilization of ours: bytes the fused op must move
(fp32 logprob, old_logprob, advantages, bool mask in; fp32 loss and dlogp out; backward reads grad and dlogp
and writes grad) divided by time, against the device's measured copy bandwidth (a large
device-to-device clone, the practical peak) and the nominal peak when the GPU is known.
Hidden-Align is timed the same way for [M, D] anchor states.

Writes JSON rows (GPU, torch/triton versions, commit, shapes) to benchmarks/results/bench_policy_loss_<gpu>.json
and a PNG plot next to it, and prints a table.
    python benchmarks/bench_policy_loss.py                  # full sweep on CUDA
    python benchmarks/bench_policy_loss.py --smoke          # tiny sizes; runs on CPU too (torch backend)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NOMINAL_BW_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # HBM peak, GB/s (SXM parts)


def _timeit(fn, device, warmup=3, iters=20) -> float:
    """Median milliseconds of fn()."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _peak_mem_mb(fn, device) -> float:
    import torch

    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs(device) -> float:
    """Achieved GB/s of a 1 GiB device clone (read + write)."""
    import torch

    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    ms = _timeit(lambda: x.clone(), device, warmup=2, iters=10)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "uncommitted"
    except Exception:
        return "unknown"


def bench_policy_loss(n: int, device, backend: str, nsr: str, use_compile: bool) -> list[dict]:
    import torch

    from kernels import policy_loss as pl
    from kernels.reference.policy_loss import clipped_policy_loss_ref

    g = torch.Generator(device="cpu").manual_seed(0)
    old = (-torch.rand(n, generator=g) * 3).to(device)
    logp = (old.cpu() + torch.randn(n, generator=g) * 0.3).to(device).requires_grad_()
    adv = torch.randn(n, generator=g).to(device)
    mask = (torch.rand(n, generator=g) > 0.1).to(device)
    grad = torch.randn(n, device=device)
    kw = dict(eps_low=0.2, eps_high=0.28, nsr=nsr)
    u = pl.philox_uniform(0, torch.arange(n, device=device)) if nsr != "off" else None

    def ours_fwd():
        return pl.clipped_policy_loss(logp, old, adv, mask, seed=0, backend=backend, **kw)[0]

    def ref_fwd():
        return clipped_policy_loss_ref(logp, old, adv, mask, u, **kw)[0]

    impls = {"ours": ours_fwd, "torch": ref_fwd}
    if use_compile:
        compiled = torch.compile(clipped_policy_loss_ref)
        impls["compile"] = lambda: compiled(logp, old, adv, mask, u, **kw)[0]

    rows = []
    fwd_bytes = n * (4 * 3 + 1 + 4 * 2)  # 3 fp32 inputs + bool mask in; loss + dlogp out
    bwd_bytes = n * 4 * 3  # grad, dlogp in; grad out
    for name, fwd in impls.items():
        out = fwd()  # compile / warm up
        t_fwd = _timeit(fwd, device)
        t_bwd = _timeit(lambda o=out: torch.autograd.grad(o, logp, grad, retain_graph=True), device)
        t_both = _timeit(lambda f=fwd: torch.autograd.grad(f(), logp, grad), device)
        mem = _peak_mem_mb(lambda f=fwd: torch.autograd.grad(f(), logp, grad), device)
        rows.append(dict(op="policy_loss", impl=name, n=n, nsr=nsr, fwd_ms=t_fwd, bwd_ms=t_bwd,
                         fwd_bwd_ms=t_both, peak_mem_mb=mem,
                         fwd_gbs=fwd_bytes / (t_fwd * 1e-3) / 1e9,
                         fwd_bwd_gbs=(fwd_bytes + bwd_bytes) / (t_both * 1e-3) / 1e9))
    return rows


def bench_hidden_align(m: int, d: int, groups: int, device, backend: str, use_compile: bool) -> list[dict]:
    import torch

    from kernels.hidden_align import hidden_align_loss
    from kernels.reference.hidden_align import hidden_align_loss_ref

    h = torch.randn(m, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, groups, (m,), device=device)
    impls = {"ours": lambda: hidden_align_loss(h, ids, backend=backend)[0],
             "torch": lambda: hidden_align_loss_ref(h.float(), ids)[0]}
    if use_compile:
        compiled = torch.compile(hidden_align_loss_ref)
        impls["compile"] = lambda: compiled(h.float(), ids)[0]
    rows = []
    io_bytes = m * d * 2 * 3  # read h (forward), read h + write dh (backward); S is [groups, D], small
    for name, fwd in impls.items():
        fwd()
        t_both = _timeit(lambda f=fwd: torch.autograd.grad(f(), h), device)
        mem = _peak_mem_mb(lambda f=fwd: torch.autograd.grad(f(), h), device)
        rows.append(dict(op="hidden_align", impl=name, m=m, d=d, groups=groups, fwd_bwd_ms=t_both,
                         peak_mem_mb=mem, fwd_bwd_gbs=io_bytes / (t_both * 1e-3) / 1e9))
    return rows


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in sorted({r["impl"] for r in rows if r["op"] == "policy_loss"}):
        pts = [(r["n"], r["fwd_bwd_ms"]) for r in rows if r["op"] == "policy_loss" and r["impl"] == impl
               and r["nsr"] == "scaled"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title("clipped policy loss with NSR (scaled)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2**16, 2**18, 2**20, 2**22, 2**24],
                        help="token counts N for the policy loss")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no compile; runs on CPU")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    import torch
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_policy_loss needs a CUDA GPU (use --smoke for a CPU check of the script)")
    backend = "triton" if device.type == "cuda" else "torch"
    sizes = [4096, 37_000] if args.smoke else args.sizes
    use_compile = not (args.no_compile or args.smoke)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    copy_bw = copy_bandwidth_gbs(device)
    nominal = next((v for k, v in NOMINAL_BW_GBS.items() if k in gpu), float("nan"))

    rows = []
    for n in sizes:
        for nsr in ("off", "scaled"):
            rows += bench_policy_loss(n, device, backend, nsr, use_compile)
    for m, d in ([(64, 61)] if args.smoke else [(256, 2048), (1024, 4096), (4096, 4096)]):
        rows += bench_hidden_align(m, d, max(m // 8, 1), device, backend, use_compile)
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, commit=_commit(),
                copy_bw_gbs=copy_bw, nominal_bw_gbs=nominal)
    for r in rows:
        r.update(meta)
        r["bw_util_copy"] = r["fwd_bwd_gbs"] / copy_bw if copy_bw == copy_bw else float("nan")

    print(f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | copy {copy_bw:.0f} GB/s "
          f"| nominal {nominal:.0f} GB/s")
    print(f"{'op':13} {'impl':8} {'shape':>16} {'nsr':6} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} "
          f"{'f+b GB/s':>9} {'%copy':>6} {'peak MB':>8}")
    for r in rows:
        shape = str(r["n"]) if r["op"] == "policy_loss" else f"{r['m']}x{r['d']}"
        print(f"{r['op']:13} {r['impl']:8} {shape:>16} {r.get('nsr', '-'):6} {r.get('fwd_ms', float('nan')):8.3f} "
              f"{r.get('bwd_ms', float('nan')):8.3f} {r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_gbs']:9.1f} "
              f"{100 * r['bw_util_copy']:6.1f} {r['peak_mem_mb']:8.1f}")

    tag = "".join(c if c.isalnum() else "_" for c in gpu).strip("_").lower()
    out = args.out or os.path.join(HERE, "results", f"bench_policy_loss_{tag}{'_smoke' if args.smoke else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    _plot(rows, out[:-5] + ".png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
