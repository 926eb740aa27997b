"""The `grpo` command (also `python -m grpo_core`): train, data, eval."""
from __future__ import annotations

import argparse
import errno
import os
import sys

from grpo_core.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, UserError


def _add_debug(p) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback of every error")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="RL-train a policy from a YAML recipe",
                       description="Run rollout -> verify -> advantage -> update. Works as is, under "
                                   "`torchrun --nproc_per_node N -m grpo_core train ...` and the deepspeed launcher.")
    p.add_argument("config", help="YAML recipe: a path (configs/demo_cpu.yaml) or a shipped recipe by name (demo_cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set trainer.lr=1e-6 (repeatable)")
    p.add_argument("--resume", default="none", metavar="auto|none|PATH",
                   help="auto = newest checkpoint in trainer.output_dir that verifies (a damaged newer one is skipped); "
                        "none = start fresh; or a checkpoint dir")
    p.add_argument("--force", action="store_true",
                   help="without --resume: move a previous run in trainer.output_dir into previous-<time>/ and start "
                        "fresh; with --resume: resume even if the config differs from the checkpoint's")
    _add_debug(p)
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
    _add_debug(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="grpo-core: RL with verifiable rewards for LLMs")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the env is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    data = sub.add_parser("data", help="dataset tools")
    _add_debug(data)
    from grpo_core.data.cli import add_data_subcommands

    add_data_subcommands(data.add_subparsers(dest="data_command", required=True))
    return parser


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _user_error_types() -> tuple:
    """User-error classes of the modules loaded so far (a module not imported cannot have raised its error, and
    importing it here would cost seconds of torch import on the error path)."""
    found = [UserError]
    for module, name in (("grpo_core.config", "ConfigError"), ("grpo_core.data.io", "DataError"),
                         ("grpo_core.distributed", "LaunchError"), ("grpo_core.evaluate", "EvalError"),
                         ("grpo_core.model.checkpoint_io", "WeightsError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def _is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                                   errno.EPERM, errno.EFBIG)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")).strip() if str(e) else type(e).__name__
    if _is_disk_error(e):
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        if e.errno in (errno.EACCES, errno.EPERM):  # a read or a write: say only what is known
            return f"permission denied{' on' + where if where else ''} (this user may not read or write it)"
        return f"cannot write{where}: {os.strerror(e.errno).lower()}"
    return text


def _train(args) -> int:
    from grpo_core.config import load_config
    from grpo_core.preempt import STOP

    STOP.install()  # SIGTERM / SIGUSR1 / SIGINT during start-up are honoured at the first step boundary
    cfg = load_config(args.config, args.overrides)
    from grpo_core.preflight import check_train

    check_train(cfg, args.resume)  # paths, extras, device: before any heavy start-up or any write
    lock = None
    if _rank() == 0:
        from grpo_core.outdir import claim_output_dir

        lock = claim_output_dir(cfg.trainer.output_dir, resume=args.resume, force=args.force,
                                say=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        from grpo_core.trainer import train

        summary = train(cfg, resume=args.resume, force=args.force)
    finally:
        if lock is not None:
            lock.release()
    stopped = summary.get("stopped_by")
    if stopped:
        if _rank() == 0:
            where = summary.get("checkpoint") or "no checkpoint (no step had run)"
            print(f"grpo train: stopped by {stopped} after step {summary['steps']}; saved {where}; continue with "
                  f"--resume auto", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if stopped == "SIGINT" else EXIT_PREEMPTED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("GRPO_DEBUG") == "1"
    if debug:
        os.environ["GRPO_DEBUG"] = "1"  # worker processes (custom rewards) print full tracebacks too
    name = f"grpo {args.command}"
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            from grpo_core.evaluate import eval_main

            return eval_main(args)
        if args.command == "data":
            from grpo_core.data.cli import run_data_command

            rc = run_data_command(args) or 0
            return EXIT_USER_ERROR if rc == 1 else rc  # a bad data file: the same exit code as everywhere
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        if _rank() == 0:
            print(f"{name}: interrupted; the last checkpoint (if any) is kept", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug or not (isinstance(e, _user_error_types()) or _is_disk_error(e)):
            raise  # a genuine bug: the traceback is what a developer needs
        from grpo_core.errors import DiskError

        if _rank() == 0 or isinstance(e, (DiskError, OSError)):  # the others are the same on every rank
            prefix = name if _rank() == 0 else f"{name} (rank {_rank()})"
            print(f"{prefix}: {_one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
