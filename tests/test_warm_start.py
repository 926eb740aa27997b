"""The supervised warm start: runs its steps, or stops at the first accuracy check that reaches
warm_start.target_accuracy; its weights reach every rank (tests/test_distributed.py covers 2 ranks)."""
from types import SimpleNamespace

import pytest
import torch

from grpo_core.config import ConfigError, load_config
from grpo_core.data.dataset import PromptDataset
from grpo_core.data.io import write_dataset
from grpo_core.model import CausalLM
from grpo_core.tasks.synthetic import make_train_test
from grpo_core.tiny import build_tiny_model_dir
from grpo_core.tokenizer import Tokenizer
from grpo_core.warm_start import supervised_warm_start

pytestmark = pytest.mark.usefixtures("one_thread")


class _Scorer:
    """Marks every response correct or wrong and counts the checks (one score() call per check)."""

    def __init__(self, correct: bool):
        self.correct, self.calls, self.sizes = correct, 0, []

    def score(self, texts, golds, group_ids, rows=None):
        self.calls += 1
        self.sizes.append(len(texts))
        return [SimpleNamespace(correct=self.correct) for _ in texts]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    build_tiny_model_dir(root / "model", family="qwen2", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=64, seed=0)
    train, _ = make_train_test(["arith"], 40, 0, seed=0, level=1)
    write_dataset(train, root / "train.parquet")
    tok = Tokenizer.from_pretrained(root / "model")
    return root, tok, PromptDataset([str(root / "train.parquet")], tok, prompt_template="{prompt}\n")


def _cfg(**ws):
    sets = ["model.tiny_hidden_size=32", "rollout.max_new_tokens=6", "warm_start.batch_size=4",
            "warm_start.steps=12", "logging.progress_bar=false"] + [f"warm_start.{k}={v}" for k, v in ws.items()]
    return load_config(None, sets)


def _run(tiny, cfg, scorer):
    root, tok, train = tiny
    policy = CausalLM.from_pretrained(root / "model", dtype=torch.float32)
    return supervised_warm_start(policy, tok, train, cfg, device=torch.device("cpu"), scorer=scorer), policy


def test_target_reached_stops_at_the_first_check(tiny):
    scorer = _Scorer(correct=True)
    out, _ = _run(tiny, _cfg(target_accuracy=0.5, check_every=5, check_prompts=7), scorer)
    assert out["warm_start_steps"] == 5 and scorer.calls == 1 and scorer.sizes == [7]
    assert out["warm_start_train_accuracy"] == 1.0 and out["warm_start_reached_target"] is True


def test_target_never_reached_runs_every_step(tiny):
    scorer = _Scorer(correct=False)
    out, _ = _run(tiny, _cfg(target_accuracy=0.5, check_every=5, check_prompts=7), scorer)
    assert out["warm_start_steps"] == 12 and scorer.calls == 2  # checks after steps 5 and 10
    assert out["warm_start_train_accuracy"] == 0.0 and out["warm_start_reached_target"] is False


def test_checks_leave_the_training_steps_unchanged(tiny):
    """The checks draw their prompts from their own generator and restore train mode: 12 steps with checks that
    never stop give the same weights, bit for bit, as 12 steps without any."""
    _, with_checks = _run(tiny, _cfg(target_accuracy=0.5, check_every=5), _Scorer(correct=False))
    out, plain = _run(tiny, _cfg(), _Scorer(correct=True))
    assert out["warm_start_steps"] == 12 and "warm_start_train_accuracy" not in out  # target 0: no checks
    for (name, a), (_, b) in zip(with_checks.named_parameters(), plain.named_parameters()):
        assert torch.equal(a, b), name


def test_greedy_check_scores_real_generations(tiny):
    """Without a stub: the check generates greedily and scores with the real scorer (an untrained model is wrong)."""
    from grpo_core.scoring import Scorer

    cfg = _cfg(target_accuracy=1.0, check_every=6, check_prompts=5)
    out, _ = _run(tiny, cfg, Scorer(cfg))
    assert out["warm_start_steps"] == 12 and 0.0 <= out["warm_start_train_accuracy"] < 1.0


@pytest.mark.parametrize("key,value", [("target_accuracy", 1.5), ("target_accuracy", -0.1), ("check_every", 0),
                                       ("check_prompts", 0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"warm_start.{key}"):
        _cfg(**{key: value})
