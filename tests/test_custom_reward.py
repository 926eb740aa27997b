"""Bring your own task: custom reward functions (verl signature), routing by data_source, field mapping,
system prompt and chat-template options, and a 2-step training run on a question/final_answer JSONL."""
import json
import time
from types import SimpleNamespace

import pytest

from grpo_core.config import ConfigError, load_config
from grpo_core.data.dataset import PromptDataset
from grpo_core.data.io import DataError, write_dataset
from grpo_core.scoring import RewardFunctionError, Scorer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only add overhead

REWARD_FILE = '''
import json, os, time
from pathlib import Path
LOG = Path(__file__).with_suffix(".calls")

def exact(data_source, solution_str, ground_truth, extra_info=None):
    with open(LOG, "a") as f:
        f.write(json.dumps([data_source, solution_str, ground_truth, extra_info]) + "\\n")
    return 1.0 if solution_str.strip() == str(ground_truth) else 0.0

def with_extras(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 0.5, "length": len(solution_str), "acc": solution_str == ground_truth, "note": "text"}

def broken(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "ok":
        return 1.0
    raise KeyError("boom")

def always_broken(data_source, solution_str, ground_truth, extra_info=None):
    raise ZeroDivisionError("always")

def hangs(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "hang":
        time.sleep(60)
    return 2.0

def bad_type(data_source, solution_str, ground_truth, extra_info=None):
    return "1.0"
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    return path


def _rows(n, source="src"):
    return [SimpleNamespace(data_source=source, gold=f"g{i}", extra_info={"i": i}) for i in range(n)]


def _scorer(*overrides):
    return Scorer(load_config(None, list(overrides)))


def test_custom_function_gets_verl_arguments(reward_file):
    scorer = _scorer(f"reward.custom_function={reward_file}:exact")
    rows = _rows(2)
    res = scorer.score(["g0", "nope"], ["g0", "g1"], [0, 0], rows=rows)
    assert [r.score for r in res] == [1.0, 0.0] and [r.correct for r in res] == [True, False]
    calls = [json.loads(line) for line in reward_file.with_suffix(".calls").read_text().splitlines()]
    assert calls == [["src", "g0", "g0", {"i": 0}], ["src", "nope", "g1", {"i": 1}]]
    # The score is the reward (plus overlong shaping when on); no format term for custom rows.
    assert scorer.rewards(res, [3, 3], ["stop", "stop"], ["g0", "nope"]) == [1.0, 0.0]
    assert scorer.take_metrics()["reward/errors"] == 0.0


def test_dict_result_extras_and_acc(reward_file):
    scorer = _scorer(f"reward.custom_function={reward_file}:with_extras")
    res = scorer.score(["g0", "abcd"], ["g0", "g1"], [0, 0], rows=_rows(2))
    assert [r.score for r in res] == [0.5, 0.5]
    assert [r.correct for r in res] == [True, False]  # the dict's "acc" decides correctness
    scorer.rewards(res, [2, 4], ["stop"] * 2)
    m = scorer.take_metrics()
    assert m["reward/extra/length"] == pytest.approx(3.0) and m["reward/extra/acc"] == pytest.approx(0.5)
    assert "reward/extra/note" not in m


def test_errors_score_incorrect_counted_and_printed_once(reward_file, capsys):
    scorer = _scorer(f"reward.custom_function={reward_file}:broken", "reward.incorrect=-1.0")
    res = scorer.score(["ok", "x", "y"], ["a"] * 3, [0, 0, 0], rows=_rows(3))
    assert [r.score for r in res] == [1.0, -1.0, -1.0] and [r.error for r in res] == [False, True, True]
    assert scorer.rewards(res, [1, 1, 1], ["stop"] * 3) == [1.0, -1.0, -1.0]
    assert scorer.take_metrics()["reward/errors"] == 2.0
    err = capsys.readouterr().err
    assert err.count("KeyError: 'boom'") == 1 and "counted in reward/errors" in err


def test_function_failing_every_call_stops_the_run(reward_file):
    scorer = _scorer(f"reward.custom_function={reward_file}:always_broken", "reward.custom_error_limit=5")
    scorer.score(["a", "b"], ["x", "x"], [0, 0], rows=_rows(2))
    with pytest.raises(RewardFunctionError, match=r"failed on all of its first 6 calls"):
        scorer.score(["a"] * 4, ["x"] * 4, [0] * 4, rows=_rows(4))


def test_bad_return_type_is_an_error(reward_file):
    scorer = _scorer(f"reward.custom_function={reward_file}:bad_type")
    (res,) = scorer.score(["a"], ["x"], [0], rows=_rows(1))
    assert res.error and res.score == 0.0


def test_hanging_function_is_killed_in_the_worker_pool(reward_file):
    scorer = _scorer(f"reward.custom_function={reward_file}:hangs", "reward.verifier_workers=2",
                     "reward.verifier_timeout_s=1.0")
    try:
        t0 = time.monotonic()
        res = scorer.score(["a", "hang", "b", "c"], ["x"] * 4, [0] * 4, rows=_rows(4))
        assert time.monotonic() - t0 < 1.0 + 2.0
        assert [r.score for r in res] == [2.0, 0.0, 2.0, 2.0] and res[1].error
        # the pool replaced the killed worker and keeps going
        assert [r.score for r in scorer.score(["d"], ["x"], [0], rows=_rows(1))] == [2.0]
    finally:
        scorer.close()


def test_routing_by_data_source(reward_file):
    scorer = _scorer(f"reward.by_source={{mine: '{reward_file}:exact', prog: code}}", "reward.code_timeout_s=3")
    rows = [SimpleNamespace(data_source="mine", gold="7", extra_info={}),
            SimpleNamespace(data_source="gsm", gold="12", extra_info={}),
            SimpleNamespace(data_source="prog", gold="assert f() == 1", extra_info={})]
    texts = ["7", "so \\boxed{12}", "```python\ndef f():\n    return 1\n```"]
    res = scorer.score(texts, [r.gold for r in rows], [0, 1, 2], rows=rows)
    assert [r.scorer for r in res] == [f"{reward_file}:exact", "math", "code"]
    assert all(r.correct for r in res)
    scorer.rewards(res, [1, 5, 9], ["stop"] * 3, texts)
    m = scorer.take_metrics()
    assert m["accuracy/by_source/gsm"] == 1.0 and m["reward/by_source/prog"] == 1.0
    assert m["reward/extra/code_pass_frac"] == 1.0


@pytest.mark.parametrize("override, key", [
    ("reward.custom_function=nofunction", "reward.custom_function"),
    ("reward.custom_function=math", "reward.custom_function"),
    ("reward.default=sympy", "reward.default"),
    ("reward.by_source={a: 'x.py:'}", "reward.by_source.a"),
    ("data.answer_key=a..b", "data.answer_key"),
    ("data.prompt_key=", "data.prompt_key"),
    ("reward.code_timeout_s=0", "reward.code_timeout_s"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file_or_function_names_the_key(tmp_path, reward_file):
    with pytest.raises(RewardFunctionError, match=r"reward.custom_function.*does not exist"):
        _scorer(f"reward.custom_function={tmp_path}/nope.py:f")
    with pytest.raises(RewardFunctionError, match=r"reward.by_source.x.*has no function 'nope'"):
        _scorer(f"reward.by_source={{x: '{reward_file}:nope'}}")
    scorer = _scorer("reward.custom_function=json:dumps")  # package.module:NAME form
    assert scorer.default_spec == "json:dumps"


class _Tok:
    """A stand-in tokenizer recording the chat-template call."""

    def __init__(self):
        self.kwargs = []

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
        self.kwargs.append(kw)
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def encode(self, text):
        return [ord(c) for c in text]


def test_field_mapping_system_prompt_and_template_kwargs(tmp_path):
    path = write_dataset([{"question": "1+1?", "final_answer": 2, "meta": {"gold": "two"}},
                          {"question": "2+2?", "final_answer": "4", "meta": {"gold": "four"}}], tmp_path / "q.jsonl")
    tok = _Tok()
    ds = PromptDataset(path, tok, prompt_key="question", answer_key="final_answer", system_prompt="Be brief.",
                       chat_template_kwargs={"enable_thinking": False})
    assert ds.formats[str(path)] == "mapped"
    assert ds[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    assert ds[0].answer == "2" and ds[0].gold == 2 and ds[1].gold == "4"
    assert tok.kwargs[0] == {"enable_thinking": False}
    dotted = PromptDataset(path, _Tok(), prompt_key="question", answer_key="meta.gold")
    assert [s.answer for s in dotted] == ["two", "four"]
    with pytest.raises(DataError, match=r"q.jsonl row 0: field 'meta.nope' is missing \(data.answer_key"):
        PromptDataset(path, _Tok(), prompt_key="question", answer_key="meta.nope")
    with pytest.raises(DataError, match=r"no field 'query' \(data.prompt_key\)"):
        PromptDataset(path, _Tok(), prompt_key="query", answer_key="final_answer")


def test_system_prompt_not_added_to_chat_prompts(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "reward_model": {"ground_truth": "1"}}]
    path = write_dataset(rows, tmp_path / "v.parquet")
    ds = PromptDataset(path, _Tok(), system_prompt="SYS")
    assert ds[0].messages == [{"role": "user", "content": "hi"}]
    plain = write_dataset([{"prompt": "hi", "answer": "1"}], tmp_path / "p.jsonl")
    assert PromptDataset(plain, _Tok(), system_prompt="SYS")[0].messages[0] == {"role": "system", "content": "SYS"}


def test_question_final_answer_jsonl_trains_two_steps_with_custom_reward(tmp_path, reward_file):
    """Acceptance: a JSONL with question/final_answer fields and a custom reward file trains 2 steps; the
    function is called with (data_source, response text, ground truth, extra_info)."""
    from grpo_core.trainer import train

    rows = [{"question": f"{a}+{b}=", "final_answer": str(a + b), "data_source": "sums",
             "extra_info": {"a": a, "b": b}} for a in range(4) for b in range(4)]
    data = write_dataset(rows, tmp_path / "data" / "sums.jsonl")
    out = tmp_path / "run"
    cfg = load_config(None, [
        "model.tiny_hidden_size=32", "model.tiny_num_layers=1", "model.tiny_num_heads=2",
        "model.tiny_num_kv_heads=1", "model.tiny_intermediate_size=64", "model.kernel_backend=torch",
        f"data.train_files=[{data}]", "data.prompt_key=question", "data.answer_key=final_answer",
        "data.system_prompt=Answer with a number.", f"reward.custom_function={reward_file}:exact",
        "rollout.group_size=2", "rollout.max_new_tokens=6", "trainer.train_batch_prompts=2", "trainer.max_steps=2",
        "trainer.device=cpu", f"trainer.output_dir={out}", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.plot=false", "algorithm.dynamic_sampling=false",
    ])
    summary = train(cfg)
    assert summary["steps"] == 2
    calls = [json.loads(line) for line in reward_file.with_suffix(".calls").read_text().splitlines()]
    assert len(calls) == 2 * 2 * 2  # steps x prompts x group size
    by_question = {f"{r['a']}+{r['b']}=": r for r in (row["extra_info"] for row in rows)}
    for source, text, gold, extra in calls:
        assert source == "sums" and isinstance(text, str)
        assert gold == str(extra["a"] + extra["b"]) and extra in by_question.values()
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_rows = [m for m in metrics if m.get("phase") == "train"]
    assert len(train_rows) == 2 and all(m["reward/errors"] == 0.0 for m in train_rows)


def test_extra_info_passed_through_or_none_as_in_verl(tmp_path, reward_file):
    path = write_dataset([{"question": "a", "final_answer": "1"},
                          {"question": "b", "final_answer": "2", "extra_info": {"k": [1, 2]}}], tmp_path / "x.jsonl")
    rows = PromptDataset(path, _Tok(), prompt_key="question", answer_key="final_answer").samples
    scorer = _scorer(f"reward.custom_function={reward_file}:exact")
    scorer.score(["1", "zz"], [r.answer for r in rows], [0, 1], rows=rows)
    calls = [json.loads(line) for line in reward_file.with_suffix(".calls").read_text().splitlines()]
    assert calls == [["x", "1", "1", None], ["x", "zz", "2", {"k": [1, 2]}]]
    plain = write_dataset([{"prompt": "q", "answer": "1", "extra_info": {"i": 7}}], tmp_path / "p.jsonl")
    assert PromptDataset(plain, _Tok())[0].extra_info == {"i": 7}


def test_all_failed_stop_is_taken_by_every_rank_together(reward_file, monkeypatch):
    """With several ranks the stop waits for take_metrics (a collective), so no rank stops alone."""
    import torch.distributed as dist

    from grpo_core import distributed as gdist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    peer = {"errors": 0, "n": 0, "extras": {}, "sources": {}, "fatal": None}
    monkeypatch.setattr(gdist, "all_gather_objects", lambda obj: [obj, peer])
    scorer = _scorer(f"reward.custom_function={reward_file}:always_broken", "reward.custom_error_limit=5")
    scorer.score(["a"] * 6, ["x"] * 6, [0] * 6, rows=_rows(6))  # over the limit: no raise on this rank yet
    with pytest.raises(RewardFunctionError, match=r"failed on all of its first 6 calls"):
        scorer.take_metrics()
    # a healthy rank stops too when its peer has decided to stop
    ok = _scorer(f"reward.custom_function={reward_file}:always_broken", "reward.custom_error_limit=50")
    ok.score(["a"], ["x"], [0], rows=_rows(1))
    peer["fatal"] = "custom reward 'x' failed on all of its first 50 calls"
    with pytest.raises(RewardFunctionError, match="first 50 calls"):
        ok.take_metrics()


HOSTILE_FILE = '''
import os, sys, time
def exits(data_source, solution_str, ground_truth, extra_info=None):
    sys.exit(0)
