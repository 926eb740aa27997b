"""Never lose a run: output-dir lock and ownership, self-checking checkpoints (manifest, walk-back on damage,
retention of this run's checkpoints only), disk-full as one line, non-finite weights refused at load, fail-fast
checks before any start-up, one-line errors with exit code 2."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from grpo_core.checkpoint import (MANIFEST, find_checkpoint, list_checkpoints, save_checkpoint, select_checkpoint,
                                  verify_checkpoint)
from grpo_core.errors import CheckpointError, DiskError, OutputDirError
from grpo_core.outdir import LOCK_NAME, MARKER_NAME, RunLock, claim_output_dir

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, **extra)
    return env


def grpo(*args, timeout=120):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "grpo_core", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    proc.seconds = time.monotonic() - t0
    return proc


class FakeEngine:
    """DeepSpeed's save_checkpoint as far as the checkpoint module sees it: files under path/tag."""

    def __init__(self, payload=b"x" * 1000):
        self.payload = payload

    def save_checkpoint(self, path, tag):
        os.makedirs(os.path.join(path, tag), exist_ok=True)
        with open(os.path.join(path, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb") as f:
            f.write(self.payload)


def _save(out, step, run_id="run-a", keep_last=5, **kw):
    return save_checkpoint(out, step, engine=FakeEngine(), trainer_state={"step": step}, rank=0, export_hf=None,
                           keep_last=keep_last, run_id=run_id, **kw)


# ------------------------------------------------------------------------------------------------ fail fast

@pytest.mark.parametrize("override, words", [
    ("model.path=/nonexistent/model", "model.path '/nonexistent/model': no such directory"),
    ("data.train_files=[/nonexistent/train.parquet]", "data.train_files: '/nonexistent/train.parquet' not found"),
    ("rollout.engine=vllm", "rollout.engine=vllm needs vLLM"),
    ("trainer.max_step=3", "did you mean trainer.max_steps?"),
    ("rollout.temperature=0", "config key 'rollout.temperature': must be > 0"),
])
def test_bad_input_fails_fast_in_one_line_and_writes_nothing(tmp_path, override, words):
    if "vllm" in override:
        pytest.importorskip("torch")
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            pytest.skip("vLLM is installed here")
    out = tmp_path / "run"
    proc = grpo("train", "configs/demo_cpu.yaml", "--set", f"trainer.output_dir={out}", "--set", override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grpo train: ") and words in lines[0], proc.stderr[-2000:]
    assert not out.exists()  # nothing written
    assert proc.seconds < 15, proc.seconds


def test_bad_model_dirs_are_named_before_start_up(tmp_path, tiny_dir):
    import shutil

    from grpo_core.errors import PreflightError
    from grpo_core.preflight import check_model_dir

    check_model_dir(tiny_dir)  # a good one passes
    bad = tmp_path / "no_weights"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(PreflightError, match="no model.safetensors"):
        check_model_dir(bad)
    trunc = tmp_path / "truncated"
    shutil.copytree(tiny_dir, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PreflightError, match="truncated"):
        check_model_dir(trunc)
    as_int = tmp_path / "int32"
    shutil.copytree(tiny_dir, as_int)
    tensors = load_file(as_int / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, as_int / "model.safetensors")
    with pytest.raises(PreflightError, match=f"weight '{name}' .* is I32, not floating point"):
        check_model_dir(as_int)


def test_non_finite_and_integer_weights_are_refused_at_load(tmp_path, tiny_dir):
    """A model dir with NaN weights used to train with every update skipped and export NaN weights."""
    import shutil

    from grpo_core.model import CausalLM
    from grpo_core.model.checkpoint_io import WeightsError

    bad = tmp_path / "nan"
    shutil.copytree(tiny_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    name = sorted(tensors)[-1]
    tensors[name][0].fill_(float("nan"))
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(WeightsError, match=rf"weight '{name}' in .*model.safetensors has \d+ non-finite"):
        CausalLM.from_pretrained(bad)
    tensors[name] = tensors[name].nan_to_num(0.0).to(torch.int32)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(WeightsError, match=f"weight '{name}' .* is int32, not floating point"):
        CausalLM.from_pretrained(bad)
    proc = grpo("eval", str(bad), "configs/demo_cpu.yaml")  # the same one line from `grpo eval`
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("grpo eval: ")


def test_empty_config_and_duplicate_keys_via_cli(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    proc = grpo("train", str(empty))
    assert proc.returncode == 2 and proc.stderr.strip().endswith("is empty (no keys): start from a recipe such as "
                                                                 "configs/demo_cpu.yaml")
    dup = tmp_path / "dup.yaml"
    dup.write_text("trainer:\n  max_steps: 3\n  max_steps: 4\n")
    proc = grpo("train", str(dup))
    assert proc.returncode == 2 and "line 3: duplicate key 'max_steps'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ the lock

_HOLD = """
import sys, time
from grpo_core.outdir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_output_dir_lock(tmp_path):
    """A second run on a live directory is refused naming the holder; a dead holder's lock is taken over; a lock
    from another host is refused with the path to delete."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=rf"in use by another run: pid {holder.pid} on host "):
            RunLock(tmp_path).acquire()
        proc = grpo("train", "configs/demo_cpu.yaml", "--set", f"trainer.output_dir={tmp_path}")
        assert proc.returncode == 2 and f"pid {holder.pid}" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info["pid"] == holder.pid  # SIGKILL left the lock file behind ...
    lock = RunLock(tmp_path).acquire()  # ... and the next run takes it over
    assert lock.took_over["pid"] == holder.pid
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: an empty file is a free lock
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "other-node-17", "pid": 4242, "started": "earlier"}))
    with pytest.raises(OutputDirError, match=rf"another host: pid 4242 on host other-node-17 .*delete .*{LOCK_NAME}"):
        RunLock(tmp_path).acquire()


def test_reuse_without_resume_is_refused_and_force_archives(tmp_path):
    """Re-running on a used output_dir without --resume used to delete the old metrics and checkpoints."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000005").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("the user's own file\n")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(OutputDirError, match=r"holds a previous run \(checkpoints, metrics.jsonl\); continue it with "
                                             r"--resume auto, set a new trainer.output_dir, or pass --force"):
        claim_output_dir(out, resume="none", force=False)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != LOCK_NAME) == before
    proc = grpo("train", "configs/demo_cpu.yaml", "--set", f"trainer.output_dir={out}")  # the CLI: one line, fast
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--resume auto" in proc.stderr
    said = []
    lock = claim_output_dir(out, resume="none", force=True, say=said.append)
    lock.release()
    archived = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(archived) == 1 and "moved the previous run" in said[0]
    # all of the run's files kept; the user's own file is neither moved nor touched
    assert sorted(str(p.relative_to(archived[0])) for p in archived[0].rglob("*")) == [
        p for p in before if p != "notes.txt"]
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, MARKER_NAME, "notes.txt", archived[0].name])
    # --resume auto on a dir whose run died before its first checkpoint: the leftovers are archived too
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    claim_output_dir(out, resume="auto", force=False, say=said.append).release()
    assert "no checkpoint" in said[-1] and not (out / "metrics.jsonl").exists()
    assert len([p for p in out.iterdir() if p.name.startswith("previous-")]) == 2
    # a start that failed before step 1 (only derived files) does not block the corrected run: moved aside
    (out / "base_model").mkdir()
    claim_output_dir(out, resume="none", force=False, say=said.append).release()
    assert "stopped before its first step" in said[-1] and not (out / "base_model").exists()
    # ... but derived-looking files no grpo run wrote (no lock file ever) are refused, not moved
    other = tmp_path / "users_dir"
    (other / "data").mkdir(parents=True)
    with pytest.raises(OutputDirError, match=r"holds a previous run \(data\)"):
        claim_output_dir(other, resume="none", force=False)


# ------------------------------------------------------------------------------------------------ checkpoints

def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (lambda c: _flip(next(c.rglob("*optim_states.pt"))), "fails its sha256 check"),
    (lambda c: next(c.rglob("*optim_states.pt")).write_bytes(b""), "has 0 bytes, the manifest says 1000"),
    (lambda c: next(c.rglob("*optim_states.pt")).unlink(), "optim_states.pt is missing"),
    (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda c: (c / "rng_rank0.pt").write_bytes(b"\0" * 10), "rng_rank0.pt has 10 bytes"),
    (lambda c: (c / MANIFEST).write_text("{"), "MANIFEST.json is unreadable"),
    (lambda c: (c / MANIFEST).write_text(""), "MANIFEST.json is unreadable"),
    (lambda c: (c / MANIFEST).unlink(), "incomplete"),
])
def test_resume_auto_walks_back_past_a_damaged_checkpoint(tmp_path, damage, reason):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    assert verify_checkpoint(newest) is None
    damage(newest)
    if (newest / "COMPLETE").exists() or (newest / MANIFEST).exists():
        assert reason in verify_checkpoint(newest)
    said = []
    assert select_checkpoint(tmp_path, "auto", say=said.append).name == "step_000001"
    if said:
        assert said == [f"[grpo] --resume auto: skipped step_000002 ({verify_checkpoint(newest)}); resuming from "
                        f"step_000001"]
    with pytest.raises(CheckpointError, match="cannot resume from this checkpoint"):
        select_checkpoint(tmp_path, str(newest))
    damage(tmp_path / "checkpoints" / "step_000001")
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        select_checkpoint(tmp_path, "auto")


def test_retention_deletes_only_this_runs_older_checkpoints(tmp_path):
    """keep_last used to delete the new run's checkpoints when an old run's higher step numbers sorted after."""
    _save(tmp_path, 7, run_id="old-run")  # another run's checkpoint, with a higher step
    _save(tmp_path, 3, run_id="old-run")
    for step in (1, 2, 3 + 1):
        _save(tmp_path, step, run_id="new-run", keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_000002", "step_000003", "step_000004", "step_000007"]  # only new-run's step 1 went
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000004"


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import grpo_core.checkpoint as ckpt_mod

    _save(tmp_path, 1)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # what torch.save raises when the disk fills mid-file
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 896")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(DiskError) as e:
        _save(tmp_path, 2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write checkpoint to {tmp_path / 'checkpoints'}")
    assert "a checkpoint needs about" in msg and "free" in msg and "step_000001 is intact" in msg
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)

    class NoSpace(FakeEngine):
        def save_checkpoint(self, path, tag):
            raise OSError(28, "No space left on device", os.path.join(path, tag, "x.pt"))

    with pytest.raises(DiskError, match=r"cannot write checkpoint to .*x\.pt: no space left on device"):
        save_checkpoint(tmp_path, 2, engine=NoSpace(), trainer_state={"step": 2}, rank=0, export_hf=None,
                        keep_last=2, run_id="run-a")
    root = tmp_path / "checkpoints"
    assert not list(root.glob(".tmp-*")) and not (root / "step_000002").exists()
    assert find_checkpoint(tmp_path, "auto").name == "step_000001" and (root / "latest").read_text() == "step_000001"


# ------------------------------------------------------------------------------------------------ non-finite steps

TINY = [
    "model.tiny_hidden_size=32", "model.tiny_num_layers=1", "model.tiny_num_heads=2", "model.tiny_num_kv_heads=1",
    "model.tiny_intermediate_size=64", "model.kernel_backend=torch", "data.synthetic_kinds=[arith]",
    "data.synthetic_level=1", "data.synthetic_train_size=64", "data.synthetic_eval_size=0",
    "data.prompt_template={prompt}\n", "rollout.group_size=4", "rollout.max_new_tokens=8",
    "trainer.train_batch_prompts=4", "trainer.device=cpu", "trainer.lr=1e-3", "logging.progress_bar=false",
    "logging.tensorboard=false", "logging.plot=false", "warm_start.steps=0", "algorithm.dynamic_sampling=false",
]


def _optimizer_step_count(trainer) -> int:
    opt = trainer.engine.optimizer
    opt = getattr(opt, "optimizer", opt)  # the torch optimizer inside a ZeRO wrapper (stage 0 on one rank: itself)
    steps = {int(st["step"]) for st in opt.state.values() if "step" in st}
    return steps.pop() if steps else 0


@pytest.mark.usefixtures("one_thread")
def test_non_finite_gradient_is_skipped_counted_and_stops_the_run(tmp_path):
    """A non-finite gradient with a finite loss used to step the weights to NaN (DeepSpeed checks only under fp16
    loss scaling) and let the trainer's step counter drift from the optimizer's."""
    from grpo_core.config import load_config
    from grpo_core.errors import NonFiniteError
    from grpo_core.trainer import Trainer

    trainer = Trainer(load_config(None, TINY + [f"trainer.output_dir={tmp_path}", "trainer.max_consecutive_skips=2"]))

    def batch(step):
        groups, _ = trainer.rollout(step)
        for g in groups:
            for i, s in enumerate(g.samples):
                s.reward, s.correct = float(i % 2), bool(i % 2)
        trainer.assign_advantages(groups)
        return groups

    out = trainer.update(batch(1), step=1)
    assert out["train/skipped_steps"] == 0.0 and trainer.opt_steps == 1 == _optimizer_step_count(trainer)
    before = {k: v.clone() for k, v in trainer.gathered_state_dict().items()}
    param = next(p for n, p in trainer.module.named_parameters() if "mlp" in n)
    handle = param.register_hook(lambda g: g * float("nan"))
    out = trainer.update(batch(2), step=2)
    assert out["train/skipped_steps"] == 1.0
    assert trainer.opt_steps == 1 == _optimizer_step_count(trainer)  # counters stay equal
    for k, v in trainer.gathered_state_dict().items():
        assert torch.equal(v, before[k]), k  # weights untouched, finite
    with pytest.raises(NonFiniteError, match=r"stopped at step 3: 2 optimizer steps in a row .*max_consecutive_skips"):
        trainer.update(batch(3), step=3)
    handle.remove()
    trainer._consecutive_skips = 0
    out = trainer.update(batch(4), step=4)  # finite again: trains
    assert out["train/skipped_steps"] == 0.0 and trainer.opt_steps == 2 == _optimizer_step_count(trainer)
