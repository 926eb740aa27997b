"""What a newcomer sees and gets from a run: curves.png, file modes, the run header and provenance, progress
bars, a quiet console, and the starting recipe for a real instruct model."""
import json
import os
import stat
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from grpo_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- curves.png
def _rows(n=30):
    rows = [{"step": 0, "phase": "eval", "accuracy": 0.5, "accuracy_sampled": 0.3}]
    for s in range(1, n + 1):
        acc = 0.3 + 0.01 * s
        rows.append({"step": s, "phase": "train", "reward/mean": acc, "accuracy": acc,  # reward == accuracy
                     "entropy/mean": 0.2 - 0.001 * s, "clip/low_frac": 0.003 + 0.0001 * (s % 3),
                     "clip/high_frac": 0.0005 * (s % 2), "nsr/rescue_frac": 0.002 + 0.0002 * (s % 4),
                     "hidden_align/cos": float("nan") if s == 3 else 0.99, "response_len/mean": 20.0,
                     "grad_norm": 1.0, "time/rollout_s": 2.0, "time/update_s": 3.0})
    rows.append({"step": n, "phase": "eval", "accuracy": 0.8, "accuracy_sampled": 0.6})
    return rows


def test_curves_one_labelled_panel_per_quantity(tmp_path):
    import matplotlib.pyplot as plt

    from grpo_core.tracking import curve_figure, plot_curves

    fig = curve_figure(_rows(), title="t")
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    try:
        for name in ("reward", "accuracy", "entropy", "clipped tokens", "NSR rescued tokens", "Hidden-Align"):
            assert name in axes, sorted(axes)
        assert all(ax.get_ylabel() for ax in axes.values()), {t: ax.get_ylabel() for t, ax in axes.items()}
        # reward and accuracy (equal here) no longer share an axis: neither hides the other
        assert axes["reward"] is not axes["accuracy"]
        assert [ln.get_label() for ln in axes["accuracy"].lines] == [
            "train (rollouts, sampled)", "held-out (greedy)", "held-out (sampled)"]
        # small fractions get their own scale, in percent: the y range fits the data, not [0, 1]
        for name, peak in (("clipped tokens", 0.32), ("NSR rescued tokens", 0.26)):
            lo, hi = axes[name].get_ylim()
            assert axes[name].get_ylabel() == "% of response tokens"
            assert peak <= hi < 1.0, (name, lo, hi)
        assert len(axes["clipped tokens"].lines) == 2
        # a NaN step (no Hidden-Align pair) is skipped, not drawn as a gap-making None
        assert len(axes["Hidden-Align"].lines[0].get_xdata()) == 29
    finally:
        plt.close(fig)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_curves_with_few_metrics():
    import matplotlib.pyplot as plt

    from grpo_core.tracking import curve_figure

    fig = curve_figure([{"step": 1, "phase": "train", "reward/mean": 0.5}])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["reward"]
    plt.close(fig)
    fig = curve_figure([])
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- file modes
@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_follow_umask(tmp_path, umask, mask, mode):
    """Parquet/JSONL data and safetensors weights get 0666 & ~umask, like any file a plain open() makes
    (mkstemp and safetensors alone would make them 0600)."""
    from grpo_core.data.io import write_dataset
    from grpo_core.fsmode import current_umask
    from grpo_core.model.checkpoint_io import write_weights

    umask(mask)
    assert current_umask() == mask
    rows = [{"prompt": "1+1?", "answer": "2"}]
    files = [write_dataset(rows, tmp_path / "d.parquet"), write_dataset(rows, tmp_path / "d.jsonl")]
    tensors = {"a": torch.zeros(3), "b": torch.ones(5)}
    files += [tmp_path / n for n in write_weights(tmp_path, tensors, max_shard_bytes=10**9)]
    (tmp_path / "shards").mkdir()
    files += [tmp_path / "shards" / n for n in write_weights(tmp_path / "shards", tensors, max_shard_bytes=16)]
    assert len(files) == 6  # parquet, jsonl, 1 safetensors, 2 shards + index
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == mode, (f.name, oct(f.stat().st_mode))


def test_saved_model_is_group_and_world_readable(tmp_path, umask, tiny_dir):
    from grpo_core.model import CausalLM

    umask(0o022)
    CausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path / "m")
    weights = list((tmp_path / "m").glob("*.safetensors"))
    assert weights and all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in weights)


