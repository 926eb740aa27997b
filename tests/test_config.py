"""The config tree: YAML + overrides, one error naming the dotted key, DeepSpeed JSON generated from it, CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_core.config import ConfigError, config_diff, deepspeed_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_loads():
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml")
    assert cfg.rollout.engine == "torch" and cfg.algorithm.nsr == "scaled"
    assert cfg.algorithm.hidden_align_coef > 0 and cfg.warm_start.steps > 0


@pytest.mark.parametrize("override, key", [
    ("trainer.lrr=1", "trainer.lrr"),
    ("bogus.x=1", "bogus"),
    ("trainer.lr=abc", "trainer.lr"),
    ("trainer.lr=-1", "trainer.lr"),
    ("trainer.max_steps=1.5", "trainer.max_steps"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("algorithm.nsr=sometimes", "algorithm.nsr"),
    ("algorithm.dual_clip=0.5", "algorithm.dual_clip"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("rollout.group_size=true", "rollout.group_size"),
    ("data.prompt_template=no placeholder", "data.prompt_template"),
    ("trainer.adam_betas=[0.9]", "trainer.adam_betas"),
    ("trainer.mini_batches=3", "trainer.mini_batches"),
    ("model.tiny_num_kv_heads=3", "model.tiny_num_kv_heads"),
    ("trainer=3", "trainer"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{key}'" in str(e.value)


def test_overrides_and_yaml_quirks(tmp_path):
    cfg = load_config(None, ["trainer.lr=1e-6", "algorithm.dual_clip=3", "rollout.stop_strings=[a, b]",
                             "data.prompt_template={prompt}\n", "algorithm.nsr=off", "algorithm.dual_clip=null"])
    assert cfg.trainer.lr == 1e-6 and isinstance(cfg.trainer.lr, float)
    assert cfg.rollout.stop_strings == ["a", "b"]
    assert cfg.data.prompt_template == "{prompt}\n"  # kept verbatim, not read as a YAML mapping
    assert cfg.algorithm.nsr == "off" and cfg.algorithm.dual_clip is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer:\n  lr: 1e-5\nalgorithm:\n  nsr: off\n  tis: off\n")  # YAML 1.1: off -> False
    cfg = load_config(recipe)
    assert cfg.trainer.lr == 1e-5 and cfg.algorithm.nsr == "off" and cfg.algorithm.tis == "off"
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="'trainer.max_stepz'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_deepspeed_config_is_generated_from_the_tree():
    cfg = load_config(None, ["trainer.lr=3e-6", "trainer.grad_clip=0.5", "deepspeed.offload_optimizer=true",
                             "trainer.weight_decay=0.1", "trainer.adam_betas=[0.9, 0.95]"])
    ds = deepspeed_config(cfg, world_size=4, use_cuda=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5 and ds["train_batch_size"] == 4
    assert ds["optimizer"]["params"]["lr"] == 3e-6 and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["bf16"]["enabled"] is True
    assert deepspeed_config(cfg, world_size=1, use_cuda=False)["bf16"]["enabled"] is False


def test_config_diff_lists_changed_keys():
    a = load_config(None).to_dict()
    b = load_config(None, ["trainer.lr=0.5", "algorithm.nsr=band"]).to_dict()
    diff = config_diff(a, b)
    assert len(diff) == 2 and diff[0].startswith("algorithm.nsr") and diff[1].startswith("trainer.lr")


def test_cli_reports_config_errors_in_one_line():
    r = subprocess.run([sys.executable, "-m", "grpo_core", "train", "configs/demo_cpu.yaml", "--set",
                        "trainer.lr=fast"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["grpo train: config key 'trainer.lr': must be a number, got 'fast'"]
    r = subprocess.run([sys.executable, "-m", "grpo_core", "train", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--set" in r.stdout and "--resume" in r.stdout


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_recipe_loads(recipe):
    """Every shipped recipe is a valid config (unknown keys / wrong types would be one ConfigError)."""
    cfg = load_config(ROOT / "configs" / recipe)
    assert cfg.trainer.max_steps > 0 and cfg.trainer.output_dir
    ds = deepspeed_config(cfg, world_size=8, use_cuda=cfg.trainer.device == "cuda")
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage


def test_empty_config_file_is_refused(tmp_path):
    """An empty recipe used to start a 100-step default job in runs/default."""
    for text in ("", "# only a comment\n", "\n\n"):
        f = tmp_path / "empty.yaml"
        f.write_text(text)
        with pytest.raises(ConfigError, match="is empty"):
            load_config(f)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("trainer:\n  lr: 1.0e-5\n  max_steps: 3\n  lr: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"line 4: duplicate key 'lr' \(first set on line 2\)"):
        load_config(f)
    f.write_text("trainer:\n  lr: 1.0e-5\nmodel: {}\ntrainer:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'trainer'"):
        load_config(f)
    f.write_text("trainer:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="line 3 is not valid YAML"):
        load_config(f)


@pytest.mark.parametrize("override, suggestion", [
    ("trainer.max_step=3", "did you mean trainer.max_steps?"),
    ("trainer.maxsteps=3", "did you mean trainer.max_steps?"),
    ("rollout.temprature=0.7", "did you mean rollout.temperature?"),
    ("trainer.keep_last=3", "did you mean checkpoint.keep_last?"),  # right name, wrong section
    ("trainer.save_evry=3", "did you mean checkpoint.save_every?"),
    ("trainr.lr=1", "did you mean trainer?"),
    ("trainer.zzz=1", "known keys here: max_steps, output_dir"),
])
def test_unknown_key_suggests_the_nearest(override, suggestion, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert suggestion in str(e.value)
    f = tmp_path / "r.yaml"  # the same from a recipe file
    key, value = override.split("=")
    section, _, leaf = key.partition(".")
    f.write_text(f"{section}:\n  {leaf}: {value}\n" if leaf else f"{section}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert suggestion in str(e.value)


@pytest.mark.parametrize("override, key, words", [
    ("rollout.temperature=0", "rollout.temperature", "must be > 0"),
    ("trainer.grad_clip=-1", "trainer.grad_clip", "must be >= 0"),  # was reported as trainer.warmup_steps
    ("trainer.eval_every=-1", "trainer.eval_every", "must be >= 0"),
    ("trainer.lr=1e6", "trainer.lr", "must be in (0, 1]"),
    ("warm_start.lr=50", "warm_start.lr", "must be in (0, 1]"),
    ("trainer.max_consecutive_skips=0", "trainer.max_consecutive_skips", "must be >= 1"),
    ("data.synthetic_eval_size=-1", "data.synthetic_eval_size", "must be >= 0"),  # was named synthetic_train_size
    ("data.synthetic_train_size=0", "data.synthetic_train_size", "must be > 0"),
])
def test_ranges_name_the_right_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"config key '{key}': {words}")
