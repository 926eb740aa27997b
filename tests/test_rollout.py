"""Rollout engine: counter-based sampling, the torch engine on the tiny model (determinism, batching
invariance, logprob parity with a full forward, greedy / top-k / top-p, stop conditions), weight loading."""
import dataclasses
import re
import math

import pytest
import torch

from grpo_core import GPU_EXTRA_INSTALL
from grpo_core.rollout import Generation, SamplingParams, TorchRolloutEngine, build_engine
from grpo_core.rollout.sampling import (gumbel_noise, hash32, mask_top_k, mask_top_p, request_keys,
                                        sample_tokens, step_keys)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- sampling (no model)
def _lowbias32_py(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash32_matches_python_reference():
    xs = torch.cat([torch.randint(0, 2**32, (500,), dtype=torch.int64), torch.tensor([0, 1, 2**32 - 1])])
    assert hash32(xs).tolist() == [_lowbias32_py(int(v)) for v in xs]


def test_gumbel_noise_is_finite_and_standard():
    keys = step_keys(request_keys(7, torch.arange(64), torch.zeros(64, dtype=torch.long)), torch.tensor(3))
    g = gumbel_noise(keys, 1031)
    assert g.shape == (64, 1031) and torch.isfinite(g).all()
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6.
    assert abs(g.mean().item() - 0.5772) < 0.02 and abs(g.var().item() - math.pi**2 / 6) < 0.05
    # Different steps and different seeds give different draws.
    assert not torch.equal(g, gumbel_noise(step_keys(request_keys(7, torch.arange(64), torch.zeros(64, dtype=torch.long)), torch.tensor(4)), 1031))
    assert not torch.equal(g, gumbel_noise(step_keys(request_keys(8, torch.arange(64), torch.zeros(64, dtype=torch.long)), torch.tensor(3)), 1031))


def _truncated_probs_reference(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """Plain loop: top-k, then the smallest prefix of the sorted renormalised probs with mass >= top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(probs, descending=True).tolist()
    keep = order[:top_k] if top_k else order
    kept_probs = probs[keep] / probs[keep].sum()
    nucleus, mass = [], 0.0
    for token, p in zip(keep, kept_probs.tolist()):
        nucleus.append(token)
        mass += p
        if mass >= top_p:
            break
    out = torch.zeros_like(probs)
    out[nucleus] = probs[nucleus] / probs[nucleus].sum()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.7)],
                         ids=["plain", "top_k", "top_p", "both"])
def test_sampling_matches_truncated_distribution(temperature, top_k, top_p):
    vocab, draws = 11, 40000
    logits = torch.randn(vocab) * 1.5
    expected = _truncated_probs_reference(logits, temperature, top_k, top_p)
    # Draws over both key components: 200 prompts x 200 samples.
    ids = torch.arange(draws)
    keys = step_keys(request_keys(1, ids // 200, ids % 200), torch.tensor(0))
    tokens, logprobs = sample_tokens(logits.expand(draws, vocab), keys, temperature=temperature,
                                     top_k=top_k, top_p=top_p)
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    assert (freq[expected == 0] == 0).all(), "sampled a token top-k/top-p should have removed"
    torch.testing.assert_close(freq, expected, atol=0.012, rtol=0)
    # Logprob is under the full temperature-scaled distribution, not the truncated one.
    full = torch.log_softmax(logits / temperature, -1)
    torch.testing.assert_close(logprobs, full[tokens], atol=1e-6, rtol=0)


def test_top_k_top_p_masks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, 2.5], [0.0, 0.0, 0.0, 0.0, 5.0]])
    # Ties with the k-th largest value are kept (row 1: four tokens tie at 0.0).
    masked = mask_top_k(logits, 2)
    assert torch.isfinite(masked).tolist() == [[False, True, False, False, True], [True, True, True, True, True]]
    for top_p in (0.05, 0.3, 0.6, 0.95, 0.999):
        for row in range(2):
            ref = _truncated_probs_reference(logits[row], 1.0, 0, top_p)
            got = torch.isfinite(mask_top_p(logits[row:row + 1], top_p))[0]
            assert got.tolist() == (ref > 0).tolist(), (top_p, row)


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="stop_strings"):
        SamplingParams(stop_strings="</s>")
    with pytest.raises(ValueError, match=r"\bn\b"):
        SamplingParams(n=0)


def test_build_engine_errors():
    with pytest.raises(ValueError, match="'torch' or 'vllm'"):
        build_engine("hf")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=re.escape(GPU_EXTRA_INSTALL)):
            build_engine("vllm")


# ----------------------------------------------------------------------------- torch engine on the real model
from grpo_core.model import CausalLM, ModelArgs  # noqa: E402

MAX_POS = 64


def _make_model(seed: int = 1, tie: bool = False) -> CausalLM:
    args = ModelArgs(family="qwen2", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                     tie_word_embeddings=tie)
    model = CausalLM.from_config(args, seed=seed)
    with torch.no_grad():  # the 0.02-std init gives near-uniform logits; sharpen them so greedy has no near-ties
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _make_model()


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (1, 6, 17, 3, 9)]


def _full_forward_logprobs(model, prompt, gen: Generation, temperature: float) -> torch.Tensor:
    """log_softmax(lm_head(model(prompt + response)) / T) at the response tokens, from one plain forward."""
    device = next(model.parameters()).device
    full = torch.tensor(prompt + gen.token_ids, device=device)[None]
    with torch.no_grad():
        logp = torch.log_softmax(model.lm_head(model(full)).double() / temperature, -1)[0]
    start = len(prompt) - 1
    targets = torch.tensor(gen.token_ids, device=device)[:, None]
    return logp[start:start + len(gen.token_ids)].gather(-1, targets)[:, 0]


def test_order_and_determinism(model, prompts):
    engine = TorchRolloutEngine(model)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, stop_token_ids=[], seed=11)
    first = engine.generate(prompts, params)
    assert [(g.prompt_index, g.sample_index) for g in first] == [(p, s) for p in range(5) for s in range(3)]
    again = engine.generate(prompts, params)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.logprobs for g in first] == [g.logprobs for g in again]
    other = engine.generate(prompts, dataclasses.replace(params, seed=12))
    assert [g.token_ids for g in first] != [g.token_ids for g in other]
    # The samples of one prompt differ from each other (distinct request ids, distinct randomness).
    assert len({tuple(g.token_ids) for g in first[:3]}) == 3


def test_results_do_not_depend_on_batching(model, prompts):
    params = SamplingParams(n=3, temperature=0.9, top_p=0.95, max_new_tokens=20, stop_token_ids=[5, 7], seed=3)
    runs = [TorchRolloutEngine(model, max_batch_size=bs, check_every=ce).generate(prompts, params)
            for bs, ce in ((64, 8), (1, 8), (4, 1), (7, 3))]
    assert any(g.finish_reason == "stop" for g in runs[0]) and any(g.finish_reason == "length" for g in runs[0])
    for run in runs[1:]:
        assert [g.token_ids for g in run] == [g.token_ids for g in runs[0]]
        assert [g.finish_reason for g in run] == [g.finish_reason for g in runs[0]]
        for a, b in zip(run, runs[0]):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # A subset of the prompts (as one rank of several would get) with their global ids: the same samples.
    part = TorchRolloutEngine(model).generate([prompts[3], prompts[1]], params, request_ids=[3, 1])
    assert [(g.prompt_index, g.sample_index) for g in part] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [g.token_ids for g in part] == [g.token_ids for g in runs[0][9:12] + runs[0][3:6]]
    with pytest.raises(ValueError, match="distinct"):
        TorchRolloutEngine(model).generate([prompts[3], prompts[1]], params, request_ids=[3, 3])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.2, 10, 0.9)],
                         ids=["T1", "T0.7", "T1.2-topk-topp"])
def test_logprobs_match_full_forward(model, prompts, temperature, top_k, top_p):
    params = SamplingParams(n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=16,
                            stop_token_ids=[], seed=5)
    for gen in TorchRolloutEngine(model, max_batch_size=4).generate(prompts, params):
        ref = _full_forward_logprobs(model, prompts[gen.prompt_index], gen, temperature)
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_greedy_is_argmax_of_full_forward(model, prompts):
    engine = TorchRolloutEngine(model, max_batch_size=3)
    greedy = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=15, stop_token_ids=[]))
    for gen in greedy:
        prompt = prompts[gen.prompt_index]
        full = torch.tensor(prompt + gen.token_ids)[None]
        with torch.no_grad():
            logits = model.lm_head(model(full))[0, len(prompt) - 1:-1]
        assert gen.token_ids == logits.argmax(-1).tolist()
        # Greedy reports the logprob under the temperature-1 distribution.
        ref = _full_forward_logprobs(model, prompt, gen, 1.0)
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)
    assert greedy[0].token_ids == greedy[1].token_ids
    # top-k = 1 and a tiny nucleus leave only the argmax, whatever the temperature and seed.
    for extra in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = engine.generate(prompts, SamplingParams(n=2, temperature=1.5, max_new_tokens=15, stop_token_ids=[],
                                                          seed=9, **extra))
        assert [g.token_ids for g in sampled] == [g.token_ids for g in greedy], extra


def test_stop_tokens_and_length(model, prompts):
    engine = TorchRolloutEngine(model)
    base = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, stop_token_ids=[], seed=2))
    assert all(len(g.token_ids) == 10 and g.finish_reason == "length" for g in base)
    stop_id = base[4].token_ids[6]  # a token some sample draws; the run with it as a stop token must cut there
    stopped = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=10,
                                                      stop_token_ids=[stop_id], seed=2))
    for full, cut in zip(base, stopped):
        if stop_id in full.token_ids:
            end = full.token_ids.index(stop_id) + 1
            assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[:end]
            assert cut.logprobs == pytest.approx(full.logprobs[:end], abs=1e-6)
        else:
            assert cut.finish_reason == "length" and cut.token_ids == full.token_ids
    assert stopped[4].finish_reason == "stop" and len(stopped[4].token_ids) <= 7


def test_context_limit(model):
    engine = TorchRolloutEngine(model)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=[])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[1] * MAX_POS], params)
    near, short = engine.generate([[1] * (MAX_POS - 3), [2, 3]], params)
    assert len(near.token_ids) == 3 and near.finish_reason == "length"
    assert len(short.token_ids) == 10


def test_bad_inputs(model):
    engine = build_engine("torch", model=model, max_batch_size=4)
    assert isinstance(engine, TorchRolloutEngine) and engine.max_batch_size == 4
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([[1, 2]], SamplingParams(stop_strings=["x"]))
    with pytest.raises(ValueError, match="max_batch_size"):
        TorchRolloutEngine(model, max_batch_size=0)
    assert engine.generate([], SamplingParams()) == []
    engine.sleep(), engine.wake_up()  # no-ops for the torch engine
    assert len(engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))) == 1
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_load_weights_and_model_copy(prompts):
    trainer_model = _make_model(seed=1, tie=True)
    engine = TorchRolloutEngine.from_model_copy(trainer_model)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, stop_token_ids=[], seed=4)
    before = engine.generate(prompts, params)
    trainer_model.train()
    other = _make_model(seed=2, tie=True)
    with torch.no_grad():  # the "update": the trainer's weights change, the engine's copy does not
        for p_trainer, p_other in zip(trainer_model.parameters(), other.parameters()):
            p_trainer.copy_(p_other)
    assert [g.token_ids for g in engine.generate(prompts, params)] == [g.token_ids for g in before]
    # Stream the new weights in, HF names, tied lm_head omitted as in HF checkpoints.
    engine.load_weights((name, t.clone()) for name, t in trainer_model.state_dict().items() if name != "lm_head.weight")
    expected = TorchRolloutEngine(other).generate(prompts, params)
    assert [g.token_ids for g in engine.generate(prompts, params)] == [g.token_ids for g in expected]
    assert trainer_model.training, "generate must not change the trainer model's mode"

    named = dict(trainer_model.state_dict())
    with pytest.raises(KeyError, match="not_a_weight"):
        engine.load_weights([("not_a_weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="not given"):
        engine.load_weights([(k, v) for k, v in named.items() if "layers.1." not in k])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_sleep_frees_weights_and_sync_wakes(prompts, tie):
    """sleep() drops every parameter's storage (like vLLM sleep level 2); the next full weight load
    re-allocates them and generation is exactly as from a never-slept engine."""
    trainer_model = _make_model(seed=2, tie=tie)
    engine = TorchRolloutEngine.from_model_copy(_make_model(seed=1, tie=tie))
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, stop_token_ids=[], seed=4)
    weights = [(n, t.clone()) for n, t in trainer_model.state_dict().items() if n != "lm_head.weight" or not tie]
    engine.sleep()
    engine.sleep()  # idempotent
    assert sum(p.numel() for p in engine.model.parameters()) == 0
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate(prompts, params)
    with pytest.raises(RuntimeError, match="sync weights"):
        engine.wake_up()
    with pytest.raises(ValueError, match="not given"):  # a partial load leaves it unusable, not half-garbage
        engine.sync_weights(weights[:3])
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate(prompts, params)
    engine.sleep()
    engine.sync_weights(iter(weights))
    engine.wake_up()  # awake: a no-op
    expected = TorchRolloutEngine(trainer_model).generate(prompts, params)
    assert [g.token_ids for g in engine.generate(prompts, params)] == [g.token_ids for g in expected]
    assert [g.logprobs for g in engine.generate(prompts, params)] == [g.logprobs for g in expected]
    if tie:
        assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight


def test_generate_restores_training_mode(model, prompts):
    model.train()
    try:
        TorchRolloutEngine(model).generate(prompts[:1], SamplingParams(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


# ----------------------------------------------------------------------------- with the tiny tokenizer
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from grpo_core.tiny import build_tiny_model_dir
    from grpo_core.tokenizer import Tokenizer

    path = build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=3)
    return CausalLM.from_pretrained(path, dtype=torch.float32), Tokenizer.from_pretrained(path)


def _first_completing_token(tokenizer, token_ids, stop):
    return next((k for k in range(len(token_ids)) if stop in tokenizer.decode(token_ids[:k + 1])), None)


def test_default_eos_stop_and_text(tiny):
    model, tokenizer = tiny
    engine = TorchRolloutEngine(model, tokenizer=tokenizer)
    prompts = [tokenizer.encode(t) for t in ("What is 1+1?", "Say hi", "x")]
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=48, seed=0)  # stop_token_ids None -> eos
    gens = engine.generate(prompts, params)
    eos = tokenizer.eos_token_id
    assert [g.token_ids for g in gens] == [g.token_ids for g in
                                           engine.generate(prompts, dataclasses.replace(params, stop_token_ids=[eos]))]
    stops = [g for g in gens if g.finish_reason == "stop"]
    assert stops, "the near-uniform tiny model should draw eos somewhere in 1152 tokens"
    for g in gens:
        assert eos not in g.token_ids[:-1]
        assert (g.token_ids[-1] == eos) == (g.finish_reason == "stop")
        assert g.finish_reason == "stop" or len(g.token_ids) == 48
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)


def test_stop_strings(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in ("Compute 2*3.", "Hello")]
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=40, stop_token_ids=[], seed=1)
    full = TorchRolloutEngine(model, tokenizer=tokenizer).generate(prompts, params)
    # Stop strings taken from the free-running samples: a 2-char one from the middle of sample 0 and a 1-char one
    # from late in sample 7, so several samples stop, at different steps, across check boundaries.
    stops = [full[0].text[13:15], full[7].text[30]]
    with_stops = dataclasses.replace(params, stop_strings=stops)
    runs = [TorchRolloutEngine(model, tokenizer=tokenizer, max_batch_size=bs, check_every=ce).generate(prompts, with_stops)
            for bs, ce in ((64, 8), (5, 1), (3, 16))]
    n_stopped = 0
    for free, cut in zip(full, runs[0]):
        ends = [k for k in (_first_completing_token(tokenizer, free.token_ids, s) for s in stops) if k is not None]
        if not ends:
            assert cut.finish_reason == "length" and cut.token_ids == free.token_ids
            continue
        n_stopped += 1
        end = min(ends) + 1
        assert cut.finish_reason == "stop"
        assert cut.token_ids == free.token_ids[:end] and cut.logprobs == free.logprobs[:end]
        text = tokenizer.decode(free.token_ids[:end])
        assert cut.text == text[:min(text.find(s) for s in stops if s in text)]
        assert not any(s in cut.text for s in stops)
    assert n_stopped >= 2
    for run in runs[1:]:
        assert [(g.token_ids, g.text, g.finish_reason) for g in run] == \
            [(g.token_ids, g.text, g.finish_reason) for g in runs[0]]


@pytest.mark.gpu
def test_cuda_matches_cpu_and_full_forward(prompts):
    """fp32 on CUDA: the same samples as on the CPU (counter-based randomness is device independent) and
    logprobs matching a full forward; bf16: valid tokens and finite logprobs close to the bf16 full forward."""
    cpu_model = _make_model()
    params = SamplingParams(n=4, temperature=0.8, top_p=0.9, max_new_tokens=24, stop_token_ids=[5], seed=7)
    cpu = TorchRolloutEngine(cpu_model).generate(prompts, params)
    gpu_model = _make_model().cuda()
    gpu = TorchRolloutEngine(gpu_model, max_batch_size=5).generate(prompts, params)
    same = sum(a.token_ids == b.token_ids for a, b in zip(cpu, gpu))
    assert same >= len(cpu) - 1, f"only {same}/{len(cpu)} samples equal across devices"  # allow one near-tie flip
    for gen in gpu:
        ref = _full_forward_logprobs(gpu_model, prompts[gen.prompt_index], gen, 0.8).cpu()
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), ref, atol=1e-3, rtol=0)
    bf16_model = _make_model().to("cuda", torch.bfloat16)
    for gen in TorchRolloutEngine(bf16_model).generate(prompts, params):
        assert all(0 <= t < 97 for t in gen.token_ids) and all(math.isfinite(x) and x <= 0 for x in gen.logprobs)
        ref = _full_forward_logprobs(bf16_model, prompts[gen.prompt_index], gen, 0.8).cpu()
        torch.testing.assert_close(torch.tensor(gen.logprobs, dtype=torch.float64), ref, atol=0.1, rtol=0)


def test_refill_and_no_idle_steps(model):
    """Slots freed by finished rows take waiting requests at once, and no step runs past the last budget."""
    calls = []
    handle = model.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    try:
        engine = TorchRolloutEngine(model, max_batch_size=2, check_every=8)
        params = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=[], seed=0)
        # Budgets 2, 2, 12 (the model's context caps the long prompts): the two long prompts go first, finish
        # after 2 tokens, and the short prompt takes a freed slot right then.
        gens = engine.generate([[1] * (MAX_POS - 2), [2] * (MAX_POS - 2), [3, 4]], params)
    finally:
        handle.remove()
    assert [len(g.token_ids) for g in gens] == [2, 2, 12]
    # prefill of 2 rows, 1 decode step, prefill of the refill row, then 11 decode steps and nothing more.
    assert calls == [(2, MAX_POS - 2), (2, 1), (1, 2)] + [(2, 1)] * 11
