"""The `grpo` command (also `python -m grpo_core`): train, data, eval."""
from __future__ import annotations

import argparse
import sys


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="RL-train a policy from a YAML recipe",
                       description="Run rollout -> verify -> advantage -> update. Works as is, under "
                                   "`torchrun --nproc_per_node N -m grpo_core train ...` and the deepspeed launcher.")
    p.add_argument("config", help="YAML recipe, e.g. configs/demo_cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set trainer.lr=1e-6 (repeatable)")
    p.add_argument("--resume", default="none", metavar="auto|none|PATH",
                   help="auto = newest complete checkpoint in trainer.output_dir; none = start fresh; or a checkpoint dir")
    p.add_argument("--force", action="store_true", help="resume even if the config differs from the checkpoint's")
    p.add_argument("--local_rank", "--local-rank", dest="sub_local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset (pass@k, maj@k, EAS)")
    p.add_argument("checkpoint", help="HF-layout model directory")
    p.add_argument("data", nargs="+", help="parquet/jsonl files")
    p.add_argument("--k", type=int, nargs="+", default=[1, 4, 8], help="k values for pass@k / maj@k")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default max k)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-template", default=None,
                   help="format string with {prompt} (default: the run's template for a trainer checkpoint, "
                        "else the chat template)")
    p.add_argument("--out", default=None, help="output directory for eval.json and eval.md")
    p.add_argument("--engine", choices=["torch", "vllm"], default=None,
                   help="generation engine (= --set rollout.engine=...; default torch; vllm needs the gpu extra)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set rollout.gpu_memory_utilization=0.8 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="grpo-core: RL with verifiable rewards for LLMs")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the env is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    data = sub.add_parser("data", help="dataset tools")
    from grpo_core.data.cli import add_data_subcommands

    add_data_subcommands(data.add_subparsers(dest="data_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from grpo_core.config import ConfigError, load_config

        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"grpo train: {e}", file=sys.stderr)
            return 2
        from grpo_core.trainer import train

        train(cfg, resume=args.resume, force=args.force)
        return 0
    if args.command == "eval":
        from grpo_core.evaluate import eval_main

        return eval_main(args)
    if args.command == "data":
        from grpo_core.data.cli import run_data_command

        return run_data_command(args) or 0
    return 1
