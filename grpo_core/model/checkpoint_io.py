"""HF-layout checkpoint files: reading (single or sharded safetensors) and atomic, sharded writing.

Layout written (what transformers and vLLM read unchanged):
    out_dir/config.json
    out_dir/model.safetensors                                  (one shard), or
    out_dir/model-00001-of-0000N.safetensors ... + model.safetensors.index.json
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from grpo_core.fsmode import follow_umask

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Files of an old checkpoint that a new save replaces; everything else in out_dir (tokenizer, generation
# config, trainer state) is carried over into the new directory.
_MODEL_FILE_RE = re.compile(r"^(config\.json|model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors)$")


def read_config(path: str | os.PathLike) -> dict:
    """Parsed ``path/config.json``."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory: the index's shards, or the single file."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} listed in {index} is missing")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


class WeightsError(ValueError):
    """A weight file holds a tensor that must not be loaded (non-finite values, a non-float dtype); the
    message names the tensor and the file."""


def check_tensor(name: str, tensor: torch.Tensor, file: str | os.PathLike) -> None:
    """Refuse a non-floating-point weight (casting int32 to float would silently change it) and any NaN/inf."""
    if not tensor.is_floating_point():
        raise WeightsError(f"weight '{name}' in {file} is {str(tensor.dtype).replace('torch.', '')}, not floating "
                           f"point; the model loads float weights only (casting would silently change the values): "
                           f"convert the checkpoint to float16/bfloat16/float32")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise WeightsError(f"weight '{name}' in {file} has {bad} non-finite value(s) (NaN/inf) of {tensor.numel()}: "
                           f"the checkpoint is damaged or its training diverged; load an earlier checkpoint")


def iter_shards(path: str | os.PathLike, check: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the checkpoint one shard at a time (CPU tensors), so peak memory is one shard. With `check`, every
    tensor must be floating point and finite (WeightsError naming the tensor otherwise)."""
    for file in weight_files(path):
        shard = load_file(str(file), device="cpu")
        if check:
            for name, tensor in shard.items():
                check_tensor(name, tensor, file)
        yield shard


SAFETENSORS_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def check_weight_headers(path: str | os.PathLike, shapes: dict | None = None) -> dict[str, str]:
    """Read only the safetensors headers (no tensor data): {tensor name: dtype}, and each tensor's shape into
    `shapes` when given. Raises WeightsError for a file that is not safetensors or is truncated, and for a
    non-float tensor, naming both."""
    import struct

    out: dict[str, str] = {}
    for file in weight_files(path):
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length out of range")
                header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise WeightsError(f"{file} is not a readable safetensors file ({e})") from None
        end = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = meta.get("dtype")
            offsets = meta.get("data_offsets") or [0, 0]
            if end + offsets[1] > size:
                raise WeightsError(f"{file} is truncated: weight '{name}' ends at byte {end + offsets[1]} of {size}")
            if dtype not in SAFETENSORS_FLOAT_DTYPES:
                raise WeightsError(f"weight '{name}' in {file} is {dtype}, not floating point; the model loads float "
                                   f"weights only (casting would silently change the values): convert the checkpoint "
                                   f"to float16/bfloat16/float32")
            out[name] = dtype
            if shapes is not None:
                shapes[name] = (tuple(meta.get("shape") or ()), file.name)
    return out


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Group keys, in order, into shards of at most max_shard_bytes (a bigger single tensor gets its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _save_file(shard: dict, path: Path) -> None:
    """safetensors' save_file, with its I/O failures (a Rust error carrying "os error N") raised as the OSError
    they are, naming the file, so that disk full or read-only is reported like any other write."""
    from grpo_core.errors import naming

    with naming(path):
        save_file(shard, str(path), metadata={"format": "pt"})


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Write safetensors shard(s) (+ index when more than one) into `directory`; returns the file names."""
    shards = plan_shards(tensors, max_shard_bytes)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for name, keys in zip(names, shards):
        # One shard at a time on the CPU: a gathered ZeRO-3 state dict may live on the GPU.
        shard = {k: tensors[k].detach().to("cpu").contiguous() for k in keys}
        _save_file(shard, directory / name)
        follow_umask(directory / name)  # safetensors writes 0600
        weight_map.update({k: name for k in keys})
        del shard
    written = list(names)
    if len(shards) > 1:
        with open(directory / INDEX_FILE, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        written.append(INDEX_FILE)
    return written


def write_json(file: Path, obj: dict) -> None:
    from grpo_core.errors import naming

    with naming(file), open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of out_dir to fill; on success fsync it and swap it in place of out_dir.

    A crash or exception leaves out_dir untouched (at worst a stray ``.<name>.tmp-*`` sibling). Files of an
    existing out_dir that are not model files (see _MODEL_FILE_RE) are carried over into the new directory.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"save target {out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.is_dir():
            for entry in out_dir.iterdir():
                if _MODEL_FILE_RE.match(entry.name) or (tmp / entry.name).exists():
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        for entry in tmp.iterdir():
            if entry.is_file() and not entry.is_symlink():
                _fsync_path(entry)
        _fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Directories cannot be os.replace'd over a non-empty target: move the old one aside first.
    old = out_dir.parent / f".{out_dir.name}.old-{tag}" if out_dir.exists() else None
    if old is not None:
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    _fsync_path(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
