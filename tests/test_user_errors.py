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
    ("trainer.train_batch_prompts=100000", "trainer.train_batch_prompts"),
    ("warm_start.batch_size=1000000", "warm_start.batch_size"),
    ("model.tiny_num_layers=100000", "model.tiny_num_layers"),
    ("model.tiny_num_heads=64", "model.tiny_num_heads"),
    ("reward.verifier_workers=100000", "reward.verifier_workers"),
    ("data.synthetic_train_size=1000000000", "data.synthetic_train_size"),
    ("algorithm.max_gen_batches=1000000", "algorithm.max_gen_batches"),
    ("trainer.ppo_epochs=1000000", "trainer.ppo_epochs"),
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


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


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
    (lambda d: _edit_json(d / "tokenizer_config.json", chat_template=5), "chat template"),
    (lambda d: _edit_json(d / "tokenizer_config.json", chat_template="{% for %}"), "cannot be compiled"),
    (lambda d: _edit_config(d, max_position_embeddings=1), "leaves no room"),
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


# ------------------------------------------------------------------------------- outputs: the user's files

def test_make_synthetic_never_replaces_existing_files_without_force(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "test.jsonl").write_text("the user's own\n")
    argv = ["data", "make-synthetic", "--out", str(out), "--n-train", "6", "--n-test", "3", "--kinds", "arith",
            "--format", "jsonl"]
    line = _one_line_error(capsys, argv)
    assert "--force" in line and "test.jsonl" in line
    assert (out / "test.jsonl").read_text() == "the user's own\n" and not (out / "train.jsonl").exists()
    assert main(argv + ["--force"]) == 0 and (out / "test.jsonl").read_text() != "the user's own\n"


