"""Hostile inputs end in one line naming the key, file or path and the fix, with exit 2 and before anything is
written where that can be known: values the config accepts but the run cannot use, model directories whose
parts disagree, outputs that would replace the user's files, and data the run cannot read."""
import json
import shutil

import pytest

from grpo_core.cli import main
from grpo_core.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("grpo ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------- values the run cannot use

@pytest.mark.parametrize("override, key", [
    ("data.synthetic_kinds=[sudoku]", "data.synthetic_kinds"),
    ("data.synthetic_kinds=[arith, arith]", "data.synthetic_kinds"),
    ("data.synthetic_kinds=[]", "data.synthetic_kinds"),
    ("data.synthetic_level=0", "data.synthetic_level"),
    ("data.synthetic_level=9", "data.synthetic_level"),
    ("rollout.stop_strings=['', 'x']", "rollout.stop_strings"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.group_size=100000", "rollout.group_size"),
    ("algorithm.fipo_tau=0", "algorithm.fipo_tau"),
    ("algorithm.fipo_eps=-0.1", "algorithm.fipo_eps"),
    ("algorithm.adv_eps=-1e-6", "algorithm.adv_eps"),
    ("algorithm.edas_kappa=0.5", "algorithm.edas_kappa"),
    ("reward.correct=0", "reward.correct"),
    ("reward.correct=-1", "reward.correct"),
    ("reward.correct=1e308", "reward.correct"),
    ("reward.incorrect=-1e9", "reward.incorrect"),
    ("trainer.seed=-1", "trainer.seed"),
])
def test_values_the_run_cannot_use_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_synthetic_settings_are_not_checked_when_train_files_are_given(tmp_path):
    cfg = load_config(None, [f"data.train_files=[{tmp_path}/x.jsonl]", "data.synthetic_kinds=[]"])
    assert cfg.data.synthetic_kinds == []


def test_a_model_too_big_for_this_machine_is_refused_before_any_write(tmp_path, capsys, monkeypatch):
    from grpo_core import preflight

    monkeypatch.setattr(preflight, "_available_bytes", lambda: 1 << 30)
    out = tmp_path / "run"
    line = _one_line_error(capsys, ["train", "configs/demo_cpu.yaml", "--set", f"trainer.output_dir={out}",
                                    "--set", "trainer.device=cpu", "--set", "model.tiny_hidden_size=8192",
                                    "--set", "model.tiny_intermediate_size=30000"])
    assert "model.tiny_hidden_size" in line and "GiB" in line and not out.exists()


# ------------------------------------------------------------------------------- model directories

@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


def _edit_config(model_dir, **changes):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, said", [
    (lambda d: _edit_config(d, intermediate_size=96), "config.json does not match the weights"),
    (lambda d: _edit_config(d, num_attention_heads=2, num_key_value_heads=2), "config.json does not match"),
    (lambda d: _edit_config(d, vocab_size=50), "does not match"),
    (lambda d: (d / "tokenizer.json").write_text("{not json"), "cannot be read as a tokenizer"),
    (lambda d: (d / "tokenizer.json").write_text("[1, 2]"), "cannot be read as a tokenizer"),
    (lambda d: (d / "tokenizer_config.json").write_text("{oops"), "tokenizer_config.json is not valid JSON"),
])
def test_model_dir_parts_that_disagree_are_one_line_in_train_and_eval(model_copy, tmp_path, capsys, damage, said):
    damage(model_copy)
    out = tmp_path / "run"
    line = _one_line_error(capsys, ["train", "configs/demo_cpu.yaml", "--set", f"model.path={model_copy}",
                                    "--set", f"trainer.output_dir={out}"])
    assert said in line and "model.path" in line and not out.exists()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    line = _one_line_error(capsys, ["eval", str(model_copy), str(data), "--k", "1", "--out", str(tmp_path / "ev")])
    assert said in line and "CHECKPOINT" in line and not (tmp_path / "ev").exists()
