"""The vLLM rollout engine (grpo_core/rollout/vllm_engine.py).

CPU: the one-line errors (no vLLM, no CUDA, too old a vLLM), the version / logprobs-mode / seed helpers, and
the adapter itself against a stand-in `vllm` module that follows the real API surface the engine uses
(LLM(...), generate(TokensPrompt, [SamplingParams]) -> RequestOutput.outputs[0] with token_ids, logprobs as
[{token: Logprob}], finish_reason; collective_rpc(fn, args) -> [fn(worker, *args)]; sleep(level) /
wake_up(tags); reset_prefix_cache) and samples with the torch engine, so the checks are about our side of the
boundary: request expansion and seeds, ordering, sharding invariance, finish reasons, text, sleep / weight
sync ordering and strictness.
GPU (+ real vLLM): generation, a weight-sync round trip against the trainer's logprobs, sleep/wake memory.
"""
from __future__ import annotations

import enum
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from grpo_core.model import CausalLM
from grpo_core.rollout import SamplingParams, TorchRolloutEngine, build_engine
from grpo_core.rollout import vllm_engine as ve
from grpo_core.tokenizer import Tokenizer
from grpo_core.weight_sync import SyncStats, iter_weight_buckets, sync_engine_weights

HAS_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- one-line errors
def test_build_engine_without_vllm_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    with pytest.raises(ImportError, match=r"vllm>=0\.10\.2,<0\.35.*\.\[gpu\]") as err:
        build_engine("vllm", model_dir="unused")
    assert "\n" not in str(err.value)


def test_vllm_engine_without_cuda_names_cuda_and_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _install_fake_vllm(monkeypatch)  # vLLM "installed": the CUDA check must still fail first, in one line
    with pytest.raises(RuntimeError, match=r"CUDA.*\.\[gpu\].*rollout.engine='torch'") as err:
        build_engine("vllm", model_dir="unused")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("version", ["0.8.5", "0.9.2", "0.10.1.1"])
def test_too_old_vllm_is_refused(monkeypatch, version):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _install_fake_vllm(monkeypatch, version=version)
    with pytest.raises(ImportError, match=r"vllm>=0\.10\.2,<0\.35.*\.\[gpu\]") as err:
        ve.VLLMRolloutEngine("unused")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("version", ["0.35.0", "1.0.0"])
def test_too_new_vllm_is_refused_unless_allowed(monkeypatch, version, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _install_fake_vllm(monkeypatch, version=version)
    monkeypatch.delenv("GRPO_VLLM_ALLOW_UNTESTED", raising=False)
    with pytest.raises(ImportError, match=r"vllm>=0\.10\.2,<0\.35 \(found vllm " + version) as err:
        ve.VLLMRolloutEngine("unused")
    assert "\n" not in str(err.value) and "GRPO_VLLM_ALLOW_UNTESTED=1" in str(err.value)
    monkeypatch.setenv("GRPO_VLLM_ALLOW_UNTESTED", "1")
    with caplog.at_level("WARNING"):
        ve.check_vllm_version(version)
    assert "newer than the releases" in caplog.text


def test_version_parsing():
    assert ve.parse_version("0.10.2") == (0, 10, 2)
    assert ve.parse_version("0.11.1rc2.dev5+g12ab") == (0, 11, 1)
    assert ve.parse_version("0.10.1.1") == (0, 10, 1)
    assert ve.parse_version("1.0") == (1, 0, 0)
    for v in ("0.10.2", "0.11.2", "0.20.2", "0.32.0", "0.34.0", "0.34.5rc1"):
        ve.check_vllm_version(v)
    assert ve.SUPPORTED_VLLM == ((0, 10, 2), (0, 35, 0))


# ----------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("t,top_p,top_k,mode,exact", [
    (1.0, 1.0, 0, "processed_logprobs", True),
    (0.7, 1.0, 0, "processed_logprobs", True),   # temperature applied, nothing truncated
    (0.0, 1.0, 0, "processed_logprobs", True),   # greedy: T = 1 logprobs, our convention
    (1.0, 0.9, 0, "raw_logprobs", True),         # truncation at T = 1: raw is log_softmax(logits)
    (1.0, 1.0, 20, "raw_logprobs", True),
    (0.6, 0.95, 0, "processed_logprobs", False),  # no vLLM mode matches
])
def test_choose_logprobs_mode(t, top_p, top_k, mode, exact):
    assert ve.choose_logprobs_mode(t, top_p, top_k) == (mode, exact)
    params = SamplingParams(temperature=t, top_p=top_p, top_k=top_k)
    assert ve._mode_is_exact(mode, params) == exact


