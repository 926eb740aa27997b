"""The code task family (pyfunc) and the code scorer end to end: rows, their tests, and a 2-step run."""
import json
import random

import pytest

from grpo_core.config import load_config
from grpo_core.rewards import code_reward
from grpo_core.tasks import TASKS, make_synthetic, make_train_test
from grpo_core.tasks.pyfunc import make_pyfunc_row

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only add overhead


def test_rows_are_short_deterministic_and_their_solutions_pass():
    rows = make_synthetic("pyfunc", 12, seed=3)
    assert rows == make_synthetic("pyfunc", 12, seed=3)
    assert TASKS["pyfunc"].scorer == "code"
    for row in rows[:6]:
        assert row["data_source"] in ("pyfunc_l1", "pyfunc_l2")
        assert len(row["prompt"]) <= 40 and len(row["solution"]) <= 48
        assert row["answer"].count("assert f(") == 3
        assert code_reward(row["solution"], row["answer"], timeout_s=5.0) == 1.0


def test_words_read_left_to_right():
    rng = random.Random(0)
    rows = [make_pyfunc_row(rng, 2) for _ in range(200)]
    row = next(r for r in rows if "plus" in r["prompt"].split("times")[0] and "times" in r["prompt"])
    # "x plus a times b" is (x+a)*b, not x+a*b.
    assert "(x+" in row["solution"]


def test_partial_credit_for_a_partly_right_function():
    row = {"answer": "assert f(-2) == -4\nassert f(1) == 5\nassert f(5) == 17\n"}  # x*3+2
    assert code_reward("```python\ndef f(x): return x*3+2\n```", row["answer"]) == 1.0
    assert code_reward("```python\ndef f(x): return 5\n```", row["answer"]) == pytest.approx(1 / 3)
    assert code_reward("def f(x): return x*3+2", row["answer"]) == 1.0  # no fence: the whole response


def test_code_task_trains_two_steps_through_the_code_scorer(tmp_path):
    """The recipe's path (synthetic pyfunc rows, reward.default=code, sandboxed tests) for 2 steps (no warm start:
    kept short; the recipe's learning curve is measured in the README); the sandbox pass fraction is logged."""
    from pathlib import Path

    from grpo_core.trainer import train

    recipe = Path(__file__).resolve().parents[1] / "configs" / "code_cpu.yaml"
    out = tmp_path / "run"
    cfg = load_config(recipe, [
        f"trainer.output_dir={out}", "trainer.max_steps=2", "trainer.eval_every=0",
        "model.tiny_hidden_size=32", "model.tiny_num_layers=1", "model.tiny_intermediate_size=64",
        "model.kernel_backend=torch", "data.synthetic_train_size=64", "data.synthetic_eval_size=0",
        "warm_start.steps=0", "rollout.group_size=4", "trainer.train_batch_prompts=2",
        "algorithm.dynamic_sampling=false", "logging.plot=false", "reward.verifier_workers=0",
    ])
    assert cfg.reward.default == "code"
    summary = train(cfg)
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_rows = [r for r in rows if r["phase"] == "train"]
    assert len(train_rows) == 2
    for r in train_rows:
        assert 0.0 <= r["reward/extra/code_pass_frac"] <= 1.0 and r["reward/errors"] == 0.0


def test_make_train_test_with_code_kind():
    train, test = make_train_test(["pyfunc"], 40, 10, seed=0, level=2)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
