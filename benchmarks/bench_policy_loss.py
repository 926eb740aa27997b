"""Benchmark the fused clipped policy loss (+ NSR) and Hidden-Align against plain PyTorch and torch.compile.

Forward, backward (forward untimed) and both; median time, peak extra memory and effective bandwidth.
  policy_loss   token-level clipped-ratio loss over N fp32 tokens (docs/algorithms.md §3), NSR off and `scaled`
    ours        grpo_kernels.clipped_policy_loss, backend="triton": one fused sweep writes the loss and
                d loss / d logprob; backward only multiplies by the upstream gradient
    ours_torch  the same function with backend="torch" (plain-torch ops, Philox in torch)
    torch       grpo_kernels.reference.clipped_policy_loss_ref, autograd through the formulas; NSR's uniforms
                come from philox_uniform outside the timing, so this peer does not pay for the RNG
    compile     torch.compile of that reference (a fresh dynamo cache per shape)
  hidden_align  Hidden-Align loss over [M, D] bf16 anchor states in M/8 groups (docs/algorithms.md §4)
    ours, ours_torch  grpo_kernels.hidden_align_loss with backend "triton" / "torch"
    torch       grpo_kernels.reference.hidden_align_loss_ref(h.float(), ...): explicit pairwise cosines,
                a Python loop over groups. `compile` is not run for it: the loop iterates over
                torch.unique(...).tolist() with data-dependent shapes, so there is no graph to compile.
`gbs` = the bytes the fused op must move / time, the same byte count for every provider:
policy_loss fwd reads logprob, old_logprob, advantages (fp32) and the bool mask and writes loss and
d logprob (fp32): 21 B/token; bwd reads the upstream grad and d logprob and writes the grad: 12 B/token.
hidden_align fwd reads h (bf16), bwd reads h and writes d h. `bw_util` = gbs / the measured bandwidth
of a large device-to-device clone (the practical peak); the nominal HBM peak is in the JSON meta.

Run on a GPU:   python benchmarks/bench_policy_loss.py            (full sweep)
                python benchmarks/bench_policy_loss.py --smoke    (tiny sizes)
Writes benchmarks/results/policy_loss_<gpu>_<time>.json and .png, prints a table.

CPU smoke test of the script (numbers mean nothing; peak memory is not measured and reported as None):
    TRITON_INTERPRET=1 python benchmarks/bench_policy_loss.py --device cpu --sizes 300 --align-shapes 16x8 \
        --reps 1 --warmup 0          (--smoke sizes take about a minute in the interpreter)
The `ours` provider runs Triton kernels, which on CPU run only in the Triton interpreter; it must be on
before `grpo_kernels` is imported, so the script sets nothing itself and exits with an error naming the fix
when it is off (ours_torch, torch and compile need no interpreter).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import (  # noqa: E402
    OOM, RESULTS_DIR, device_label, format_table, free_cuda_memory, measure, time_ms,
    start_kernel_bench, write_json,
)

OPS = ["policy_loss", "hidden_align"]
PROVIDERS = ["ours", "ours_torch", "torch", "compile"]
MODES = ["fwd", "bwd", "both"]
NSR_RULES = ["off", "scaled", "band"]
TRITON_PROVIDERS = ("ours",)  # backend="triton": CUDA, or CPU under the interpreter
# Nominal HBM bandwidth in GB/s, matched in order against torch.cuda.get_device_name().
NOMINAL_BW_GBS = [("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0),
                  ("A100 80GB PCIe", 1935.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0)]
POLICY_BYTES_PER_TOKEN = {"fwd": 4 * 3 + 1 + 4 * 2, "bwd": 4 * 3}
POLICY_BYTES_PER_TOKEN["both"] = POLICY_BYTES_PER_TOKEN["fwd"] + POLICY_BYTES_PER_TOKEN["bwd"]
ALIGN_BYTES_PER_ELEMENT = {"fwd": 2, "bwd": 2 * 2, "both": 2 * 3}  # bf16 h read; h read + d h written
SMOKE_SIZES, SMOKE_ALIGN = [4096, 37_000], [(64, 61)]


def copy_bandwidth_gbs(device: str, reps: int = 10) -> float:
    """Achieved GB/s of a large clone on `device` (read + write): 1 GiB on CUDA, 64 MiB on CPU."""
    x = torch.empty(2**28 if device == "cuda" else 2**24, dtype=torch.float32, device=device)
    ms = time_ms(lambda _: x.clone(), warmup=2, reps=reps, device=device)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def nominal_bandwidth_gbs(gpu: str | None) -> float | None:
    return next((bw for key, bw in NOMINAL_BW_GBS if gpu and key in gpu), None)


def _compile_fresh(fn):
    # A fresh dynamo cache per shape: every shape compiles once, statically, and the sweep never reaches
    # dynamo's recompile limit, past which it would silently run eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def policy_loss_impls(n: int, nsr: str, providers, device: str):
    """{provider: (forward() -> per-token loss [N], logprob leaf, upstream grad [N])} for one shape."""
    from grpo_kernels import policy_loss as pl
    from grpo_kernels.reference.policy_loss import clipped_policy_loss_ref

    gen = torch.Generator(device="cpu").manual_seed(0)
    old = -torch.rand(n, generator=gen) * 3
    logprob = (old + torch.randn(n, generator=gen) * 0.3).to(device).requires_grad_()
    old, adv = old.to(device), torch.randn(n, generator=gen).to(device)
    mask = (torch.rand(n, generator=gen) > 0.1).to(device)
    grad = torch.randn(n, generator=gen).to(device)
    clip = dict(eps_low=0.2, eps_high=0.28, nsr=nsr)
    u = pl.philox_uniform(0, torch.arange(n, device=device)) if nsr != "off" else None  # = ours with seed 0

    impls = {}
    for provider in providers:
        if provider in ("ours", "ours_torch"):
            backend = "triton" if provider == "ours" else "torch"
            impls[provider] = lambda b=backend: pl.clipped_policy_loss(logprob, old, adv, mask, seed=0, backend=b,
                                                                       **clip)[0]
        elif provider == "torch":
            impls[provider] = lambda: clipped_policy_loss_ref(logprob, old, adv, mask, u, **clip)[0]
        elif provider == "compile":
            compiled = _compile_fresh(clipped_policy_loss_ref)
            impls[provider] = lambda c=compiled: c(logprob, old, adv, mask, u, **clip)[0]
    return impls, logprob, grad


def hidden_align_impls(m: int, d: int, groups: int, providers, device: str):
    """{provider: forward() -> scalar loss}, the bf16 [M, D] leaf, and the skipped providers with reasons."""
    from grpo_kernels.hidden_align import hidden_align_loss
    from grpo_kernels.reference.hidden_align import hidden_align_loss_ref

    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(m, d, generator=gen).to(device=device, dtype=torch.bfloat16).requires_grad_()
    group_ids = torch.randint(0, groups, (m,), generator=gen).to(device)
    impls, skipped = {}, {}
    for provider in providers:
        if provider in ("ours", "ours_torch"):
            backend = "triton" if provider == "ours" else "torch"
            impls[provider] = lambda b=backend: hidden_align_loss(hidden, group_ids, backend=b)[0]
        elif provider == "torch":
            impls[provider] = lambda: hidden_align_loss_ref(hidden.float(), group_ids)[0]
        else:
            skipped[provider] = "the reference loops over groups with data-dependent shapes"
    return impls, hidden, skipped


def measure_modes(forward, leaf, grad, modes, reps: int, warmup: int, device: str) -> dict:
    """{mode: (ms, peak MiB)} for the forward, the backward alone (forward in the untimed setup), both."""
    out = {}
    for mode in modes:
        if mode == "fwd":
            out[mode] = measure(lambda _: forward(), reps=reps, warmup=warmup, device=device)
        elif mode == "bwd":
            out[mode] = measure(lambda loss: torch.autograd.grad(loss, leaf, grad), setup=forward, reps=reps,
                                warmup=warmup, device=device)
        else:
            out[mode] = measure(lambda _: torch.autograd.grad(forward(), leaf, grad), reps=reps, warmup=warmup,
                                device=device)
    return out


def _row(base: dict, mode: str, ms, peak, nbytes: int, copy_bw: float) -> dict:
    gbs = nbytes / (ms * 1e-3) / 1e9 if ms != OOM else OOM
    return {**base, "mode": mode, "ms": ms, "peak_mib": peak, "gbs": gbs,
            "bw_util": gbs / copy_bw if gbs != OOM else OOM}


def _log(row: dict) -> None:
    peak = row["peak_mib"]
    peak_text = "n/a" if peak is None else peak if peak == OOM else f"{peak:.1f}MiB"
    ms = row["ms"] if row["ms"] == OOM else f"{row['ms']:.3f}"
    print(f"  {row['op']:12s} {row['shape']:>14s} {row['provider']:10s} {row['mode']:4s} ms={ms} peak={peak_text}",
          flush=True)


def bench_policy_loss(n, nsr, providers, modes, reps, warmup, device, copy_bw) -> list[dict]:
    impls, logprob, grad = policy_loss_impls(n, nsr, providers, device)
    rows = []
    for provider, forward in impls.items():
        base = {"op": "policy_loss", "provider": provider, "shape": f"N={n}", "N": n, "nsr": nsr}
        for mode, (ms, peak) in measure_modes(forward, logprob, grad, modes, reps, warmup, device).items():
            rows.append(_row(base, mode, ms, peak, n * POLICY_BYTES_PER_TOKEN[mode], copy_bw))
            _log(rows[-1])
    free_cuda_memory()
    return rows


def bench_hidden_align(m, d, groups, providers, modes, reps, warmup, device, copy_bw) -> list[dict]:
    impls, hidden, skipped = hidden_align_impls(m, d, groups, providers, device)
    for provider, reason in skipped.items():
        print(f"  hidden_align: {provider} skipped ({reason})")
    rows = []
    for provider, forward in impls.items():
        base = {"op": "hidden_align", "provider": provider, "shape": f"{m}x{d}/{groups}", "M": m, "D": d,
                "groups": groups}
        for mode, (ms, peak) in measure_modes(forward, hidden, None, modes, reps, warmup, device).items():
            rows.append(_row(base, mode, ms, peak, m * d * ALIGN_BYTES_PER_ELEMENT[mode], copy_bw))
            _log(rows[-1])
    free_cuda_memory()
    return rows


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Forward + backward time of policy_loss against N, one line per provider (log-log); None if no rows."""
    rows = [r for r in rows if r["op"] == "policy_loss" and r["mode"] == "both" and r["ms"] != OOM]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nsr = "scaled" if any(r["nsr"] == "scaled" for r in rows) else rows[0]["nsr"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, provider in enumerate(dict.fromkeys(r["provider"] for r in rows)):
        points = sorted((r["N"], r["ms"]) for r in rows if r["provider"] == provider and r["nsr"] == nsr)
        ax.plot(*zip(*points), marker="o", color=f"C{j}", label=provider)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title(f"clipped policy loss, NSR {nsr}; {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _align_shape(text: str) -> tuple[int, int]:
    try:
        m, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxD (e.g. 1024x4096), got {text!r}") from None
    if m < 1 or d < 1:
        raise argparse.ArgumentTypeError(f"M and D must be >= 1, got {text!r}")
    return m, d


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2**16, 2**18, 2**20, 2**22, 2**24],
                        help="token counts N for policy_loss")
    parser.add_argument("--nsr", nargs="+", choices=NSR_RULES, default=["off", "scaled"], help="NSR rules")
    parser.add_argument("--align-shapes", type=_align_shape, nargs="+",
                        default=[(256, 2048), (1024, 4096), (4096, 4096)], help="hidden_align MxD (groups = M/8)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny sizes: N in {SMOKE_SIZES}, hidden_align {SMOKE_ALIGN[0][0]}x{SMOKE_ALIGN[0][1]}")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (after a first one)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: real numbers; cpu: smoke test of the script (perf_counter, no memory)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if min(args.sizes) < 1 or args.reps < 1 or args.warmup < 0:
        parser.error(f"need --sizes >= 1, --reps >= 1, --warmup >= 0; got {args.sizes}, {args.reps}, {args.warmup}")
    if args.smoke:
        args.sizes, args.align_shapes = list(SMOKE_SIZES), list(SMOKE_ALIGN)
    args.providers = [p for p in dict.fromkeys(args.providers) if not (args.no_compile and p == "compile")]
    args.modes, args.nsr = list(dict.fromkeys(args.modes)), list(dict.fromkeys(args.nsr))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = start_kernel_bench("policy_loss", args, [p for p in args.providers if p == "ours"])
    if meta is None:
        return 2
    name = device_label(meta)
    copy_bw = copy_bandwidth_gbs(args.device)
    free_cuda_memory()  # the 2 GiB of the copy test
    meta.update(copy_bw_gbs=copy_bw,
                nominal_bw_gbs=nominal_bandwidth_gbs(meta["gpu"]) if args.device == "cuda" else None)
    nominal = meta["nominal_bw_gbs"]
    print(f"# {name}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}  "
          f"copy {copy_bw:.0f} GB/s  nominal {'-' if nominal is None else f'{nominal:.0f}'} GB/s", flush=True)

    rows = []
    if "policy_loss" in args.ops:
        for n in args.sizes:
            for nsr in args.nsr:
                rows += bench_policy_loss(n, nsr, args.providers, args.modes, args.reps, args.warmup, args.device,
                                          copy_bw)
    if "hidden_align" in args.ops:
        for m, d in args.align_shapes:
            rows += bench_hidden_align(m, d, max(m // 8, 1), args.providers, args.modes, args.reps, args.warmup,
                                       args.device, copy_bw)
    meta["notes"] = ("gbs = bytes the fused op must move / time (same bytes for every provider); bw_util = gbs / "
                     "copy_bw_gbs. torch: NSR uniforms precomputed, untimed.")
    json_path = write_json("policy_loss", meta, rows, args.out_dir)
    print(format_table(rows, ["op", "shape", "nsr", "provider", "mode", "ms", "peak_mib", "gbs", "bw_util"]))
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = plot(rows, json_path.with_suffix(".png"), f"{name}, torch {meta['torch']}")
        if png is not None:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