def test_request_seed_is_a_function_of_seed_request_and_sample():
    seeds = {ve.request_seed(s, r, k) for s in range(3) for r in range(20) for k in range(8)}
    assert len(seeds) == 3 * 20 * 8 and all(0 <= x < 2**63 for x in seeds)
    assert ve.request_seed(5, 7, 1) == ve.request_seed(5, 7, 1)


# ----------------------------------------------------------------------------- stand-in vllm
@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    token_ids: list
    logprobs: list
    finish_reason: str
    text: str
    stop_reason: object = None


@dataclass
class _RequestOutput:
    request_id: str
    outputs: list


@dataclass
class _FakeSamplingParams:
    """The subset of vllm.SamplingParams' fields the engine sets (unknown keywords fail, like the real one)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop: list | None = None
    stop_token_ids: list | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    logprobs: int | None = None


class _FakeModel:
    """vLLM-model-like: load_weights(iterable of HF pairs) -> names loaded; tied lm_head skipped."""

    def __init__(self, causal_lm: CausalLM):
        self.lm = causal_lm
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        params = dict(self.lm.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.lm.args.tie_word_embeddings:
                continue
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded

    def named_parameters(self):
        return self.lm.named_parameters()


class _FakeLLM:
    instances: list = []

    def __init__(self, model, **kwargs):
        assert kwargs["distributed_executor_backend"] == "external_launcher" and kwargs["seed"] is not None
        self.kwargs = dict(kwargs, model=model)
        self.lm = CausalLM.from_pretrained(model)
        self.tokenizer = Tokenizer.from_pretrained(model)
        self.runner_model = _FakeModel(self.lm)
        self.worker = types.SimpleNamespace(get_model=lambda: self.runner_model)  # vLLM's Worker.get_model
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(max_model_len=self.lm.args.max_position_embeddings))
        self.events: list = []
        self.asleep: set = set()
        _FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert not self.asleep, "generate while asleep"
        engine = TorchRolloutEngine(self.lm, tokenizer=self.tokenizer)
        outs = []
        for i, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
            assert sp.n == 1 and sp.ignore_eos and sp.logprobs == 0
            # Each request is sampled from its own seed only (vLLM's per-request generator).
            params = SamplingParams(n=1, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                    max_new_tokens=sp.max_tokens, stop_token_ids=sp.stop_token_ids,
                                    stop_strings=sp.stop or [], seed=sp.seed)
            g = engine.generate([prompt["prompt_token_ids"]], params)[0]
            # vLLM checks the token budget before stop tokens.
            reason = "length" if len(g.token_ids) >= sp.max_tokens else g.finish_reason
            outs.append(_RequestOutput(str(i), [_Completion(
                g.token_ids, [{t: _Logprob(lp)} for t, lp in zip(g.token_ids, g.logprobs)], reason, g.text)]))
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.events.append(("rpc", getattr(method, "__name__", method)))
        return [method(self.worker, *args, **(kwargs or {}))]

    def sleep(self, level=1):
        self.events.append(("sleep", level))
        if level == 2:  # weights discarded: whatever is in that memory after waking is garbage
            for p in self.lm.parameters():
                p.data.fill_(float("nan"))
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tuple(tags) if tags else None))
        self.asleep -= set(tags or ("weights", "kv_cache"))

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))


def _install_fake_vllm(monkeypatch, version="0.11.2", enum_modes=False):
    fake = types.ModuleType("vllm")
    fake.__version__ = version
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.__path__ = []
    fake.LLM = _FakeLLM
    fake.SamplingParams = _FakeSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)  # a TypedDict in vLLM: calling it builds a dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    config = types.ModuleType("vllm.config")
    if enum_modes:  # 0.10.x: an Enum
        config.LogprobsMode = enum.Enum("LogprobsMode", {"RAW_LOGPROBS": "raw_logprobs",
                                                         "PROCESSED_LOGPROBS": "processed_logprobs"})
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    return fake


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _FakeLLM.instances.clear()
    return _install_fake_vllm(monkeypatch)


def _engine(model_dir, **kw):
    return build_engine("vllm", model_dir=model_dir, tokenizer=Tokenizer.from_pretrained(model_dir), **kw)


@pytest.mark.parametrize("version", ["0.11.2", "0.32.0", "0.34.0"])
def test_string_logprobs_mode_from_0_11(fake_vllm, tiny_dir, monkeypatch, version):
    # 0.11+ types logprobs_mode as a Literal of strings and vllm.config no longer exports LogprobsMode (the API
    # check found this): the engine passes the string without looking the type up.
    fake_vllm.__version__ = version
    monkeypatch.delitem(sys.modules, "vllm.config")
    _engine(tiny_dir, temperature=1.0, top_p=0.9)
    assert _FakeLLM.instances[-1].kwargs["logprobs_mode"] == "raw_logprobs"


def test_engine_arguments_reach_vllm(fake_vllm, tiny_dir, monkeypatch):
    engine = _engine(tiny_dir, gpu_memory_utilization=0.35, sleep_mode=True, seed=7, temperature=0.6, top_p=1.0)
    kw = _FakeLLM.instances[-1].kwargs
    assert kw["gpu_memory_utilization"] == 0.35 and kw["enable_sleep_mode"] is True and kw["seed"] == 7
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["dtype"] == "bfloat16"
    assert kw["generation_config"] == "vllm" and kw["tensor_parallel_size"] == 1
    assert engine.max_model_len == 512
    # 0.10.x types the mode as an Enum: the engine passes the member.
    _install_fake_vllm(monkeypatch, version="0.10.2", enum_modes=True)
    _engine(tiny_dir, temperature=1.0, top_p=0.9)
    mode = _FakeLLM.instances[-1].kwargs["logprobs_mode"]
    assert isinstance(mode, enum.Enum) and mode.value == "raw_logprobs"
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        _engine(tiny_dir, gpu_memory_utilization=1.5)


def test_generate_order_seeds_and_sharding_invariance(fake_vllm, tiny_dir):
    engine = _engine(tiny_dir)
    prompts = [[1, 5, 9], [4, 4, 7, 8], [6, 2]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, stop_token_ids=[], seed=4)
    whole = engine.generate(prompts, params, request_ids=[10, 11, 12])
    assert [(g.prompt_index, g.sample_index) for g in whole] == [(p, s) for p in range(3) for s in range(3)]
    assert all(len(g.token_ids) == len(g.logprobs) == 10 and g.finish_reason == "length" for g in whole)
    assert len({tuple(g.token_ids) for g in whole}) > 3  # samples of a prompt differ: distinct seeds
    # The same prompts split over two "ranks": identical samples, given the same global request ids.
    part_a = engine.generate(prompts[:1], params, request_ids=[10])
    part_b = engine.generate(prompts[1:], params, request_ids=[11, 12])
    assert [(g.token_ids, g.logprobs) for g in part_a + part_b] == [(g.token_ids, g.logprobs) for g in whole]
    assert [g.prompt_index for g in part_b] == [0, 0, 0, 1, 1, 1]
    other_seed = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=10, stop_token_ids=[], seed=5),
                                 request_ids=[10, 11, 12])
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in whole]
    assert engine.generate([], params) == []


def test_finish_reasons_text_and_stop_strings(fake_vllm, tiny_dir):
    engine = _engine(tiny_dir)
    tok = engine.tokenizer
    free = engine.generate([[1, 5, 9]], SamplingParams(n=4, max_new_tokens=12, stop_token_ids=[], seed=2))
    # A stop token that is also the last allowed token: "stop", as the torch engine says (vLLM says "length").
    last = free[0].token_ids[-1]
    cut = engine.generate([[1, 5, 9]], SamplingParams(n=4, max_new_tokens=12, stop_token_ids=[last], seed=2))
    assert cut[0].token_ids[-1] == last and cut[0].finish_reason == "stop"
    assert len(cut[0].token_ids) <= 12
    finish = ve.VLLMRolloutEngine._finish_reason
    assert finish("length", [4, 7, 3], {3}) == "stop" and finish("length", [4, 7], {3}) == "length"
    assert finish("stop", [4, 7], set()) == "stop"
    with pytest.raises(RuntimeError, match="abort"):
        finish("abort", [4], set())
    # Stop strings: text ends before the string; the completing token stays in token_ids.
    stop = free[1].text[4:6]
    with_stop = engine.generate([[1, 5, 9]], SamplingParams(n=4, max_new_tokens=12, stop_token_ids=[],
                                                            stop_strings=[stop], seed=2))[1]
    assert with_stop.finish_reason == "stop" and stop not in with_stop.text
    n_kept = len(with_stop.token_ids)
    assert stop in tok.decode(with_stop.token_ids) and with_stop.token_ids == free[1].token_ids[:n_kept]
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[1] * 512], SamplingParams())


def test_sleep_then_streamed_sync_matches_saved_checkpoint(fake_vllm, tiny_dir, tmp_path):
    engine = _engine(tiny_dir, sleep_mode=True)
    llm = _FakeLLM.instances[-1]
    trained = CausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained.save_pretrained(tmp_path / "trained")
    Tokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "trained")
    params = SamplingParams(n=2, max_new_tokens=10, stop_token_ids=[], seed=9)
    prompts = [[1, 5, 9], [3, 8]]
    expected = _engine(str(tmp_path / "trained")).generate(prompts, params)

    engine.sleep()
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate(prompts, params)
    llm.events.clear()
    stats = sync_engine_weights(engine, trained, bucket_bytes=40_000, prefix_to_strip="")
    kinds = [e[0] if e[0] != "wake_up" else e for e in llm.events]
    # Weights woken before loading, KV cache only after, prefix cache dropped; one load call per bucket.
    assert kinds[0] == ("wake_up", ("weights",)) and ("wake_up", ("kv_cache",)) in kinds
    assert kinds.index(("wake_up", ("kv_cache",))) > max(i for i, k in enumerate(kinds) if k == "rpc")
    assert kinds[-1] == "reset_prefix_cache"
    assert llm.runner_model.calls == stats.buckets >= 3
    got = engine.generate(prompts, params)
    assert [(g.token_ids, g.logprobs) for g in got] == [(g.token_ids, g.logprobs) for g in expected]


def test_wake_up_without_sync_refuses_to_generate_and_partial_sync_is_an_error(fake_vllm, tiny_dir):
    engine = _engine(tiny_dir, sleep_mode=True)
    model = CausalLM.from_pretrained(tiny_dir)
    engine.sleep()
    engine.wake_up()
    with pytest.raises(RuntimeError, match="sync_weights"):  # level-2 sleep: the weights are gone
        engine.generate([[1, 2]], SamplingParams())
    partial = [(n, t) for n, t in model.state_dict().items() if "mlp" not in n]
    with pytest.raises(ValueError, match="not given"):
        engine.sync_weights(partial)
    engine.sync_weights(model.state_dict().items())  # flat, lazily consumed: one load call
    assert len(engine.generate([[1, 2]], SamplingParams(max_new_tokens=3, stop_token_ids=[]))) == 1
    # Without sleep mode, sleep / wake_up are no-ops.
    plain = _engine(tiny_dir, sleep_mode=False)
    plain.sleep()
    assert not _FakeLLM.instances[-1].asleep and plain.generate([[1]], SamplingParams(max_new_tokens=2))


# ----------------------------------------------------------------------------- GPU + real vLLM
@pytest.fixture(scope="module")
def real_engine(tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip("needs vLLM and CUDA")
    from grpo_core.tiny import build_tiny_model_dir

    # head_dim 64: a size every vLLM attention backend supports.
    path = build_tiny_model_dir(tmp_path_factory.mktemp("tiny_gpu"), hidden_size=128, num_heads=2, num_kv_heads=1,
                                intermediate_size=256, dtype=torch.bfloat16)
    engine = ve.VLLMRolloutEngine(path, Tokenizer.from_pretrained(path), gpu_memory_utilization=0.3,
                                  sleep_mode=True, dtype="bfloat16", llm_kwargs={"enforce_eager": True})
    yield engine, path
    engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM and CUDA")
def test_real_vllm_generates(real_engine):
    engine, _path = real_engine
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, stop_token_ids=[], seed=1)
    gens = engine.generate([[1, 5, 9], [4, 4, 7]], params, request_ids=[3, 4])
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(p, s) for p in range(2) for s in range(3)]
    assert all(len(g.token_ids) == len(g.logprobs) == 16 and all(lp <= 0 for lp in g.logprobs) for g in gens)
    again = engine.generate([[4, 4, 7]], params, request_ids=[4])
    assert [g.token_ids for g in again] == [g.token_ids for g in gens[3:]]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM and CUDA")
def test_real_vllm_weight_sync_matches_trainer_logprobs(real_engine):
    engine, path = real_engine
    trained = CausalLM.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.sleep()
    sync_engine_weights(engine, trained, bucket_bytes=1 << 16, prefix_to_strip="")
    params = SamplingParams(n=4, temperature=0.8, max_new_tokens=24, stop_token_ids=[], seed=3)
    prompts = [[1, 5, 9, 11], [4, 4, 7]]
    gens = engine.generate(prompts, params)
    for g in gens:
        ids = torch.tensor([prompts[g.prompt_index] + g.token_ids], device="cuda")
        with torch.no_grad():
            logits = trained.lm_head(trained(ids)).float()[0, len(prompts[g.prompt_index]) - 1:-1]
        ref = torch.log_softmax(logits / params.temperature, -1).gather(-1, ids[0, -len(g.token_ids):, None])[:, 0]
        torch.testing.assert_close(torch.tensor(g.logprobs, device="cuda"), ref, rtol=0, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM and CUDA")
def test_real_vllm_sleep_releases_memory(real_engine):
    engine, path = real_engine
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep - free_awake > 2**30  # the KV cache of a 0.3 share is many GiB
    model = CausalLM.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    engine.load_weight_buckets(iter_weight_buckets(model, 1 << 16, prefix_to_strip="", stats=SyncStats()))
    assert torch.cuda.mem_get_info()[0] < free_asleep
    assert engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, stop_token_ids=[]))


# ----------------------------------------------------------------------------- one factory: training and evaluation
def test_factory_decides_the_engine(fake_vllm, tiny_dir):
    from grpo_core.config import load_config
    from grpo_core.rollout.factory import build_rollout_engine

    tok = Tokenizer.from_pretrained(tiny_dir)
    common = dict(model_dir=tiny_dir, tokenizer=tok, device="cpu", dtype=torch.float32)
    cfg = load_config(None, ["rollout.max_batch_size=5"])
    torch_engine = build_rollout_engine(cfg, release_on_sleep=True, **common)
    assert isinstance(torch_engine, TorchRolloutEngine) and torch_engine.max_batch_size == 5
    assert torch_engine.release_on_sleep
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.gpu_memory_utilization=0.3", "rollout.temperature=0.6",
                             "rollout.top_p=0.9", "rollout.sleep_mode=true", "trainer.seed=11"])
    engine = build_rollout_engine(cfg, **common)
    kw = _FakeLLM.instances[-1].kwargs
    assert isinstance(engine, ve.VLLMRolloutEngine) and kw["model"] == str(tiny_dir)
    assert (kw["gpu_memory_utilization"], kw["enable_sleep_mode"], kw["seed"]) == (0.3, True, 11)
    assert engine.logprobs_mode == "processed_logprobs"  # T=0.6 with top_p: the inexact case, warned about
    # Evaluation's settings win over the rollout's: its own temperature and seed, no sleep mode.
    build_rollout_engine(cfg, temperature=1.0, seed=3, sleep_mode=False, **common)
    kw = _FakeLLM.instances[-1].kwargs
    assert (kw["enable_sleep_mode"], kw["seed"], kw["logprobs_mode"]) == (False, 3, "raw_logprobs")
    with pytest.raises(ValueError, match="'torch' or 'vllm'"):
        build_rollout_engine(cfg, engine="hf", **common)


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    from grpo_core.data.io import write_dataset
    from grpo_core.tasks.synthetic import make_train_test
    from grpo_core.tiny import build_tiny_model_dir

    root = tmp_path_factory.mktemp("vllm_eval")
    model_dir = build_tiny_model_dir(root / "model", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64, seed=0)
    _, test = make_train_test(["arith", "linear_eq"], 2, 4, seed=0, level=1)
    return root, model_dir, str(write_dataset(test, root / "test.parquet"))


def test_grpo_eval_with_the_vllm_engine(monkeypatch, eval_inputs, capsys):
    """`grpo eval --engine vllm` generates with vLLM (the stand-in here; CUDA check bypassed) and scores the
    same way: greedy decoding gives the very report the torch engine gives."""
    from grpo_core.cli import main

    _FakeLLM.instances.clear()
    _install_fake_vllm(monkeypatch)
    monkeypatch.setattr(ve, "require_cuda", lambda: None)
    root, model_dir, data = eval_inputs
    args = [model_dir, data, "--k", "1", "--temperature", "0", "--max-new-tokens", "6"]
    assert main(["eval", *args, "--out", str(root / "torch")]) == 0
    assert not _FakeLLM.instances
    assert main(["eval", *args, "--engine", "vllm", "--set", "rollout.gpu_memory_utilization=0.7",
                 "--out", str(root / "vllm")]) == 0
    kw = _FakeLLM.instances[-1].kwargs
    assert kw["model"] == model_dir and kw["gpu_memory_utilization"] == 0.7 and kw["enable_sleep_mode"] is False
    import json

    by_torch = json.loads((root / "torch" / "eval.json").read_text())
    by_vllm = json.loads((root / "vllm" / "eval.json").read_text())
    assert by_vllm == by_torch and by_vllm["overall"]["prompts"] == 4
    assert "vllm engine" in (root / "vllm" / "eval.md").read_text()
    capsys.readouterr()
    assert main(["eval", *args, "--set", "rollout.gpu_memory_utilization=2"]) == 2
    assert "rollout.gpu_memory_utilization" in capsys.readouterr().err


def test_trainer_periodic_evaluation_uses_the_vllm_engine(fake_vllm, eval_inputs):
    """Trainer.evaluate generates with the rollout engine the factory built: vLLM when rollout.engine=vllm
    (weights streamed in first, the engine put back to sleep after)."""
    from grpo_core.config import load_config
    from grpo_core.data.dataset import PromptDataset
    from grpo_core.rollout.factory import build_rollout_engine
    from grpo_core.run_setup import Scorer
    from grpo_core.trainer import Trainer

    root, model_dir, data = eval_inputs
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.max_new_tokens=6", "trainer.eval_max_prompts=4"])
    tok = Tokenizer.from_pretrained(model_dir)
    engine = build_rollout_engine(cfg, model_dir=model_dir, tokenizer=tok, device="cpu", dtype=torch.float32,
                                  vllm_asleep=True)
    llm = _FakeLLM.instances[-1]
    assert llm.events == [("sleep", 2)]  # asleep from the start: its memory goes to the trainer
    policy = CausalLM.from_pretrained(model_dir)
    scorer = Scorer(cfg)
    trainer = types.SimpleNamespace(
        rollout_engine=engine, cfg=cfg, dist=types.SimpleNamespace(rank=0, world_size=1),
        run=types.SimpleNamespace(eval_set=PromptDataset(data, tok), verifier=scorer),
        sync_rollout_weights=lambda: sync_engine_weights(engine, policy, prefix_to_strip="").seconds)
    llm.events.clear()
    try:
        res = Trainer.evaluate(trainer)
    finally:
        scorer.close()
    assert res["n"] == 4 and 0.0 <= res["accuracy"] <= 1.0 and "accuracy_sampled" in res
    assert llm.events[0] == ("wake_up", ("weights",)) and llm.events[-1] == ("sleep", 2)
