"""Benchmark fused_logprob_entropy (token logprob + full-vocabulary entropy from the LM head).

Providers (forward, backward and both; median time and peak extra memory; bf16 by default):
  ours        fused_logprob_entropy, Triton epilogues (logprob + entropy)
  ours_lp     the same with with_entropy=False (what Liger computes: comparable to `liger`)
  ours_torch  the same chunked algorithm with plain-torch epilogues (backend="torch")
  naive       materialized logits: (h @ W.T).float() -> log_softmax -> gather + entropy
  compiled    torch.compile of per-chunk naive math, chunks checkpointed (recomputed in backward)
  liger       Liger-Kernel fused linear cross entropy (when importable). It has no entropy and no
              temperature, and computes its gradients inside the forward, so only `both` is
              comparable, and only with ours_lp.
The roofline is 6*N*D*V flops (fwd 2, bwd 4) at the bf16 rate of a plain torch.matmul measured in
the same run on [min(N, 4096), D] x [D, V]; `eff` = roofline time / measured time. Our design runs a
4th GEMM (recompute in backward), so its ceiling for `both` is 0.75.

Run on a GPU:  python benchmarks/bench_logprob_entropy.py --quick
Writes benchmarks/results/logprob_entropy_<gpu>_<time>.json and .png, prints a table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import (  # noqa: E402
    OOM, RESULTS_DIR, format_table, free_cuda_memory, machine_info, matmul_tflops, measure, plot_bars, write_json,
)
from kernels.logprob_entropy import default_chunk_size, fused_logprob_entropy  # noqa: E402

PROVIDERS = ["ours", "ours_lp", "ours_torch", "naive", "compiled", "liger"]
MODES = ["fwd", "bwd", "both"]
FLOP_FACTOR = {"fwd": 2, "bwd": 4, "both": 6}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _naive_math(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != -100
    logprob = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid
    entropy = -(logp.exp() * logp).sum(dim=-1) * valid
    return logprob, entropy


_compiled_chunk = None


def _compiled_chunked(hidden, weight, targets, temperature, chunk_size):
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_naive_math, dynamic=False)
    outs = [
        torch.utils.checkpoint.checkpoint(_compiled_chunk, hidden[s : s + chunk_size], weight,
                                          targets[s : s + chunk_size], temperature, use_reentrant=False)
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _liger_loss_fn():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_module = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda hidden, weight, targets, temperature: loss_module(weight, hidden, targets)


def make_forward(provider: str, chunk_size: int | None, n_tokens: int, vocab: int):
    """A callable (h, w, t, T) -> scalar loss whose backward exercises every gradient, or None."""
    if provider == "liger":
        return _liger_loss_fn()
    if provider == "naive":
        outputs = _naive_math
    elif provider == "compiled":
        chunk = chunk_size or default_chunk_size(n_tokens, vocab)
        outputs = lambda h, w, t, T: _compiled_chunked(h, w, t, T, chunk)  # noqa: E731
    else:
        backend = "torch" if provider == "ours_torch" else "triton"
        with_entropy = provider != "ours_lp"
        outputs = lambda h, w, t, T: fused_logprob_entropy(  # noqa: E731
            h, w, t, T, with_entropy=with_entropy, chunk_size=chunk_size, backend=backend)
    use_entropy = provider != "ours_lp"

    def forward(hidden, weight, targets, temperature):
        logprob, entropy = outputs(hidden, weight, targets, temperature)
        # Upstream gradients of a GRPO loss are arbitrary per token; fixed random weights stand in.
        loss = (logprob * forward.g_lp).sum()
        return loss + (entropy * forward.g_ent).sum() if use_entropy else loss

    g = torch.Generator(device="cuda").manual_seed(1)
    forward.g_lp = torch.randn(n_tokens, device="cuda", generator=g)
    forward.g_ent = torch.randn(n_tokens, device="cuda", generator=g) * 1e-3
    return forward


def bench_shape(n, d, v, dtype, temperature, providers, modes, chunk_size, reps, gemm_tflops):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, d, device="cuda", generator=gen) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=gen) * d**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[torch.rand(n, device="cuda", generator=gen) < 0.1] = -100
    rows = []
    for provider in providers:
        forward = make_forward(provider, chunk_size, n, v)
        if forward is None:
            print(f"  {provider}: not importable, skipped")
            continue
        for mode in modes:
            ms, peak_mib = _measure_mode(mode, forward, hidden, weight, targets, temperature, reps)
            roofline_ms = FLOP_FACTOR[mode] * n * d * v / (gemm_tflops * 1e12) * 1e3
            rows.append({
                "provider": provider, "mode": mode, "N": n, "D": d, "V": v, "dtype": str(dtype).split(".")[-1],
                "temperature": temperature, "ms": ms, "peak_mib": peak_mib,
                "roofline_ms": roofline_ms, "eff": roofline_ms / ms if ms != OOM else OOM,
            })
            print(f"  {provider:10s} {mode:4s} ms={ms if ms == OOM else f'{ms:.2f}'} "
                  f"peak={peak_mib if peak_mib == OOM else f'{peak_mib:.0f}'}MiB", flush=True)
        hidden.grad = weight.grad = None
        free_cuda_memory()
    return rows


def _measure_mode(mode, forward, hidden, weight, targets, temperature, reps):
    """(ms, peak MiB) of the forward, the backward alone (forward untimed), or both."""

    def fresh_loss(_=None):
        hidden.grad = weight.grad = None
        return forward(hidden, weight, targets, temperature)

    if mode == "fwd":
        return measure(fresh_loss, reps=reps)
    if mode == "bwd":
        return measure(lambda loss: loss.backward(), setup=fresh_loss, reps=reps)
    return measure(lambda _: fresh_loss().backward(), reps=reps)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 32768], help="token counts N")
    parser.add_argument("--d", type=int, nargs="+", default=[2048, 4096], help="hidden sizes D")
    parser.add_argument("--v", type=int, nargs="+", default=[32000, 128256, 151936], help="vocabulary sizes V")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk for ours/compiled")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--quick", action="store_true", help="N=4096, D=2048, V in {32000, 151936}")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.d, args.v = [4096], [2048], [32000, 151936]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_logprob_entropy needs a CUDA GPU (use --help to see the options)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    meta = machine_info()
    meta.update(bench="logprob_entropy", args={k: str(v) for k, v in vars(args).items()})
    print(f"# {meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}")
    rows = []
    for n in args.n:
        for d in args.d:
            for v in args.v:
                gemm = matmul_tflops(min(n, 4096), d, v, dtype)
                free_cuda_memory()
                print(f"N={n} D={d} V={v} {args.dtype}: plain matmul {gemm:.0f} TFLOP/s", flush=True)
                shape_rows = bench_shape(n, d, v, dtype, args.temperature, args.providers, args.modes,
                                         args.chunk_size, args.reps, gemm)
                for r in shape_rows:
                    r["gemm_tflops"] = gemm
                rows.extend(shape_rows)
    meta["notes"] = ("liger: no entropy, no temperature, gradients computed in its forward; compare its "
                     "'both' with ours_lp. eff = (flops of the mode at the measured matmul rate) / time.")
    json_path = write_json("logprob_entropy", meta, rows, args.out_dir)
    print(format_table(rows, ["provider", "mode", "N", "D", "V", "ms", "peak_mib", "eff"]))
    print(f"wrote {json_path}")
    if not args.no_plot:
        for value_key, ylabel in (("ms", "time, fwd+bwd (ms)"), ("peak_mib", "peak extra memory, fwd+bwd (MiB)")):
            both = [r for r in rows if r["mode"] == "both"]
            if not both:
                break
            png = plot_bars(both, json_path.with_name(json_path.stem + f"_{value_key}.png"),
                            group_key=lambda r: f"N{r['N']} D{r['D']} V{r['V']}", series=args.providers,
                            series_key="provider", value_key=value_key, ylabel=ylabel,
                            title=f"logprob+entropy, {meta['gpu']}, {args.dtype}, torch {meta['torch']}")
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
