"""`grpo data ...` subcommands.

  grpo data make-synthetic --out DIR --kinds arith,linear_eq,frac --n-train 2000 --n-test 200 --seed 0 [--level N]
      writes DIR/train.parquet and DIR/test.parquet (plain format, disjoint prompts).
  grpo data validate FILE [FILE ...] [--allow-unlabeled]
      checks that files load (format, fields, types) and prints a summary per file.

grpo_core/cli.py makes the `data` parser, calls `add_data_subcommands(data.add_subparsers(dest="data_command"))`
and hands the parsed args to `run_data_command(args)`.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from grpo_core.data.io import DataError, read_records, write_dataset
from grpo_core.data.schema import rows_to_samples


def add_data_subcommands(commands: argparse._SubParsersAction) -> None:
    """Register `make-synthetic` and `validate` on the `data` group's subparsers (dest="data_command")."""
    make = commands.add_parser("make-synthetic", help="write synthetic train/test splits (parquet)")
    make.add_argument("--out", required=True, type=_user_path, help="output folder")
    make.add_argument("--kinds", default="arith,linear_eq,frac",
                      help="comma-separated task kinds: arith, linear_eq, frac, pyfunc (code: train with "
                           "reward.default=code)")
    make.add_argument("--n-train", type=int, default=2000, help="train rows (split evenly over kinds)")
    make.add_argument("--n-test", type=int, default=200, help="test rows (split evenly over kinds)")
    make.add_argument("--seed", type=int, default=0, help="generation seed")
    make.add_argument("--level", type=int, default=None,
                      help="difficulty level for every kind (default: mix all levels)")
    make.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="file format")
    make.add_argument("--force", action="store_true", help="replace train/test files already in --out")

    validate = commands.add_parser("validate", help="check that data files load and summarize them")
    validate.add_argument("files", nargs="+", type=_user_path, help="parquet or JSONL files")
    validate.add_argument("--allow-unlabeled", action="store_true", help="accept rows without a gold answer")


def _user_path(text: str) -> Path:
    return Path(text).expanduser()


def _make_synthetic(args: argparse.Namespace) -> int:
    from grpo_core.tasks import make_train_test

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    from grpo_core.config import MAX_SYNTHETIC_ROWS

    if not (0 < args.n_train <= MAX_SYNTHETIC_ROWS and 0 < args.n_test <= MAX_SYNTHETIC_ROWS):
        raise DataError(f"--n-train and --n-test must be in [1, {MAX_SYNTHETIC_ROWS}], got {args.n_train} and "
                        f"{args.n_test}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    existing = [str(out / f"{split}.{args.format}") for split in ("train", "test")
                if (out / f"{split}.{args.format}").exists()]
    if existing and not args.force:  # checked before minutes of generation, and never replaced silently
        raise DataError(f"--out {out} already holds {' and '.join(existing)}; pass --force to replace them, or "
                        f"choose another --out")
    try:
        train, test = make_train_test(kinds, args.n_train, args.n_test, seed=args.seed, level=args.level)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    for split, rows in (("train", train), ("test", test)):
        path = write_dataset(rows, Path(args.out) / f"{split}.{args.format}")
        sources = Counter(row["data_source"] for row in rows)
        print(f"wrote {path}: {len(rows)} rows ({', '.join(f'{k}={v}' for k, v in sorted(sources.items()))})")
    return 0


def _validate(args: argparse.Namespace) -> int:
    for path in args.files:
        rows, columns = read_records(path)
        if not rows:  # a run on it would have nothing to train or evaluate on
            raise DataError(f"{path}: 0 rows (nothing to train or evaluate on)")
        fmt, samples = rows_to_samples(rows, columns, path, uid_prefix=path.stem,
                                       allow_unlabeled=args.allow_unlabeled)
        sources = Counter(s.data_source for s in samples)
        labeled = sum(s.answer is not None for s in samples)
        print(f"{path}: {fmt} format, {len(samples)} rows, {labeled} labeled, data sources: "
              f"{', '.join(f'{k}={v}' for k, v in sorted(sources.items()))}")
    return 0


_COMMANDS = {"make-synthetic": _make_synthetic, "validate": _validate}


def run_data_command(args: argparse.Namespace) -> int:
    """Run the parsed `grpo data ...` command; returns the exit code (1 with a message on bad data)."""
    try:
        return _COMMANDS[args.data_command](args)
    except DataError as exc:
        print(f"grpo data {args.data_command}: {exc}", file=sys.stderr)
        return 1
