"""`grpo eval`: pass@k / avg@k / maj@k through `summarize` against hand-computed values, EAS on hand-made
entropies and through the packed fused-kernel path against full logits, argument checks, and the JSON /
Markdown outputs of a real tiny `grpo eval` run."""
import json
import math
from argparse import Namespace

import pytest
import torch

from grpo_core.evaluate import (
    EvalError,
    build_report,
    check_eval_args,
    markdown_table,
    response_entropy_area_scores,
    split_eas,
    summarize,
)

LN2 = math.log(2.0)
METRIC_KEYS = {"prompts", "samples_per_prompt", "greedy_accuracy", "response_len/mean", "response_len/truncated_frac",
               "eas/mean_bits", "eas/corr_with_correct"}


def record(correct, canonical=None, eas=None, lengths=None, truncated=None, greedy=False):
    n = len(correct)
    return {"correct": list(correct), "canonical": list(canonical) if canonical else [None] * n,
            "greedy_correct": greedy, "lengths": list(lengths) if lengths else [5] * n,
            "truncated": list(truncated) if truncated else [False] * n, "eas": list(eas) if eas else [1.0] * n}


# ------------------------------------------------------------------------------------------ summarize

def test_pass_at_k_hand_computed():
    """n=10, c=3: pass@1 = 0.3, pass@5 = 1 - C(7,5)/C(10,5) = 1 - 21/252 = 0.916667, pass@10 = 1; a second,
    all-wrong prompt halves every mean."""
    one = summarize([record([True] * 3 + [False] * 7)], [1, 5, 10])
    assert one["pass@1"] == pytest.approx(0.3)
    assert one["pass@5"] == pytest.approx(0.916667, abs=1e-6)
    assert one["pass@10"] == pytest.approx(1.0)
    assert one["avg@5"] == pytest.approx(0.6)  # first 5 samples hold all 3 correct ones
    assert one["avg@10"] == pytest.approx(0.3)
    two = summarize([record([True] * 3 + [False] * 7), record([False] * 10)], [5, 1])
    assert two["pass@5"] == pytest.approx(0.916667 / 2, abs=1e-6)
    assert two["pass@1"] == pytest.approx(0.15)
    assert two["prompts"] == 2 and two["samples_per_prompt"] == 10


def test_maj_at_k_ties_and_abstentions():
    """Ties go to the answer seen first; None never votes; a prompt with no answer scores 0."""
    recs = [
        record([True, False, False, True], ["7", "8", "8", "7"]),   # tie at k=2 and k=4: "7" first -> right
        record([False, False, False, True], [None, "3", None, "5"]),  # k=2: "3" alone; k=4: tie, "3" first
        record([False] * 4, [None] * 4),                              # nobody votes
        record([False, True, True, True], ["1", "2", "2", "2"]),     # k=2: tie -> "1" (wrong); k=4: "2"
    ]
    out = summarize(recs, [2, 4])
    assert out["maj@2"] == pytest.approx(0.25)
    assert out["maj@4"] == pytest.approx(0.5)


def test_lengths_truncation_greedy_and_eas_correlation():
    recs = [record([False, False], eas=[1.0, 2.0], lengths=[4, 8], truncated=[False, True], greedy=True),
            record([True, True], eas=[3.0, 4.0], lengths=[2, 2])]
    out = summarize(recs, [1])
    assert out["greedy_accuracy"] == pytest.approx(0.5)
    assert out["response_len/mean"] == pytest.approx(4.0)
    assert out["response_len/truncated_frac"] == pytest.approx(0.25)
    assert out["eas/mean_bits"] == pytest.approx(2.5)
    assert out["eas/corr_with_correct"] == pytest.approx(2 / math.sqrt(5))  # Pearson by hand: 0.894427
    # all responses equally correct: the correlation is undefined, not a number
    assert summarize([record([True, True], eas=[1.0, 2.0])], [1])["eas/corr_with_correct"] is None


def test_summarize_rejects_k_above_n_and_ragged_records():
    with pytest.raises(ValueError, match="k=\\[4\\].*n=2"):
        summarize([record([True, False])], [1, 4])
    bad = record([True, False])
    bad["eas"] = [1.0]
    with pytest.raises(ValueError, match="record 0"):
        summarize([bad], [1])