def hard_exit(data_source, solution_str, ground_truth, extra_info=None):
    os._exit(0)
def interrupts(data_source, solution_str, ground_truth, extra_info=None):
    raise KeyboardInterrupt
def forks(data_source, solution_str, ground_truth, extra_info=None):
    if os.fork() == 0:
        with open(os.path.join(os.path.dirname(__file__), "pids"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(60)
        os._exit(0)
    return 1.0
def two_args(solution_str, ground_truth):
    return 1.0
'''


@pytest.fixture
def hostile_file(tmp_path):
    path = tmp_path / "hostile.py"
    path.write_text(HOSTILE_FILE)
    return path


@pytest.mark.parametrize("name, said", [("exits", "SystemExit"), ("hard_exit", "ended its worker process"),
                                        ("interrupts", "KeyboardInterrupt")])
def test_exit_or_interrupt_in_the_function_is_an_error_of_that_call(hostile_file, name, said, capsys):
    """Custom functions run in worker processes: sys.exit, os._exit and KeyboardInterrupt score incorrect
    and are reported in one line, the trainer goes on."""
    scorer = _scorer(f"reward.custom_function={hostile_file}:{name}")
    try:
        res = scorer.score(["a", "b"], ["x", "x"], [0, 0], rows=_rows(2))
        assert all(r.error for r in res)
    finally:
        scorer.close()
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert "never" not in (scorer.never_succeeded() or "never") and "failed on all of its 2 calls" in \
        scorer.never_succeeded()


def test_children_forked_by_the_function_die_with_the_pool(hostile_file, tmp_path):
    import os

    from grpo_core.outdir import pid_alive

    pid_file = tmp_path / "pids"
    scorer = _scorer(f"reward.custom_function={hostile_file}:forks")
    assert [r.score for r in scorer.score(["a"], ["x"], [0], rows=_rows(1))] == [1.0]
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text().split()[0])
    scorer.close()
    for _ in range(100):
        if not pid_alive(child):
            break
        time.sleep(0.05)
    assert not pid_alive(child)
    assert os.getpid() != child


def test_module_that_exits_at_import_or_wrong_signature_is_a_config_error(tmp_path, hostile_file):
    from grpo_core.scoring import check_custom_functions

    bad = tmp_path / "bad.py"
    bad.write_text("import os\nos._exit(3)\n")
    with pytest.raises(RewardFunctionError, match=r"reward.custom_function.*ended \(exit code 3"):
        _scorer(f"reward.custom_function={bad}:f")
    with pytest.raises(RewardFunctionError, match=r"reward.by_source.s.*two_args\(solution_str, ground_truth\) "
                                                  r"cannot take verl's 4 arguments"):
        check_custom_functions(load_config(None, [f"reward.by_source={{s: '{hostile_file}:two_args'}}"]))


def test_cli_refuses_a_bad_reward_before_writing_anything(tmp_path, hostile_file, capsys):
    from grpo_core.cli import main

    out = tmp_path / "run"
    for spec in (f"{hostile_file}:two_args", f"{hostile_file}:nope", f"{tmp_path}/none.py:f", "no_such_mod_q:f"):
        rc = main(["train", "configs/demo_cpu.yaml", "--set", f"trainer.output_dir={out}",
                   "--set", f"reward.custom_function={spec}"])
        err = capsys.readouterr().err
        assert rc == 2 and "reward.custom_function" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_huge_scores_are_errors_not_nan_advantages(tmp_path):
    path = tmp_path / "big.py"
    path.write_text("def f(d, s, g, e=None):\n    return 1e308 if s == 'a' else 5.0\n")
    scorer = _scorer(f"reward.custom_function={path}:f")
    try:
        res = scorer.score(["a", "b"], ["x", "x"], [0, 0], rows=_rows(2))
    finally:
        scorer.close()
    assert res[0].error and res[0].score == 0.0 and res[1].score == 5.0
