"""Scale and reliability, with real processes: 2-rank vs 1-rank ZeRO-3 equivalence (torchrun, gloo), exact
resume after SIGKILL, a crash in the middle of a save, and resume with a changed config."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_core.checkpoint import COMPLETE, find_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.tiny_hidden_size=32", "model.tiny_num_layers=1", "model.tiny_num_heads=2", "model.tiny_num_kv_heads=1",
    "model.tiny_intermediate_size=64", "data.synthetic_level=1", "data.synthetic_train_size=120",
    "data.synthetic_eval_size=8", "data.prompt_template={prompt}\n", "rollout.group_size=4",
    "rollout.max_new_tokens=10", "trainer.train_batch_prompts=4", "trainer.device=cpu", "trainer.lr=5e-3",
    "trainer.eval_max_prompts=8", "logging.progress_bar=false", "logging.plot=false", "warm_start.steps=10",
    "warm_start.lr=1e-2", "algorithm.dynamic_sampling=false", "algorithm.nsr=scaled",
    "algorithm.hidden_align_coef=0.1", "trainer.mini_batches=2", "reward.format_reward=0.5",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TRITON_INTERPRET")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, **extra)
    return env


def _train_cmd(out: Path, *extra, nproc: int = 1, script=None, base=TINY) -> list[str]:
    """`grpo train` on the demo recipe made tiny by `base`; `extra` holds KEY=VALUE overrides and flags
    (--resume auto, ...)."""
    sets = [s for s in extra if not s.startswith("--") and "=" in s]
    flags = [s for s in extra if s not in sets]
    args = ["configs/demo_cpu.yaml"] + sum((["--set", s] for s in list(base) + [f"trainer.output_dir={out}"] + sets),
                                           []) + flags
    entry = [script] if script else ["-m", "grpo_core"]
    if nproc == 1:
        return [sys.executable] + entry + ["train"] + args
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port())] + entry + ["train"] + args


def _train(out: Path, *extra, nproc: int = 1, env_extra=None, check=True, script=None, base=TINY):
    cmd = _train_cmd(out, *extra, nproc=nproc, script=script, base=base)
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(**(env_extra or {})), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _final_weights(out: Path, step: int) -> dict:
    hf = out / "checkpoints" / f"step_{step:06d}" / "hf"
    tensors = {}
    for f in sorted(hf.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_lm_head_loss"])
def test_two_ranks_match_one_rank(tmp_path, fused):
    """Same global batch on 1 and 2 ranks (gloo): same weights after 3 steps (fp32, 1e-5), with NSR and
    Hidden-Align on and two optimizer steps per rollout batch; also with the loss made inside the LM head's
    forward (ZeRO-3 gathers the partitioned head for it and takes the gradient it returns)."""
    extra = ["trainer.max_steps=3", f"model.fused_lm_head_loss={str(fused).lower()}"]
    _train(tmp_path / "one", *extra)
    _train(tmp_path / "two", *extra, nproc=2)
    w1, w2 = _final_weights(tmp_path / "one", 3), _final_weights(tmp_path / "two", 3)
    w0 = load_file(next((tmp_path / "one" / "warm_start_model").glob("*.safetensors")))
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 1e-3  # training moved the weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0)
    r1, r2 = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    for a, b in zip(r1, r2):
        for key in ("reward/mean", "accuracy", "response_len/mean"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6), key


@pytest.mark.slow
def test_demo_recipe_two_ranks_match_one_rank(tmp_path):
    """The demo recipe as shipped, its warm start included: under torchrun (OMP_NUM_THREADS=1) rank 0 warm-starts
    and rank 1 loads those weights and checks their digest; 4 RL steps on 2 ranks end where one process at one
    thread ends (1e-5), starting from bitwise the same warm-started weights."""
    quiet = ["trainer.max_steps=4", "trainer.eval_max_prompts=16", "logging.progress_bar=false",
             "logging.plot=false", "logging.tensorboard=false"]
    _train(tmp_path / "one", base=quiet)
    _train(tmp_path / "two", base=quiet, nproc=2)
    start = [load_file(next((tmp_path / d / "warm_start_model").glob("*.safetensors"))) for d in ("one", "two")]
    for k in start[0]:
        assert torch.equal(start[0][k], start[1][k]), k
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert summaries[0]["warm_start_steps"] == summaries[1]["warm_start_steps"] > 0
    w1, w2 = _final_weights(tmp_path / "one", 4), _final_weights(tmp_path / "two", 4)
    assert max((w1[k] - start[0][k]).abs().max().item() for k in w1) > 1e-4  # RL moved the weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path):
    """A run SIGKILLed after step 3 (checkpoints at steps 1, 2, 3), whose newest checkpoint then loses 4 bytes
    to disk damage, resumes with --resume auto from step 2 (saying it skipped step 3 and why) and reaches the
    same weights and metrics as an uninterrupted run, bit for bit."""
    common = ["trainer.max_steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=3"]
    _train(tmp_path / "straight", *common)
    killed = _train(tmp_path / "resumed", *common, env_extra={"GRPO_TEST_KILL_AFTER_STEP": "3"}, check=False,
                    script=str(ROOT / "tests" / "fault_run.py"))
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL
    root = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000001", "step_000002", "step_000003"]
    ds = root / "step_000003" / "ds"  # ZeRO 1-3 keep optimizer states apart; stage 0 (one rank) in model_states
    optim = next(iter(sorted(ds.rglob("*optim_states.pt")) or sorted(ds.rglob("*model_states.pt"))))
    data = bytearray(optim.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 4])
    optim.write_bytes(bytes(data))
    proc = _train(tmp_path / "resumed", *common, "--resume", "auto")
    assert "resumed from" in proc.stdout and "step_000002 at step 2" in proc.stdout
    assert "skipped step_000003" in proc.stdout and f"{optim.name} fails its sha256 check" in proc.stdout
    wa, wb = _final_weights(tmp_path / "straight", 4), _final_weights(tmp_path / "resumed", 4)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _train_rows(tmp_path / "straight") == _train_rows(tmp_path / "resumed")
    assert (root / "latest").read_text() == "step_000004"
    assert find_checkpoint(tmp_path / "resumed", "auto").name == "step_000004"
    assert [p.name for p in root.glob("step_000003.replaced-*")]  # the damaged one is kept aside, not deleted


@pytest.mark.slow
def test_resume_with_changed_config_is_refused(tmp_path):
    _train(tmp_path, "trainer.max_steps=1")
    proc = _train(tmp_path, "trainer.max_steps=3", "trainer.lr=1e-1", "--resume", "auto", check=False)
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()[-1:]
    assert "trainer.lr" in line and "--force" in line and "Traceback" not in proc.stderr
    _train(tmp_path, "trainer.max_steps=3", "trainer.lr=1e-1", "--resume", "auto", "--force")


def test_resume_at_another_zero_stage_is_one_clear_error(tmp_path):
    """A 1-rank run is stage 0 (one_rank_unpartitioned); resuming it at stage 3 cannot work, even with --force:
    one line naming both layouts, exit 2, and the checkpoint untouched."""
    _train(tmp_path, "trainer.max_steps=1")
    ckpt = tmp_path / "checkpoints" / "step_000001"
    before = sorted((p.relative_to(ckpt), p.stat().st_size) for p in ckpt.rglob("*") if p.is_file())
    proc = _train(tmp_path, "trainer.max_steps=2", "deepspeed.one_rank_unpartitioned=false", "--resume", "auto",
                  "--force", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert "cannot resume from" in line and "ZeRO stage 0 -> 3" in line and "one_rank_unpartitioned" in line, line
    assert f"model.path={ckpt / 'hf'}" in line, line
    assert sorted((p.relative_to(ckpt), p.stat().st_size) for p in ckpt.rglob("*") if p.is_file()) == before


class _FakeEngine:
    def save_checkpoint(self, path, tag):
        os.makedirs(os.path.join(path, tag), exist_ok=True)
        with open(os.path.join(path, tag, "state.pt"), "wb") as f:
            f.write(b"x" * 100)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import grpo_core.checkpoint as ckpt_mod

    state = {"step": 1}
    save_checkpoint(tmp_path, 1, engine=_FakeEngine(), trainer_state=state, rank=0, export_hf=None, keep_last=2,
                    run_id="r1")
    assert find_checkpoint(tmp_path, "auto").name == "step_000001"

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:  # killed while writing the manifest (the last file)
        m.setattr(ckpt_mod, "write_manifest", crash)
        with pytest.raises(RuntimeError, match="simulated"):
            save_checkpoint(tmp_path, 2, engine=_FakeEngine(), trainer_state={"step": 2}, rank=0, export_hf=None,
                            keep_last=2, run_id="r1")
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_000001"
    assert not (root / "step_000002").exists()
    assert find_checkpoint(tmp_path, "auto").name == "step_000001"

    with monkeypatch.context() as m:  # renamed into place but `latest` not yet updated
        m.setattr(ckpt_mod, "_atomic_write_text", crash)
        with pytest.raises(RuntimeError):
            save_checkpoint(tmp_path, 3, engine=_FakeEngine(), trainer_state={"step": 3}, rank=0, export_hf=None,
                            keep_last=2, run_id="r1")
    assert (root / "latest").read_text() == "step_000001"  # the pointer lags ...
    assert find_checkpoint(tmp_path, "auto").name == "step_000003"  # ... but the newest complete one wins
    # a new successful save cleans stale temporaries and keeps the last 2
    save_checkpoint(tmp_path, 4, engine=_FakeEngine(), trainer_state={"step": 4}, rank=0, export_hf=None, keep_last=2,
                    run_id="r1")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000003", "step_000004"]
    assert not list(root.glob(".tmp-*"))
    assert (root / "step_000004" / COMPLETE).exists()
    assert (root / "latest").read_text() == "step_000004"


def test_extension_build_locks_never_hang(tmp_path, monkeypatch, capsys):
    """A lock left by a killed torch-extension build made every later run wait forever: a stale one is named
    with the fix at once, a young one is waited on for a bounded time, and the shm_comm op (never built now)
    is ignored."""
    import time

    from grpo_core.distributed import SHM_COMM_OP, LaunchError, check_extension_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    check_extension_build_locks()  # no locks: nothing happens
    lock = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"cpu_adam/lock .*rm "):
        check_extension_build_locks(wait_s=0.3, poll_s=0.05)  # young, but still there after the bounded wait
    assert time.monotonic() - t0 < 5
    assert "waiting up to 0 s for a build of 'cpu_adam'" in capsys.readouterr().err
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(LaunchError, match=r"60 min old"):
        check_extension_build_locks()  # stale: at once, no wait
    shm = tmp_path / "py311_cpu" / SHM_COMM_OP / "lock"
    shm.parent.mkdir()
    shm.touch()
    lock.unlink()
    check_extension_build_locks(ignore=(SHM_COMM_OP,))  # an op this run does not build


def test_deepspeed_does_not_build_the_shm_op(tmp_path):
    """ZeRO-3 over gloo needs no compiled op: init_distributed starts in seconds with an empty extension dir
    (the shm_comm build took 2-4 minutes on a fresh machine)."""
    code = ("import sys; from grpo_core.distributed import init_distributed; init_distributed('cpu'); "
            "assert sys.modules['deepspeed.comm.torch'].build_shm_op() is None")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "ext").exists()


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_and_resumes(tmp_path):
    """SIGTERM (what SLURM and Kubernetes send to every process before killing) to a 2-rank torchrun job: both
    ranks finish the current step, save a checkpoint, write the summary and exit with code 75 and one line, no
    traceback; --resume auto then carries the run to its end."""
    import signal
    import time

    from grpo_core.checkpoint import verify_checkpoint

    out = tmp_path / "run"
    cmd = _train_cmd(out, "trainer.max_steps=40", "checkpoint.save_every=0", "algorithm.hidden_align_coef=0",
                     nproc=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 500
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            if any('"phase": "train"' in r for r in rows):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # every process of the job: the launcher and both ranks
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # torchrun's own agent prints a traceback for the SIGTERM it got (SignalException); no frame is ours
    assert 'grpo_core/' not in stderr and "KeyboardInterrupt" not in stderr, stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and 1 <= summary["steps"] < 40, summary
    step = summary["steps"]
    assert f"grpo train: stopped by SIGTERM after step {step}; saved {out / 'checkpoints' / f'step_{step:06d}'}" \
        in stderr, stderr[-3000:]
    assert proc.returncode != 0  # torchrun reports the stopped workers (each exited 75)
    ckpt = find_checkpoint(out, "auto")
    assert ckpt.name == f"step_{step:06d}" and verify_checkpoint(ckpt) is None
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["phase"] == "train") == step
    _train(out, f"trainer.max_steps={step + 1}", "checkpoint.save_every=0", "algorithm.hidden_align_coef=0",
           "--resume", "auto", nproc=2)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "train"] == list(range(1, step + 2))
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 1


@pytest.mark.parametrize("sig, code", [("SIGTERM", 75), ("SIGINT", 130)])
def test_signal_single_process_exit_code(tmp_path, sig, code):
    """Without a launcher the exit code is the run's own: 75 after SIGTERM, 130 after Ctrl-C (SIGINT to the
    whole process group, as a terminal sends it), with one line and no traceback."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = _train_cmd(out, "trainer.max_steps=40", "checkpoint.save_every=0", "warm_start.steps=0",
                     "trainer.eval_max_prompts=1", "checkpoint.export_hf=false")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, getattr(signal, sig))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and f"grpo train: stopped by {sig} after step" in stderr
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == sig


def _digest_rank(rank: int, port: int, same: bool, results) -> None:
    import torch.distributed as dist

    from grpo_core.distributed import LaunchError, check_same_weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0 if same else rank)
    module = torch.nn.Linear(5, 3)
    try:
        check_same_weights(module, what="the test weights")
        results.put((rank, "ok"))
    except LaunchError as e:
        results.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("same", [True, False], ids=["equal", "differ"])
def test_weight_digest_check_stops_every_rank_when_weights_differ(same):
    """check_same_weights: bitwise-equal weights pass; weights that differ (rank 1's seed) stop every rank with
    one line naming the ranks."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_digest_rank, args=(r, port, same, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    got = dict(results.get(timeout=5) for _ in range(2))
    if same:
        assert got == {0: "ok", 1: "ok"}
    else:
        for rank in (0, 1):
            assert "the test weights differ between rank 0 and rank(s) [1]" in got[rank], got