def test_report_and_markdown_order():
    report = build_report({"b": [record([True] * 16)], "a": [record([False] * 16)]}, [16, 4, 1])
    assert list(report) == ["a", "b", "overall"]
    assert report["overall"]["pass@4"] == pytest.approx(0.5)
    header = markdown_table(report).splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:4] == ["source", "prompts", "samples_per_prompt", "greedy_accuracy"]
    assert cols.index("pass@1") < cols.index("pass@4") < cols.index("pass@16") < cols.index("avg@1")
    with pytest.raises(EvalError, match="overall"):
        build_report({"overall": [record([True])]}, [1])


# ------------------------------------------------------------------------------------------ EAS

def test_split_eas_hand_made_entropies():
    ent = torch.tensor([LN2, 2 * LN2, 0.5 * LN2, 3 * LN2])  # nats; 1 + 2 + 0.5 bits, then 3 bits
    assert split_eas(ent, [3, 0, 1]) == pytest.approx([3.5, 0.0, 3.0])
    with pytest.raises(ValueError, match="sum\\(lengths\\)"):
        split_eas(ent, [3, 2])


@pytest.fixture(scope="module")
def small_model():
    from grpo_core.model import CausalLM, ModelArgs

    args = ModelArgs(family="qwen2", vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return CausalLM.from_config(args, dtype=torch.float32, seed=3, attn_backend="sdpa").eval()


def reference_eas(model, prompt, response, temperature):
    """EAS from the full logits of one unpacked sequence."""
    with torch.no_grad():
        h = model(torch.tensor([prompt + response]))[0]
        logits = model.lm_head(h[len(prompt) - 1:len(prompt) - 1 + len(response)]).double() / temperature
        p = torch.softmax(logits, -1)
        return float(-(p * torch.log_softmax(logits, -1)).sum() / LN2)


def test_packed_eas_matches_full_logits(small_model):
    g = torch.Generator().manual_seed(0)
    lens = [(5, 7), (3, 1), (9, 11), (2, 0), (4, 6)]  # one empty response (EAS 0)
    prompts = [torch.randint(0, 37, (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(0, 37, (r,), generator=g).tolist() for _, r in lens]
    ref = [reference_eas(small_model, p, r, 0.7) if r else 0.0 for p, r in zip(prompts, responses)]
    packed = response_entropy_area_scores(small_model, prompts, responses, 0.7)  # all in one forward
    one_each = response_entropy_area_scores(small_model, prompts, responses, 0.7, max_tokens_per_forward=1)
    in_pairs = response_entropy_area_scores(small_model, prompts, responses, 0.7, max_tokens_per_forward=21)
    for got in (packed, one_each, in_pairs):
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-4)
    # greedy decoding has no sampling distribution: its EAS is taken at temperature 1, never at 0 (or 1e-6)
    greedy = response_entropy_area_scores(small_model, prompts, responses, 0.0)
    assert greedy == pytest.approx(response_entropy_area_scores(small_model, prompts, responses, 1.0), rel=1e-6)
    assert greedy[0] > 1.0 and greedy != pytest.approx(packed, rel=1e-3)


# ------------------------------------------------------------------------------------------ grpo eval

def eval_args(**kw):
    base = dict(k=[1, 4, 8], n=None, temperature=1.0, max_new_tokens=256, max_prompts=None, seed=0)
    base.update(kw)
    return Namespace(**base)


def test_check_eval_args():
    assert check_eval_args(eval_args(k=[4, 1, 4])) == ([1, 4], 4)
    assert check_eval_args(eval_args(k=[1, 2], n=6)) == ([1, 2], 6)
    with pytest.raises(EvalError, match="--n 2 .*k=\\[4, 8\\]"):
        check_eval_args(eval_args(n=2))
    for bad, match in [(dict(k=[0, 2]), "--k"), (dict(n=0, k=[1]), "--n"), (dict(temperature=-1.0), "temperature"),
                       (dict(max_new_tokens=0), "max-new-tokens"), (dict(max_prompts=0), "max-prompts")]:
        with pytest.raises(EvalError, match=match):
            check_eval_args(eval_args(**bad))


@pytest.fixture(scope="module")
def tiny_eval_inputs(tmp_path_factory):
    from grpo_core.data.io import write_dataset
    from grpo_core.tasks.synthetic import make_train_test
    from grpo_core.tiny import build_tiny_model_dir

    root = tmp_path_factory.mktemp("eval")
    model_dir = build_tiny_model_dir(root / "model", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64, seed=0)
    _, test = make_train_test(["arith", "linear_eq"], 2, 4, seed=0, level=1)
    data = write_dataset(test, root / "test.parquet")
    return root, model_dir, str(data), sorted({r["data_source"] for r in test})


def test_grpo_eval_end_to_end(tiny_eval_inputs, capsys):
    from grpo_core.cli import main

    root, model_dir, data, sources = tiny_eval_inputs
    out = root / "out"
    assert main(["eval", model_dir, data, "--k", "1", "2", "--n", "2", "--max-new-tokens", "8",
                 "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert list(report) == sources + ["overall"] and len(sources) == 2
    for src, vals in report.items():
        assert set(vals) == METRIC_KEYS | {f"{m}@{k}" for m in ("pass", "avg", "maj") for k in (1, 2)}, src
        assert vals["samples_per_prompt"] == 2
        for key in ("pass@1", "pass@2", "avg@2", "maj@2", "greedy_accuracy", "response_len/truncated_frac"):
            assert 0.0 <= vals[key] <= 1.0
        assert 1 <= vals["response_len/mean"] <= 8
        # random tiny model over a 101-token vocabulary: each token carries up to log2(101) = 6.66 bits
        assert 0 < vals["eas/mean_bits"] <= 8 * math.log2(101) + 1e-4
        assert vals["pass@2"] >= vals["pass@1"] - 1e-12
    assert report["overall"]["prompts"] == 4 == sum(report[s]["prompts"] for s in sources)
    md = (out / "eval.md").read_text()
    assert "the chat template" in md and all(f"| {s} |" in md for s in sources + ["overall"])
    assert "| overall |" in capsys.readouterr().out


def test_grpo_eval_uses_the_training_prompt_template_and_reports_bad_n(tiny_eval_inputs, capsys):
    """A trainer checkpoint (<run>/checkpoints/step_N/hf) is evaluated with its run's prompt template."""
    import shutil

    from grpo_core.cli import main

    root, model_dir, data, _ = tiny_eval_inputs
    ckpt = root / "run" / "checkpoints" / "step_000003"
    shutil.copytree(model_dir, ckpt / "hf")
    config = {"data": {"prompt_template": "Q: {prompt}\nA:"}, "rollout": {"stop_strings": ["\n\n"]}}
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3, "config": config}))
    assert main(["eval", str(ckpt / "hf"), data, "--k", "1", "--temperature", "0", "--max-new-tokens", "4",
                 "--max-prompts", "2"]) == 0
    md = (ckpt / "hf" / "eval" / "eval.md").read_text()
    assert "template 'Q: {prompt}\\nA:'" in md
    report = json.loads((ckpt / "hf" / "eval" / "eval.json").read_text())
    assert report["overall"]["prompts"] == 2 and report["overall"]["samples_per_prompt"] == 1
    # at temperature 0 the single sample is the greedy response
    assert report["overall"]["greedy_accuracy"] == report["overall"]["pass@1"]
    capsys.readouterr()
    assert main(["eval", model_dir, data, "--k", "1", "4", "--n", "2"]) == 2
    assert "--n 2 samples per prompt is smaller than k=[4]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ ablations

def _ablations():
    import importlib
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("benchmarks.ablations")


def _write_run(run_dir, evals, entropies, kept=None, wall=10.0):
    run_dir.mkdir(parents=True)
    rows = [{"step": s, "phase": "eval", "accuracy": a, "n": 20} for s, a in evals[:1]]
    for i, h in enumerate(entropies):
        rows.append({"step": i + 1, "phase": "train", "reward/mean": 0.1 * (i + 1), "entropy/mean": h,
                     "clip/low_frac": 0.01, "clip/high_frac": 0.02, "nsr/rescue_frac": 0.005,
                     "groups/kept": 0.0 if kept is not None and i + 1 in kept else 16.0})
    rows += [{"step": s, "phase": "eval", "accuracy": a, "n": 20} for s, a in evals[1:]]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({"wall_seconds": wall}))