# ---------------------------------------------------------------------------------------------- header + provenance
def test_provenance_names_what_the_numbers_depend_on():
    from grpo_core.runinfo import provenance

    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["trainer.seed=7"])
    p = provenance(cfg)
    json.dumps(p)  # goes into summary.json as is
    assert p["seed"] == 7
    assert p["torch"] == torch.__version__
    assert p["torch_num_threads"] == torch.get_num_threads() == 1  # the one_thread fixture
    import deepspeed
    import triton

    assert p["deepspeed"] == deepspeed.__version__ and p["triton"] == triton.__version__
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert p["git_commit"].split("+")[0] == head.strip()


def test_git_commit_outside_a_checkout(tmp_path):
    from grpo_core.runinfo import git_commit

    assert git_commit(tmp_path) is None


def test_header_says_what_will_happen(tmp_path):
    from grpo_core.runinfo import format_header, provenance, run_plan

    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", [f"trainer.output_dir={tmp_path}"])
    text = format_header(cfg, provenance(cfg))
    for part in ("seed 0", f"torch {torch.__version__}", "deepspeed", "torch threads", "plan:",
                 f"supervised warm start: up to {cfg.warm_start.steps} steps",
                 f"training prompts reaches {cfg.warm_start.target_accuracy:g}", "before RL", "RL: 100 steps x 16 prompts x 8 samples",
                 "every 20 steps", str(tmp_path / "checkpoints" / "step_000100" / "hf")):
        assert part in text, (part, text)
    bare = load_config(None, ["data.train_files=[x.parquet]", "model.path=/m", "trainer.max_steps=7",
                              "checkpoint.save_every=5"])
    plan = run_plan(bare, resume="auto")
    assert not any(line.startswith(("supervised warm start", "build the project's tiny", "held-out evaluation"))
                   for line in plan), plan
    assert any("resume" in line for line in plan) and "checkpoint every 5 steps" in plan[-2]
    assert "step_000007" in plan[-1]


# ---------------------------------------------------------------------------------------------- console
def test_only_the_deepspeed_deprecations_are_filtered():
    from grpo_core.runinfo import quiet_known_warnings

    msg = "`torch.distributed.{}` is deprecated. Please use `torch.distributed.{}` instead."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for old, new in (("all_gather_into_tensor", "all_gather_single"),
                         ("reduce_scatter_tensor", "reduce_scatter_single")):
            warnings.warn_explicit(msg.format(old, new), FutureWarning, "c10d_logger.py", 83,
                                   module="torch.distributed.c10d_logger")
            warnings.warn_explicit(msg.format(old, new), FutureWarning, "elsewhere.py", 1, module="mypkg.x")
        warnings.warn_explicit("`torch.distributed.all_reduce_coalesced` will be deprecated", FutureWarning,
                               "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
        warnings.warn_explicit(msg.format("all_gather_into_tensor", "x"), DeprecationWarning, "c10d_logger.py", 83,
                               module="torch.distributed.c10d_logger")
    assert [w.filename for w in seen] == ["elsewhere.py", "elsewhere.py", "c10d_logger.py", "c10d_logger.py"]


# ---------------------------------------------------------------------------------------------- progress
def test_generate_in_chunks_equals_one_call(tiny_dir, capsys):
    from grpo_core.model import CausalLM
    from grpo_core.progress import generate_with_progress
    from grpo_core.rollout import SamplingParams, build_engine
    from grpo_core.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_dir)
    engine = build_engine("torch", model=CausalLM.from_pretrained(tiny_dir), tokenizer=tok, max_batch_size=4)
    prompts = [tok.encode(f"{a}+{a + 1}=") for a in range(5)]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3)
    whole = engine.generate(prompts, params)
    chunked = generate_with_progress(engine, prompts, params, desc="gen", chunk_prompts=2)
    assert [(g.prompt_index, g.sample_index, g.token_ids) for g in chunked] == \
        [(g.prompt_index, g.sample_index, g.token_ids) for g in whole]
    err = capsys.readouterr().err
    assert "gen" in err and "5/5" in err and "prompt/s" in err  # count, rate
    ids = [7, 9, 11, 13, 15]
    assert [g.token_ids for g in generate_with_progress(engine, prompts, params, desc="g", request_ids=ids,
                                                        chunk_prompts=3)] == \
        [g.token_ids for g in engine.generate(prompts, params, request_ids=ids)]
    capsys.readouterr()
    assert len(generate_with_progress(engine, prompts, params, desc="off", enabled=False)) == 10
    assert "off" not in capsys.readouterr().err