def test_output_dir_holding_the_users_folders_is_refused_and_nothing_moved(tmp_path, capsys, monkeypatch):
    """A folder named like a run artefact (data/, tb/) does not make a directory a previous run: only the
    marker a run writes does; nothing is moved, with or without --force."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.csv").write_text("1\n")
    (tmp_path / "src").mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--force"], ["--resume", "auto"]):
        line = _one_line_error(capsys, ["train", str(_ROOT / "configs/demo_cpu.yaml"), "--set",
                                        "trainer.output_dir=.", *extra])
        assert "trainer.output_dir" in line and "nothing was moved" in line or "no checkpoint" in line, line
        assert sorted(str(p) for p in tmp_path.rglob("*") if ".grpo-lock" not in str(p)) == before


def test_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for bad in ("/proc/grpo_nope", f"{tmp_path}/file/sub"):
        line = _one_line_error(capsys, ["train", "configs/demo_cpu.yaml", "--set", f"trainer.output_dir={bad}"])
        assert "trainer.output_dir" in line and bad in line


def test_force_moves_only_what_a_run_wrote(tmp_path):
    from grpo_core.outdir import MARKER_NAME, claim_output_dir

    out = tmp_path / "run"
    claim_output_dir(out, resume="none", force=False).release()  # a run claimed it: marker written
    assert (out / MARKER_NAME).exists()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "my_notes.md").write_text("mine\n")
    (out / "src").mkdir()
    claim_output_dir(out, resume="none", force=True, say=lambda m: None).release()
    archived = next(out.glob("previous-*"))
    assert (archived / "metrics.jsonl").exists()
    assert (out / "my_notes.md").read_text() == "mine\n" and (out / "src").is_dir()


def test_tilde_paths_are_expanded_everywhere(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["trainer.output_dir=~/runs/x", "model.path=~/m", "data.train_files=[~/a.jsonl]",
                             "data.eval_files=[~/b.jsonl]"])
    assert cfg.trainer.output_dir == f"{tmp_path}/runs/x" and cfg.model.path == f"{tmp_path}/m"
    assert cfg.data.train_files == [f"{tmp_path}/a.jsonl"] and cfg.data.eval_files == [f"{tmp_path}/b.jsonl"]
    with pytest.raises(ConfigError, match="trainer.output_dir"):
        load_config(None, ["trainer.output_dir=~no_such_user_zz/x"])


def test_eval_out_that_is_a_file_is_refused_before_evaluating(tiny_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    mine = tmp_path / "report.txt"
    mine.write_text("mine\n")
    line = _one_line_error(capsys, ["eval", str(tiny_dir), str(data), "--k", "1", "--out", str(mine)])
    assert "--out" in line and mine.read_text() == "mine\n"


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EDQUOT", "EROFS"])
def test_disk_full_while_writing_names_the_path(tmp_path, errno_name):
    import errno
    import os

    from grpo_core.cli import _one_line
    from grpo_core.errors import naming
    from grpo_core.model import checkpoint_io

    code = getattr(errno, errno_name)
    with pytest.raises(OSError) as info, naming(tmp_path / "metrics.jsonl"):
        raise OSError(code, os.strerror(code))  # what write() / close() raise: no file name
    assert _one_line(info.value).startswith(f"cannot write {tmp_path / 'metrics.jsonl'}: ")

    def full(*a, **k):
        raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    import torch

    orig = checkpoint_io.save_file
    checkpoint_io.save_file = full
    try:
        with pytest.raises(OSError) as info:
            checkpoint_io.write_weights(tmp_path, {"w": torch.zeros(2)}, 1 << 20)
    finally:
        checkpoint_io.save_file = orig
    assert info.value.errno == code and info.value.filename == str(tmp_path / "model.safetensors")


# ------------------------------------------------------------------------------- data the run reads

def test_partitioned_parquet_directory_is_read_as_one_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grpo_core.data.io import read_records
    from grpo_core.preflight import check_data_file

    ds = tmp_path / "ds"
    (ds / "split=a").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=", "answer": "2"}] * 3), ds / "split=a" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2=", "answer": "4"}] * 2), ds / "part-1.parquet")
    rows, _ = read_records(ds)
    assert len(rows) == 5
    check_data_file(str(ds), "data.train_files")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no .parquet files"):
        read_records(tmp_path / "empty")


def test_unreadable_file_is_reported_as_unreadable(tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    from grpo_core.cli import _one_line
    from grpo_core.data.io import DataError, read_records

    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "q", "answer": "1"}\n')

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(DataError, match="x.jsonl: cannot read: Permission denied"):
        read_records(f)
    line = _one_line(PermissionError(errno.EACCES, "Permission denied", str(f)))
    assert not line.startswith("cannot write") and line.startswith("permission denied") and str(f) in line


def test_verl_ground_truth_of_any_json_type_reaches_the_custom_reward_as_stored(tmp_path):
    from grpo_core.data.io import read_records, write_dataset
    from grpo_core.data.schema import rows_to_samples

    rows = [{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": gt}}
            for gt in (7, 2.5, [1, 2], {"a": 1}, "x")]
    path = write_dataset(rows, tmp_path / "v.jsonl")
    _, samples = rows_to_samples(*read_records(path), path, uid_prefix="v")
    assert [s.gold for s in samples] == [7, 2.5, [1, 2], {"a": 1}, "x"]
    assert [s.answer for s in samples] == ["7", "2.5", "[1, 2]", '{"a": 1}', "x"]


@pytest.mark.parametrize("row", [
    {"prompt": "a\ud800b", "answer": "1"},
    {"prompt": "q", "answer": "\udfff"},
    {"prompt": [{"role": "user", "content": "x\udc80"}], "reward_model": {"ground_truth": "1"}},
])
def test_lone_surrogates_are_refused_by_validate_naming_row_and_field(tmp_path, capsys, row):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(row) + "\n")
    rc = main(["data", "validate", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "row 0" in err and "lone surrogate" in err and "Traceback" not in err


_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_chat_template_that_refuses_a_prompt_is_a_user_error(model_copy):
    from grpo_core.errors import UserError
    from grpo_core.tokenizer import Tokenizer

    _edit_json(model_copy / "tokenizer_config.json",
               chat_template="{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}x")
    tok = Tokenizer.from_pretrained(model_copy)
    with pytest.raises(UserError, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])


def test_a_lock_held_by_a_leftover_child_names_the_way_out(tmp_path):
    """A process that inherited the lock (a child an earlier run left behind) is not called 'pid None'."""
    import os
    import time

    from grpo_core.errors import OutputDirError
    from grpo_core.outdir import RunLock

    lock = RunLock(tmp_path).acquire()
    pid = os.fork()
    if pid == 0:  # the leftover child: holds the inherited flock
        time.sleep(30)
        os._exit(0)
    try:
        lock.release()  # the run ended (its file emptied) but the child still holds the lock
        os.close(os.open(tmp_path / ".grpo-lock", os.O_RDONLY))
        with pytest.raises(OutputDirError, match="not a grpo run.*fuser"):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_native_write_errors_become_os_errors_naming_the_file(tmp_path):
    from grpo_core.errors import naming

    with pytest.raises(OSError) as info, naming(tmp_path / "tokenizer.json"):
        raise Exception("No space left on device (os error 28)")
    assert info.value.errno == 28 and info.value.filename == str(tmp_path / "tokenizer.json")