def test_ablation_table_and_plot_from_synthetic_runs(tmp_path):
    abl = _ablations()
    _write_run(tmp_path / "a0", [(0, 0.2), (4, 0.5)], [1.0, 0.8, 0.6, 0.4], wall=10.0)
    # step 4 trained on no group: its logged entropy (0) is not a measurement and must be skipped
    _write_run(tmp_path / "a1", [(0, 0.2), (2, 0.3), (4, 0.7)], [1.2, 1.0, 0.8, 0.0], kept={4}, wall=14.0)
    _write_run(tmp_path / "b0", [(0, 0.1), (4, 0.25)], [2.0, 2.0, 2.0, 2.0])
    runs = {"dapo": [abl.load_run(tmp_path / "a0"), abl.load_run(tmp_path / "a1")],
            "gspo": [abl.load_run(tmp_path / "b0")]}
    finals = {c: abl.final_numbers(r, tail=2) for c, r in runs.items()}
    a = finals["dapo"]
    assert a["eval_before"] == pytest.approx((0.2, 0.0, 2))
    assert a["eval_final"] == pytest.approx((0.6, math.sqrt(0.02), 2))
    assert a["eval_gain"][0] == pytest.approx(0.4)
    assert a["entropy"] == pytest.approx((0.7, math.sqrt(0.08), 2))  # tails: (0.6+0.4)/2, (1.0+0.8)/2
    assert a["clip_frac"][0] == pytest.approx(0.03)
    assert a["reward"][0] == pytest.approx(0.35)
    assert a["wall_s"] == pytest.approx((12.0, math.sqrt(8.0), 2))
    steps, mean, std = abl.curve(runs["dapo"], "eval_accuracy")
    assert steps == [0, 2, 4] and mean == pytest.approx([0.2, 0.3, 0.6]) and std == pytest.approx([0, 0, 0.141421],
                                                                                                 abs=1e-6)
    steps, mean, _ = abl.curve(runs["dapo"], "entropy")
    assert steps == [1, 2, 3, 4] and mean[-1] == pytest.approx(0.4)
    table = abl.markdown_table(finals, {"dapo": "DAPO baseline", "gspo": "GSPO"}, tail=2)
    assert "| DAPO baseline | 2 | 0.200 ± 0.000 | 0.600 ± 0.141 | 0.400 ± 0.141 |" in table
    assert "| GSPO | 1 | 0.100 | 0.250 | 0.150 |" in table  # one seed: no ± column noise
    png = abl.plot_ablation(runs, {"dapo": "DAPO baseline"}, tmp_path / "out" / "ablations.png", title="t")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_ablation_commands_load_as_configs(tmp_path):
    from grpo_core.config import load_config

    abl = _ablations()
    a = abl.parse_args(["--max-steps", "3", "--warm-start-steps", "7", "--set", "trainer.eval_max_prompts=20"])
    expect = {"dapo": ("off", 0.0, "ppo"), "nsr": ("scaled", 0.0, "ppo"), "gspo": ("off", 0.0, "gspo"),
              "demo": ("scaled", 0.05, "ppo")}
    for name, (nsr, coef, loss) in expect.items():
        cmd = abl.train_command(name, 2, tmp_path / name, a)
        assert cmd[1:5] == ["-m", "grpo_core", "train", str(abl.RECIPE)]
        cfg = load_config(cmd[4], [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"])
        assert (cfg.algorithm.nsr, cfg.algorithm.hidden_align_coef, cfg.algorithm.policy_loss) == (nsr, coef, loss)
        assert (cfg.trainer.seed, cfg.trainer.max_steps, cfg.warm_start.steps) == (2, 3, 7)
        assert cfg.trainer.output_dir == str(tmp_path / name) and cfg.trainer.eval_max_prompts == 20
    gspo = load_config(str(abl.RECIPE), abl.CONFIGS["gspo"][1]).algorithm
    assert (gspo.eps_low, gspo.eps_high, gspo.loss_agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    dr = load_config(str(abl.RECIPE), abl.CONFIGS["drgrpo"][1]).algorithm
    assert (dr.advantage, dr.loss_agg, dr.nsr) == ("drgrpo", "seq-sum-constant", "off")
    with pytest.raises(ValueError, match="unknown ablation config"):
        abl.train_command("ppo2", 0, tmp_path, a)
    # a rerun into a used run dir archives the old run (--force), a fresh dir does not; the log sits beside it
    assert "--force" not in abl.train_command("dapo", 0, tmp_path / "fresh", a)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "summary.json").write_text("{}")
    assert "--force" in abl.train_command("dapo", 0, tmp_path / "used", a)
    assert abl.run_log(tmp_path / "used") == tmp_path / "used.train.log"
