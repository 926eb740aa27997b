"""Benchmark: end-to-end GRPO steps of the real Trainer, time per phase, throughput, peak memory and MFU.

Drives `grpo_core.trainer.Trainer` (config from `load_config(None, overrides)`) for a few steps on synthetic
arithmetic prompts and reads its metrics.jsonl; nothing of the loop is re-implemented. Two probes are added
around the trainer's own methods: the verifier's `score` (timed, so verification is split out of the
rollout phase) and `update` (counts the tokens each step trains on). Checkpoint saving is switched off.

Per step:  generate = time/rollout_s - verify   (sampling with the torch engine)
           verify   = the verifier's score calls
           sync     = time/weight_sync_s        (trainer -> rollout engine weights)
           old_lp   = time/old_logprob_s        (packing + the no-grad old-logprob pass; ~0 on-policy)
           update   = time/update_s - old_lp    (forward + backward + optimizer steps)
MFU(update) = 6 * N * tokens * ppo_epochs / update / peak, N = parameters doing matmuls (embedding table
excluded unless tied to the LM head), tokens = prompt + response tokens trained on; attention's
quadratic term is left out, so this is a slight underestimate. Peak = the GPU's dense bf16 rate from the
table below (H100/H200/A100), else the measured torch.matmul rate.

GPU models are random-init with the real shapes (Qwen2.5-1.5B, Qwen3-4B; nothing downloaded) and the
project's tiny tokenizer (ids it does not know decode to nothing, so answers are never right and
advantages are 0: the work per step is the same, only the numbers are meaningless, which is fine for
timing). Responses of a random model almost never stop early, so every response has max_new_tokens tokens.

    python benchmarks/bench_e2e.py --models qwen2.5-1.5b qwen3-4b          # GPU
    python benchmarks/bench_e2e.py --cpu --steps 3                        # tiny model on CPU
Qwen3-4B under ZeRO-3 on one GPU needs ~16 bytes/param for weights, grads and Adam (64 GiB) plus the rollout
copy (8 GiB) and activations: on an 80 GB GPU add --set model.activation_checkpointing=true (and, if it still
runs out, --set deepspeed.offload_optimizer=true, which then times the offload too) or use fewer --num-layers.
A configuration that runs out of memory is recorded as an "OOM" row. Without flash-attn (the gpu extra),
packed micro-batches use SDPA with a block-diagonal mask; --set model.attn_backend=flash_attn uses it.

Each configuration runs in its own subprocess (one process group, one model per process); the parent writes
JSON {meta, rows} (machine, versions, commit) and a PNG of the phase times, and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import RESULTS_DIR, cpu_model, format_table, machine_info  # noqa: E402

# Architectures of the released checkpoints (their config.json), built random-init here.
MODELS = {
    "qwen2.5-1.5b": dict(family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen3-4b": dict(family="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6),
    # the CPU demo's model (configs/demo_cpu.yaml)
    "tiny": dict(family="qwen2", hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
}
# Dense bf16 tensor-core peak, TFLOP/s, by GPU name; the first matching entry wins (PCIe/NVL before SXM).
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("A100", 312.0)]
PHASES = ("generate_s", "verify_s", "weight_sync_s", "old_logprob_s", "update_s")


# --------------------------------------------------------------------------------------------- peak rate

def peak_tflops(device: str) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): the table for known GPUs, otherwise a measured matmul rate."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops, f"table: {key} dense bf16"
        from benchmarks.common import matmul_tflops

        return matmul_tflops(8192, 8192, 8192), "measured: bf16 torch.matmul 8192^3"
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.matmul(a, b)
    reps, t = 5, time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    seconds = (time.perf_counter() - t) / reps
    return 2 * 1024**3 / seconds / 1e12, f"measured: fp32 torch.matmul 1024^3 on {torch.get_num_threads()} threads"


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all unique ones, minus the embedding table unless it is tied to
    the LM head (a lookup costs no FLOPs; a tied table is the head's matmul weight)."""
    def numel(p) -> int:  # under ZeRO-3 a partitioned parameter is empty; ds_numel is its full size
        return int(getattr(p, "ds_numel", p.numel()))

    total = sum({id(p): numel(p) for p in model.parameters()}.values())
    if not model.args.tie_word_embeddings:
        total -= numel(model.model.embed_tokens.weight)
    return total


# --------------------------------------------------------------------------------------------- one run

