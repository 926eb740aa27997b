"""Benchmark fused_logprob_entropy (token logprob + full-vocabulary entropy from the LM head).

Providers (forward, backward and both; median time and peak extra memory; bf16 by default):
  ours        fused_logprob_entropy, Triton epilogues (logprob + entropy)
  ours_lp     the same with with_entropy=False (what Liger computes: comparable to `liger`)
  ours_torch  the same chunked algorithm with plain-torch epilogues (backend="torch")
  ours_tokens the design alternative: backward in token chunks (chunk_size = the forward's chunk)
              over the whole vocabulary (vocab_chunk_size = V) instead of vocabulary slices, so
              d weight needs a [V, D] fp32 accumulator
  ours_loss   grpo_kernels.fused_token_loss: the same loss sum(g_lp*logprob + g_ent*entropy) with the
              gradients made inside the forward (3 GEMMs, no recompute; its `fwd` holds all the work
              and its `bwd` is two scalings)
  naive       materialized logits: (h @ W.T).float() -> log_softmax -> gather + entropy
  compiled    torch.compile of per-chunk naive math, chunks checkpointed (recomputed in backward)
  liger       Liger-Kernel fused linear cross entropy (when importable). It has no entropy and no
              temperature, and computes its gradients inside the forward, so only `both` is
              comparable, and only with ours_lp.
The roofline is 6*N*D*V flops (fwd 2, bwd 4) at the bf16 rate of a plain torch.matmul measured in
the same run on [min(N, 4096), D] x [D, V]; `eff` = roofline time / measured time. Our design runs a
4th GEMM (recompute in backward), so its ceiling is 0.75 for `both` and 0.67 for `bwd`.
`extra_mib` = peak minus the returned gradients (bwd, both); in bwd the peak is counted from after
the forward, so saved activations are not in it.

Run on a GPU:  python benchmarks/bench_logprob_entropy.py --quick
Writes benchmarks/results/logprob_entropy_<gpu>_<time>.json and .png, prints a table.

CPU smoke test of the script (numbers mean nothing; peak memory is not measured and reported as None):
    TRITON_INTERPRET=1 python benchmarks/bench_logprob_entropy.py --device cpu --n 64 --d 32 --v 257 \
        --reps 1 --providers ours ours_torch naive
The Triton providers (ours, ours_lp, ours_tokens, ours_loss) run on CPU only in the Triton interpreter, which must
be on before `grpo_kernels` is imported: the script sets nothing itself and exits with an error naming the fix
when it is off (ours_torch, naive and compiled need no interpreter). liger is CUDA-only: skipped on CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import (  # noqa: E402
    OOM, RESULTS_DIR, device_label, format_table, free_cuda_memory, matmul_tflops, measure,
    plot_bars, start_kernel_bench, write_json,
)
from grpo_kernels.logprob_entropy import default_chunk_size, fused_logprob_entropy  # noqa: E402
from grpo_kernels.token_loss import fused_token_loss  # noqa: E402

PROVIDERS = ["ours", "ours_lp", "ours_torch", "ours_tokens", "ours_loss", "naive", "compiled", "liger"]
MODES = ["fwd", "bwd", "both"]
FLOP_FACTOR = {"fwd": 2, "bwd": 4, "both": 6}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_PROVIDERS = ("ours", "ours_lp", "ours_tokens", "ours_loss")  # backend="triton": CUDA, or CPU under the interpreter
CUDA_ONLY = {"liger": "Liger-Kernel runs on CUDA only"}


def _naive_math(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != -100
    logprob = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid
    entropy = -(logp.exp() * logp).sum(dim=-1) * valid
    return logprob, entropy


def _compiled_chunked(compiled_chunk, hidden, weight, targets, temperature, chunk_size):
    outs = [
        torch.utils.checkpoint.checkpoint(compiled_chunk, hidden[s : s + chunk_size], weight,
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


def _fused_loss_forward(chunk_size, n_tokens, device):
    g = torch.Generator(device=device).manual_seed(1)
    g_lp = torch.randn(n_tokens, device=device, generator=g)
    g_ent = torch.randn(n_tokens, device=device, generator=g) * 1e-3

    def loss_fn(logprob, entropy, start, end):
        return (logprob * g_lp[start:end]).sum() + (entropy * g_ent[start:end]).sum()

    def forward(hidden, weight, targets, temperature):
        return fused_token_loss(hidden, weight, targets, loss_fn, temperature, chunk_size=chunk_size)[0]

    return forward


def make_forward(provider: str, chunk_size: int | None, n_tokens: int, vocab: int, device: str = "cuda"):
    """A callable (h, w, t, T) -> scalar loss whose backward exercises every gradient, or None."""
    if provider == "liger":
        return _liger_loss_fn()
    if provider == "ours_loss":
        return _fused_loss_forward(chunk_size, n_tokens, device)
    if provider == "naive":
        outputs = _naive_math
    elif provider == "compiled":
        chunk = chunk_size or default_chunk_size(n_tokens, vocab)
        # A fresh cache per shape: with dynamic=False every new shape recompiles, and past dynamo's
        # recompile limit (8 per function) it would silently run eager for the rest of the sweep.
        torch._dynamo.reset()
        compiled_chunk = torch.compile(_naive_math, dynamic=False)
        outputs = lambda h, w, t, T: _compiled_chunked(compiled_chunk, h, w, t, T, chunk)  # noqa: E731
    else:
        backend = "torch" if provider == "ours_torch" else "triton"
        with_entropy = provider != "ours_lp"
        chunk, vocab_chunk = chunk_size, None
        if provider == "ours_tokens":  # token blocks over the whole vocabulary: no vocabulary slices
            chunk, vocab_chunk = chunk_size or default_chunk_size(n_tokens, vocab), vocab
        outputs = lambda h, w, t, T: fused_logprob_entropy(  # noqa: E731
            h, w, t, T, with_entropy=with_entropy, chunk_size=chunk, vocab_chunk_size=vocab_chunk,
            backend=backend)
    use_entropy = provider != "ours_lp"

    def forward(hidden, weight, targets, temperature):
        logprob, entropy = outputs(hidden, weight, targets, temperature)
        # Upstream gradients of a GRPO loss are arbitrary per token; fixed random weights stand in.
        loss = (logprob * forward.g_lp).sum()
        return loss + (entropy * forward.g_ent).sum() if use_entropy else loss

    g = torch.Generator(device=device).manual_seed(1)
    forward.g_lp = torch.randn(n_tokens, device=device, generator=g)
    forward.g_ent = torch.randn(n_tokens, device=device, generator=g) * 1e-3
    return forward


def bench_shape(n, d, v, dtype, temperature, providers, modes, chunk_size, reps, gemm_tflops, device="cuda",
                warmup=2):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, d, device=device, generator=gen) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device=device, generator=gen) * d**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    targets[torch.rand(n, device=device, generator=gen) < 0.1] = -100
    # Gradients are outputs, not workspace: `extra_mib` subtracts them from the peak of bwd / both.
    grad_mib = (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
    rows = []
    for provider in providers:
        if device != "cuda" and provider in CUDA_ONLY:
            print(f"  {provider}: skipped on {device} ({CUDA_ONLY[provider]})")
            continue
        forward = make_forward(provider, chunk_size, n, v, device)
        if forward is None:
            print(f"  {provider}: not importable, skipped")
            continue
        for mode in modes:
            ms, peak_mib = _measure_mode(mode, forward, hidden, weight, targets, temperature, reps, device, warmup)
            roofline_ms = FLOP_FACTOR[mode] * n * d * v / (gemm_tflops * 1e12) * 1e3
            if peak_mib is None or peak_mib == OOM or mode == "fwd":
                extra_mib = peak_mib
            else:
                extra_mib = peak_mib - grad_mib
            rows.append({
                "provider": provider, "mode": mode, "N": n, "D": d, "V": v, "dtype": str(dtype).split(".")[-1],
                "temperature": temperature, "ms": ms, "peak_mib": peak_mib, "extra_mib": extra_mib,
                "roofline_ms": roofline_ms, "eff": roofline_ms / ms if ms != OOM else OOM,
            })
            peak_text = "n/a" if peak_mib is None else peak_mib if peak_mib == OOM else f"{peak_mib:.0f}MiB"
            print(f"  {provider:11s} {mode:4s} ms={ms if ms == OOM else f'{ms:.2f}'} peak={peak_text}", flush=True)
        hidden.grad = weight.grad = None
        free_cuda_memory()
    return rows


def _measure_mode(mode, forward, hidden, weight, targets, temperature, reps, device="cuda", warmup=2):
    """(ms, peak MiB) of the forward, the backward alone (forward untimed), or both.

    Gradients left by the previous call are dropped in the untimed setup: inside fn their release
    would lower the peak below the memory counted at the start (and subtract them twice in extra_mib)."""

    def clear_grads():
        hidden.grad = weight.grad = None

    def fresh_loss():
        clear_grads()
        return forward(hidden, weight, targets, temperature)

    if mode == "fwd":
        return measure(lambda _: forward(hidden, weight, targets, temperature), setup=clear_grads, reps=reps,
                       warmup=warmup, device=device)
    if mode == "bwd":
        return measure(lambda loss: loss.backward(), setup=fresh_loss, reps=reps, warmup=warmup,
                       device=device)
    return measure(lambda _: forward(hidden, weight, targets, temperature).backward(), setup=clear_grads,
                   reps=reps, warmup=warmup, device=device)


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
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (after a first one)")
    parser.add_argument("--quick", action="store_true", help="N=4096, D=2048, V in {32000, 151936}")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: real numbers; cpu: smoke test of the script (perf_counter, no memory)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    for name in ("n", "d", "v"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} values must be >= 1, got {getattr(args, name)}")
    if args.reps < 1 or args.warmup < 0 or (args.chunk_size is not None and args.chunk_size < 1):
        parser.error(f"need --reps >= 1, --warmup >= 0, --chunk-size >= 1; got {args.reps}, {args.warmup}, "
                     f"{args.chunk_size}")
    if args.quick:
        args.n, args.d, args.v = [4096], [2048], [32000, 151936]
    args.providers = list(dict.fromkeys(args.providers))
    args.modes = list(dict.fromkeys(args.modes))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = start_kernel_bench("logprob_entropy", args, [p for p in args.providers if p in TRITON_PROVIDERS])
    if meta is None:
        return 2
    dtype = DTYPES[args.dtype]
    name = device_label(meta)
    print(f"# {name}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}")
    rows = []
    for n in args.n:
        for d in args.d:
            for v in args.v:
                gemm = matmul_tflops(min(n, 4096), d, v, dtype, device=args.device)
                free_cuda_memory()
                print(f"N={n} D={d} V={v} {args.dtype}: plain matmul {gemm:.3g} TFLOP/s", flush=True)
                shape_rows = bench_shape(n, d, v, dtype, args.temperature, args.providers, args.modes,
                                         args.chunk_size, args.reps, gemm, args.device, args.warmup)
                for r in shape_rows:
                    r["gemm_tflops"] = gemm
                rows.extend(shape_rows)
    meta["notes"] = ("liger: no entropy, no temperature, gradients computed in its forward; compare its "
                     "'both' with ours_lp. eff = (flops of the mode at the measured matmul rate) / time.")
    json_path = write_json("logprob_entropy", meta, rows, args.out_dir)
    print(format_table(rows, ["provider", "mode", "N", "D", "V", "ms", "peak_mib", "extra_mib", "eff"]))
    print(f"wrote {json_path}")
    both = [r for r in rows if r["mode"] == "both"]
    if not args.no_plot and both:
        plots = [("ms", "time, fwd+bwd (ms)")]
        if args.device == "cuda":  # no memory numbers on CPU
            plots.append(("extra_mib", "peak memory beyond inputs and grads, fwd+bwd (MiB)"))
        for value_key, ylabel in plots:
            png = plot_bars(both, json_path.with_name(json_path.stem + f"_{value_key}.png"),
                            group_key=lambda r: f"N{r['N']} D{r['D']} V{r['V']}", series=args.providers,
                            series_key="provider", value_key=value_key, ylabel=ylabel,
                            title=f"logprob+entropy, {name}, {args.dtype}, torch {meta['torch']}")
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
