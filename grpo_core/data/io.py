"""Reading and writing row files: parquet (pyarrow) and JSON Lines, chosen by suffix.

Rows are plain Python dicts (parquet structs become dicts, lists of structs become lists of dicts).
Every failure raises one `DataError` that names the file (and the line, for JSONL).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from grpo_core.fsmode import follow_umask

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """A data file or one of its rows is unusable; the message names file, row and field."""


def _parquet_parts(path: Path) -> list[Path]:
    """The parquet files of a partitioned dataset directory (Spark/pyarrow layout: part files, possibly in
    key=value subfolders)."""
    return sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))


def _suffix_kind(path: Path) -> str:
    if path.is_dir():
        if _parquet_parts(path):
            return "parquet"
        raise DataError(f"{path}: a directory with no .parquet files (give a parquet/JSONL file, or a "
                        f"directory of parquet part files)")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise DataError(
        f"{path}: unsupported file type {suffix!r}; expected one of "
        f"{', '.join(PARQUET_SUFFIXES + JSONL_SUFFIXES)}"
    )


def read_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Read all rows of a parquet or JSONL file.

    Returns (rows, columns). For JSONL the columns are the union of keys in first-seen order.
    Raises DataError if the file is missing, unreadable, or a JSONL line is not a JSON object.
    """
    path = Path(path)
    kind = _suffix_kind(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:  # a directory is read as one partitioned dataset
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet {'dataset' if path.is_dir() else 'file'}: {exc}") \
                from exc
        return table.to_pylist(), list(table.column_names)
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")

    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {line_no} (row {len(rows)}): invalid JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise DataError(
                f"{path} line {line_no} (row {len(rows)}): expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
        for key in row:
            columns.setdefault(key, None)
    return rows, list(columns)


def write_dataset(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows to `path` (parquet or JSONL by suffix) atomically: temp file in the same folder,
    then os.replace, so a reader never sees a half-written file. Creates parent folders.
    """
    path = Path(path)
    kind = _suffix_kind(path)
    if not rows:
        raise DataError(f"{path}: refusing to write an empty dataset")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            os.close(fd)
            fd = -1
            pq.write_table(pa.Table.from_pylist(list(rows)), tmp_name)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                fd = -1
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        follow_umask(tmp_name)  # mkstemp made it 0600
        os.replace(tmp_name, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path