def test_progress_bar_only_on_rank_zero(monkeypatch, capsys):
    from grpo_core.progress import progress_bar

    monkeypatch.setenv("RANK", "1")
    for _ in progress_bar(3, "quiet", iterable=range(3)):
        pass
    monkeypatch.setenv("RANK", "0")
    for _ in progress_bar(3, "loud", iterable=range(3)):
        pass
    err = capsys.readouterr().err
    assert "loud" in err and "quiet" not in err


# ---------------------------------------------------------------------------------------------- the recipe
def test_instruct_math_recipe_is_a_real_starting_point():
    """configs/instruct_math.yaml: a real model path (not the tiny demo), verl-format files, chat template,
    and small CPU-sized batches."""
    cfg = load_config(ROOT / "configs" / "instruct_math.yaml")
    assert cfg.model.path and "Instruct" in cfg.model.path
    assert cfg.data.train_files and cfg.data.eval_files and cfg.data.prompt_template == ""
    assert cfg.warm_start.steps == 0 and cfg.trainer.lr <= 1e-5
    assert cfg.trainer.train_batch_prompts * cfg.rollout.group_size <= 16  # a few CPU steps, not a GPU batch
    text = (ROOT / "configs" / "instruct_math.yaml").read_text()
    assert text.count("GPU:") >= 8  # every size that differs on GPUs names its GPU value


def test_instruct_math_recipe_runs_on_cpu(tmp_path, tiny_dir):
    """The recipe end to end on CPU for one RL step, with the tiny model standing in for the instruct model
    and a verl-format parquet (chat-message prompts, reward_model.ground_truth)."""
    from grpo_core.data.io import write_dataset
    from grpo_core.trainer import train

    def verl_row(i):
        return {"data_source": "toy", "prompt": [{"role": "user", "content": f"What is {i}+1? Put it in \\boxed{{}}."}],
                "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
                "extra_info": {"index": i}}

    write_dataset([verl_row(i) for i in range(8)], tmp_path / "train.parquet")
    write_dataset([verl_row(i) for i in range(8, 12)], tmp_path / "test.parquet")
    cfg = load_config(ROOT / "configs" / "instruct_math.yaml", [
        f"model.path={tiny_dir}", f"data.train_files=[{tmp_path / 'train.parquet'}]",
        f"data.eval_files=[{tmp_path / 'test.parquet'}]", f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.max_steps=1", "rollout.max_new_tokens=8", "logging.progress_bar=false", "logging.plot=false",
        "logging.tensorboard=false"])
    summary = train(cfg)
    assert summary["steps"] == 1 and summary["eval_accuracy_before_rl"] is not None
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["provenance"]["seed"] == 0 and on_disk["provenance"]["torch"] == torch.__version__
    hf = tmp_path / "run" / "checkpoints" / "step_000001" / "hf"
    assert stat.S_IMODE(next(hf.glob("*.safetensors")).stat().st_mode) == 0o666 & ~_umask()


def _umask():
    from grpo_core.fsmode import current_umask

    return current_umask()


def test_one_install_command_for_the_gpu_extra():
    """README and every error that asks for the gpu extra quote the same command."""
    import re

    from grpo_core import GPU_EXTRA_INSTALL

    assert GPU_EXTRA_INSTALL in (ROOT / "README.md").read_text()
    others = []
    for path in [*(ROOT / "grpo_core").rglob("*.py"), ROOT / "README.md"]:
        for m in re.finditer(r"pip install[^\n`]*\[gpu\][^\n`]*", path.read_text()):
            if GPU_EXTRA_INSTALL not in m.group(0):
                others.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not others, others


def test_readme_names_the_real_checkpoint_path():
    text = (ROOT / "README.md").read_text()
    assert "step_N/" not in text and "checkpoints/step_000100/hf/" in text
    assert "configs/instruct_math.yaml" in text
