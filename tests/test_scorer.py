"""run_setup.Scorer: which answer forms count for correctness, for the format reward and for TTRL votes."""
import pytest

from grpo_core.config import ConfigError, load_config
from grpo_core.run_setup import Scorer


def _scorer(*overrides):
    return Scorer(load_config(None, list(overrides)))


def test_bare_answer_counts_for_correctness_not_for_format():
    scorer = _scorer("reward.format_reward=0.5")
    texts = ["12", "so \\boxed{12}", "The answer is 13", "blah"]
    results = scorer.score(texts, ["12"] * 4, [0, 0, 0, 0])
    assert [r.correct for r in results] == [True, True, False, False]
    rewards = scorer.rewards(results, [3] * 4, ["stop"] * 4, texts)
    # "blah" is a bare short response: an extracted answer (wrong), but no explicit answer form.
    assert rewards == [1.0, 1.5, 0.5, 0.0]
    with pytest.raises(ValueError, match="needs the response texts"):
        scorer.rewards(results, [3] * 4, ["stop"] * 4)


def test_bare_answers_off():
    scorer = _scorer("reward.bare_answer_max_chars=0")
    results = scorer.score(["12", "\\boxed{12}"], ["12", "12"], [0, 0])
    assert [r.correct for r in results] == [False, True]
    assert results[0].reason == "no_answer"


def test_ttrl_votes_only_explicit_answers():
    """Unlabeled prompt: three bare "7"s must not outvote two boxed 5s for the pseudo-label."""
    scorer = _scorer()
    texts = ["7", "7", "7", "\\boxed{5}", "the answer is 5"]
    results = scorer.score(texts, [None] * 5, [0] * 5)
    assert [r.correct for r in results] == [False, False, False, True, True]


def test_bad_bare_answer_length():
    with pytest.raises(ConfigError, match="reward.bare_answer_max_chars"):
        load_config(None, ["reward.bare_answer_max_chars=-1"])