def build_model_dir(out: Path, name: str, num_layers: int | None, device: str) -> Path:
    """Tokenizer + random-init weights of the named architecture in HF layout (bf16 on CUDA)."""
    import torch

    from grpo_core.model import CausalLM, ModelArgs
    from grpo_core.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(out)
    spec = dict(MODELS[name])
    spec.setdefault("vocab_size", tokenizer.vocab_size)
    if num_layers:
        spec["num_hidden_layers"] = num_layers
    args = ModelArgs(**spec, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = CausalLM.from_config(args, dtype=dtype, device=device, seed=0)
    model.save_pretrained(out)  # keeps the tokenizer files already in `out`
    del model
    return out


def trainer_overrides(a, model_dir: Path, out_dir: Path, device: str) -> list[str]:
    prompts = a.prompts
    return [
        f"model.path={model_dir}", "data.synthetic_kinds=[arith]", "data.synthetic_level=2",
        f"data.synthetic_train_size={max(256, prompts * (a.steps + 1))}", "data.synthetic_eval_size=0",
        "data.prompt_template={prompt}\n", f"rollout.group_size={a.group_size}",
        f"rollout.max_new_tokens={a.max_new_tokens}", f"rollout.max_batch_size={prompts * a.group_size}",
        "algorithm.dynamic_sampling=false", "warm_start.steps=0", f"trainer.max_steps={a.steps}",
        f"trainer.train_batch_prompts={prompts}", f"trainer.mini_batches={a.mini_batches}",
        f"trainer.ppo_epochs={a.ppo_epochs}", f"trainer.max_tokens_per_micro_batch={a.micro_batch_tokens}",
        f"trainer.device={device}", f"trainer.output_dir={out_dir}", "trainer.eval_every=0", "trainer.lr=1e-6",
        "checkpoint.save_every=0", "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
        *a.set,
    ]


class StepProbe:
    """Wraps the trainer's verifier and update (instance attributes, so the trainer's own code calls them) to
    time verification and count the tokens each step trains on."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.verify_s: dict[int, float] = {}
        self.tokens: dict[int, dict] = {}
        scorer, update = trainer.run.verifier, trainer.update
        score = scorer.score

        def timed_score(*args, **kwargs):
            t = time.perf_counter()
            try:
                return score(*args, **kwargs)
            finally:
                step = trainer.step + 1
                self.verify_s[step] = self.verify_s.get(step, 0.0) + time.perf_counter() - t

        def counted_update(groups, step):
            samples = [s for g in groups for s in g.samples]
            self.tokens[step] = {"prompt_tokens": sum(len(s.prompt_ids) for s in samples),
                                 "response_tokens": sum(len(s.response_ids) for s in samples),
                                 "sequences": len(samples)}
            return update(groups, step)

        scorer.score = timed_score
        trainer.update = counted_update
        trainer.save = lambda: None  # checkpoints would dominate (and fill the disk) at real sizes


def run_one(a, name: str, work: Path) -> dict:
    """Train a.steps steps of model `name` in this process; returns one result row."""
    import torch

    from grpo_core.config import load_config
    from grpo_core.trainer import Trainer

    device = "cpu" if a.cpu else "cuda"
    model_dir = build_model_dir(work / "model", name, a.num_layers, device)
    out_dir = work / "run"
    trainer = Trainer(load_config(None, trainer_overrides(a, model_dir, out_dir, device)))
    probe = StepProbe(trainer)
    n_params = matmul_params(trainer.run.policy)
    peak, peak_source = peak_tflops(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("phase") == "train"]
    per_step = []
    for r in steps:
        s, tok = r["step"], probe.tokens[r["step"]]
        verify = probe.verify_s.get(s, 0.0)
        row = {"step": s, "generate_s": r["time/rollout_s"] - verify, "verify_s": verify,
               "weight_sync_s": r["time/weight_sync_s"], "old_logprob_s": r["time/old_logprob_s"],
               "update_s": r["time/update_s"] - r["time/old_logprob_s"], **tok}
        row["step_s"] = sum(row[p] for p in PHASES)
        trained = (tok["prompt_tokens"] + tok["response_tokens"]) * a.ppo_epochs
        row["generate_tok_per_s"] = tok["response_tokens"] / max(row["generate_s"], 1e-9)
        row["update_tok_per_s"] = trained / max(row["update_s"], 1e-9)
        row["update_mfu"] = 6 * n_params * trained / max(row["update_s"], 1e-9) / (peak * 1e12)
        per_step.append(row)
    timed = per_step[a.warmup_steps:] or per_step  # the first steps carry compilation and allocator warm-up
    median = {k: statistics.median(r[k] for r in timed) for k in per_step[0] if k != "step"}
    if device == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss is KiB on Linux
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"model": name, "num_layers": a.num_layers or MODELS[name].get("num_hidden_layers"),
            "params": n_params, "device": device, "prompts": a.prompts, "group_size": a.group_size,
            "max_new_tokens": a.max_new_tokens, "ppo_epochs": a.ppo_epochs, "mini_batches": a.mini_batches,
            "steps": len(per_step), "timed_steps": len(timed), "peak_tflops": peak, "peak_source": peak_source,
            "peak_memory_gib": peak_mem, "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda"
            else "process max RSS", **median, "per_step": per_step}


# --------------------------------------------------------------------------------------------- output

def plot(rows: list[dict], meta: dict, path: Path) -> Path:
    """Stacked bars of the median step's phases, one bar per configuration, throughput and MFU written on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 2.2 + 0.9 * len(rows)))
    labels = [f"{r['model']} ({r['num_layers']}L, {r['prompts']}x{r['group_size']}x{r['max_new_tokens']})"
              for r in rows]
    left = [0.0] * len(rows)
    for j, phase in enumerate(PHASES):
        vals = [r[phase] for r in rows]
        ax.barh(labels, vals, left=left, color=f"C{j}", label=phase.removesuffix("_s"))
        left = [x + v for x, v in zip(left, vals)]
    for i, r in enumerate(rows):
        ax.text(left[i], i, f"  gen {r['generate_tok_per_s']:.0f} tok/s, update {r['update_tok_per_s']:.0f} tok/s,"
                f" MFU {100 * r['update_mfu']:.1f}%, peak {r['peak_memory_gib']:.1f} GiB", va="center", fontsize=7)
    ax.set_xlim(0, max(left) * 2.2)
    ax.set_xlabel("seconds per step (median)")
    machine = meta["gpu"] or meta.get("cpu_model") or "cpu"
    ax.set_title(f"grpo-core end-to-end step on {machine}\n torch {meta['torch']}, commit {meta['commit'][:12]}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (1 + 0.5 * len(rows))), ncol=len(PHASES))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the tiny demo model on CPU (default: real shapes on CUDA)")
    p.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS),
                   help="architectures (default: qwen2.5-1.5b qwen3-4b on GPU, tiny with --cpu)")
    p.add_argument("--num-layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--steps", type=int, default=4, help="trainer steps per configuration")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the medians")
    p.add_argument("--prompts", type=int, default=None, help="prompt groups per step (default 16 GPU, 8 CPU)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="response cap (default 512 GPU, 24 CPU)")
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--mini-batches", type=int, default=2,
                   help="optimizer steps per rollout batch; > 1 makes the old-logprob pass real (off-policy)")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="default 8192 GPU, 4096 CPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra trainer config override")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_e2e_<machine>.json)")
    p.add_argument("--work-dir", default=None, help="where model dirs and runs go (default: a temp dir)")
    p.add_argument("--child-row", default=None, help=argparse.SUPPRESS)  # internal: run one model, write its row
    a = p.parse_args(argv)
    a.models = a.models or (["tiny"] if a.cpu else ["qwen2.5-1.5b", "qwen3-4b"])
    a.prompts = a.prompts or (8 if a.cpu else 16)
    a.max_new_tokens = a.max_new_tokens or (24 if a.cpu else 512)
    a.micro_batch_tokens = a.micro_batch_tokens or (4096 if a.cpu else 8192)
    for name in ("steps", "prompts", "group_size", "max_new_tokens", "ppo_epochs", "mini_batches",
                 "micro_batch_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.prompts % a.mini_batches:
        p.error(f"--mini-batches {a.mini_batches} must divide --prompts {a.prompts}")
    if a.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    if not a.cpu and a.child_row is None:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --cpu for the tiny CPU configuration")
    return a


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.child_row:
        work = Path(a.work_dir)
        row = run_one(a, a.models[0], work)
        Path(a.child_row).write_text(json.dumps(row))
        return 0
    meta = machine_info()
    meta.update({"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "argv": argv})
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_e2e_", dir=a.work_dir) as tmp:
        for name in a.models:
            work = Path(tmp) / name
            row_path = work / "row.json"
            work.mkdir(parents=True)
            child = [sys.executable, __file__, *argv, "--models", name, "--work-dir", str(work),
                     "--child-row", str(row_path)]
            print(f"[bench_e2e] {name}: {a.steps} steps", flush=True)
            proc = subprocess.run(child, capture_output=True, text=True)
            if proc.returncode != 0 or not row_path.exists():
                tail = (proc.stdout + proc.stderr)[-3000:]
                error = "OOM" if "OutOfMemoryError" in tail else f"exit {proc.returncode}"
                print(f"[bench_e2e] {name} failed ({error}):\n{tail}", file=sys.stderr)
                rows.append({"model": name, "error": error})
                continue
            rows.append(json.loads(row_path.read_text()))
    machine = (meta["gpu"] or "cpu").replace(" ", "_").replace("/", "_")
    out = Path(a.out) if a.out else RESULTS_DIR / f"bench_e2e_{'cpu' if a.cpu else machine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    ok = [r for r in rows if "error" not in r]
    columns = ["model", "params", "step_s", *PHASES, "generate_tok_per_s", "update_tok_per_s", "update_mfu",
               "peak_memory_gib"]
    print(f"machine: {meta['gpu'] or meta['cpu_model']} | torch {meta['torch']} | commit {meta['commit']}")
    print(format_table(rows, columns))
    if ok:
        print(f"wrote {out} and {plot(ok, meta, out.with_suffix('.png'))}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
