"""The from-scratch model against transformers' implementations, plus packing, KV cache, checkpoint I/O."""
import copy
import json
import os
import re

import pytest
import torch

from grpo_core import GPU_EXTRA_INSTALL
from grpo_core.model import CausalLM, KVCache, ModelArgs
from grpo_core.model import checkpoint_io

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
VOCAB = 97  # odd on purpose


def _hf_config(family, tied, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                  max_position_embeddings=256, rms_norm_eps=1e-6)
    common.update(overrides)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    return transformers.LlamaConfig(**common)


def _randomise(module, seed=0):
    # HF inits biases to 0 and norms to 1; random values make every parameter matter for parity.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)


HF_CASES = {
    "qwen2-tied-gqa": ("qwen2", True, {}),
    "qwen2-untied-mha": ("qwen2", False, {"num_key_value_heads": 4}),
    "qwen3-headdim-gqa": ("qwen3", False, {"head_dim": 16}),
    "qwen3-tied-bias": ("qwen3", True, {"attention_bias": True, "num_key_value_heads": 1}),
    "llama3-rope-scaling": ("llama", False, {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "llama-tied-linear": ("llama", True, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
}


def _logits(model, ids):
    with torch.no_grad():
        return model.lm_head(model(ids))


@pytest.mark.parametrize("case", list(HF_CASES), ids=list(HF_CASES))
def test_logits_match_transformers_both_directions(case, tmp_path):
    family, tied, overrides = HF_CASES[case]
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(family, tied, **overrides)).eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path / "hf")  # transformers 5 writes the rope_parameters form
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits

    ours = CausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert sorted(k for k in ours.state_dict() if not (tied and k == "lm_head.weight")) == \
        sorted(k for k in hf.state_dict() if not (tied and k == "lm_head.weight"))
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    torch.testing.assert_close(_logits(ours, ids), ref, atol=ATOL, rtol=0)

    # Ours -> transformers: the classic config form, tied models without lm_head.weight.
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["model_type"] == family
    assert "rope_theta" in config and "rope_parameters" not in config
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, atol=ATOL, rtol=0)


def test_classic_and_rope_parameters_forms_agree():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    base = dict(model_type="llama", vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4)
    classic = ModelArgs.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": {**scaling, "type": "llama3"}})
    v5 = ModelArgs.from_hf_config({**base, "rope_parameters": {**scaling, "rope_theta": 5e5}})
    assert classic == v5 and classic.rope_theta == 5e5 and classic.rope_type == "llama3"
    assert ModelArgs.from_hf_config(classic.to_hf_config()) == classic
    plain = ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.num_key_value_heads == 4 and plain.head_dim == 8


@pytest.mark.parametrize("bad, key", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"model_type": None}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"intermediate_size": "big"}, "intermediate_size"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_config_errors_name_the_key(bad, key):
    config = dict(model_type="qwen2", vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4)
    config.update(bad)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ValueError, match=key):
        ModelArgs.from_hf_config(config)


def _tiny(family="qwen2", tied=True, dtype=torch.float32, scale=2.0, **kw):
    args = ModelArgs(family=family, vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **kw)
    model = CausalLM.from_config(args, dtype=dtype, seed=3)
    with torch.no_grad():  # stronger weights than the 0.02 init, so mixing across sequences would show
        for p in model.parameters():
            p.mul_(scale)
    return model


# (dtype, weight scale, atol): fp32 at the contract's 1e-5; fp64 with sharp attention as an exactness check.
EXACTNESS = {"fp32": (torch.float32, 2.0, 1e-5), "fp64-sharp": (torch.float64, 8.0, 1e-10)}


def test_from_config_is_seeded_and_tied():
    a, b = _tiny(), _tiny()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert torch.all(a.model.norm.weight == 2.0)  # ones, scaled by _tiny


@pytest.mark.parametrize("precision", list(EXACTNESS))
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_packed_forward_equals_per_sequence(family, precision):
    dtype, scale, atol = EXACTNESS[precision]
    model = _tiny(family, tied=family != "llama", dtype=dtype, scale=scale)
    lengths = [5, 1, 12, 7]
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = torch.cat(seqs)[None]
    with torch.no_grad():
        h_packed = model(packed, cu_seqlens=cu)
        explicit = torch.cat([torch.arange(n) for n in lengths])[None]
        h_explicit = model(packed, position_ids=explicit, cu_seqlens=cu)
        per_seq = torch.cat([model(s[None])[0] for s in seqs])
        leaky = model(packed)[0]  # no boundaries: later sequences see earlier ones
    torch.testing.assert_close(h_packed[0], per_seq, atol=atol, rtol=0)
    torch.testing.assert_close(h_explicit, h_packed, atol=0, rtol=0)
    assert (leaky[5:] - per_seq[5:]).abs().max() > 1e-3  # the comparison is sensitive to cross-talk
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.cat([packed, packed]), cu_seqlens=cu)


@pytest.mark.parametrize("precision", list(EXACTNESS))
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_kv_cache_decoding_matches_full_forward(family, precision):
    dtype, scale, atol = EXACTNESS[precision]
    model = _tiny(family, dtype=dtype, scale=scale)
    batch, prompt_lengths, new_tokens = 3, [6, 2, 9], 5
    prompts = [torch.randint(0, VOCAB, (n,)) for n in prompt_lengths]
    continuations = torch.randint(0, VOCAB, (batch, new_tokens))
    padded = torch.zeros(batch, max(prompt_lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    cache = model.new_kv_cache(batch, max_seq_len=16)
    assert isinstance(cache, KVCache) and cache.lengths.tolist() == [0, 0, 0]
    with torch.no_grad():
        h_prefill = model(padded, kv_cache=cache, input_lengths=torch.tensor(prompt_lengths))
        assert cache.lengths.tolist() == prompt_lengths
        # Two decode steps of one token, then a chunk of three, all rows at different positions.
        steps = [model(continuations[:, t: t + 1], kv_cache=cache) for t in range(2)]
        steps.append(model(continuations[:, 2:], kv_cache=cache))
        assert cache.lengths.tolist() == [n + new_tokens for n in prompt_lengths]
        decoded = torch.cat(steps, dim=1)
        for b, p in enumerate(prompts):
            full = model(torch.cat([p, continuations[b]])[None])[0]
            torch.testing.assert_close(h_prefill[b, : len(p)], full[: len(p)], atol=atol, rtol=0)
            torch.testing.assert_close(decoded[b], full[len(p):], atol=atol, rtol=0)
        assert torch.isfinite(h_prefill).all()
        cache.reset()
        assert cache.lengths.tolist() == [0, 0, 0]
        with pytest.raises(RuntimeError, match="overflow"):
            model(torch.zeros(batch, 17, dtype=torch.long), kv_cache=cache)
    with pytest.raises(RuntimeError, match="no_grad"):
        model(padded, kv_cache=model.new_kv_cache(batch, 16))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_activation_checkpointing_same_grads(packed):
    model = _tiny("qwen3", tied=False)
    ids = torch.randint(0, VOCAB, (1, 11) if packed else (2, 11))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32) if packed else None

    def grads():
        model.zero_grad()
        model.lm_head(model(ids, cu_seqlens=cu)).float().logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_activation_checkpointing(True)
    recomputed = grads()
    model.set_activation_checkpointing(False)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_sharded_save_and_load(tmp_path):
    model = _tiny("llama", tied=False)
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and checkpoint_io.INDEX_FILE in files and "model.safetensors" not in files
    index = json.loads((tmp_path / "ckpt" / checkpoint_io.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = CausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, _logits(model, ids), atol=ATOL, rtol=0)


def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    model = _tiny()
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out, state_dict={k: v * 2 for k, v in model.state_dict().items()})
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary sibling left behind
    monkeypatch.undo()

    doubled = {k: v * 2 for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=doubled)
    assert (out / "tokenizer.json").read_text() == "{}"
    reloaded = CausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded.model.norm.weight, model.model.norm.weight * 2)
    with pytest.raises(KeyError, match="missing"):
        model.save_pretrained(out, state_dict={"module.x": torch.zeros(1)})


def test_load_errors_name_the_problem(tmp_path):
    model = _tiny(tied=False)
    model.save_pretrained(tmp_path / "ckpt")
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(KeyError, match="lm_head.weight"):
        CausalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        CausalLM.from_pretrained(tmp_path)


def test_attn_backend_choice():
    args = ModelArgs(family="qwen2", vocab_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2)
    with pytest.raises(ValueError, match="attn_backend"):
        CausalLM(args, attn_backend="xformers")
    from grpo_core.model.attention import flash_attn_installed
    if not flash_attn_installed():
        with pytest.raises(ImportError, match=re.escape(GPU_EXTRA_INSTALL)):
            CausalLM(args, attn_backend="flash_attn")
    model = CausalLM.from_config(args, attn_backend="sdpa")
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 16)


def _fused_kernel_available():
    try:
        from grpo_core.model.layers import _fused_logprob_entropy
        _fused_logprob_entropy()
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _fused_kernel_available(), reason="grpo_kernels.fused_logprob_entropy not importable yet")
def test_lm_head_fused_logprob_matches_log_softmax():
    model = _tiny(tied=True)
    ids = torch.randint(0, VOCAB, (2, 5))
    targets = torch.randint(0, VOCAB, (2, 5))
    targets[1, 3] = -100
    h = model(ids).detach()
    logprob, entropy = model.lm_head(h, targets=targets, temperature=0.7, with_entropy=True)
    logp = torch.log_softmax(model.lm_head(h).double() / 0.7, -1)
    ref_lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref_ent = -(logp.exp() * logp).sum(-1)
    valid = targets != -100
    assert logprob.shape == entropy.shape == (2, 5) and logprob.dtype == torch.float32
    torch.testing.assert_close(logprob[valid].double(), ref_lp[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy[valid].double(), ref_ent[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lengths,padded", [([5, 1, 12, 7, 9, 11], True), ([40, 2, 3], False)],
                         ids=["padded-batch", "block-mask"])
def test_packed_sdpa_layouts_match_per_sequence_with_gradients(lengths, padded):
    """Packed SDPA runs as a right-padded batch when that is cheaper than the block-diagonal mask (many short
    sequences), else with the mask; both give the per-sequence outputs and gradients (fp64, exact)."""
    model = _tiny("qwen2", dtype=torch.float64, scale=8.0)
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    _, ctx = model._varlen_context(1, sum(lengths), None, cu, torch.device("cpu"), torch.float64)
    assert (ctx.pad_index is not None) == padded and (ctx.mask is None) == padded
    upstream = torch.randn(sum(lengths), 48, dtype=torch.float64)
    model.zero_grad()
    (model(torch.cat(seqs)[None], cu_seqlens=cu)[0] * upstream).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum((model(s[None])[0] * u).sum() for s, u in zip(seqs, upstream.split(lengths))).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads_packed[n], p.grad, atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.cat(seqs)[None], cu_seqlens=cu)[0],
                                   torch.cat([model(s[None])[0] for s in seqs]), atol=1e-10, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_gpu_bf16_packed_and_cache_match(backend):
    model = _tiny("qwen3").to(device="cuda", dtype=torch.bfloat16)
    model.attn_backend = backend
    lengths = [33, 7, 64]
    seqs = [torch.randint(0, VOCAB, (n,), device="cuda") for n in lengths]
    cu = torch.tensor([0, 33, 40, 104], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], cu_seqlens=cu)[0].float()
        per_seq = torch.cat([model(s[None])[0] for s in seqs]).float()
        torch.testing.assert_close(packed, per_seq, atol=5e-2, rtol=5e-2)
        cache = model.new_kv_cache(1, 64)
        prefix = model(seqs[2][None, :60], kv_cache=cache)
        tail = torch.cat([model(seqs[2][None, t: t + 1], kv_cache=cache) for t in range(60, 64)], dim=1)
        torch.testing.assert_close(torch.cat([prefix, tail], 1)[0].float(), per_seq[40:], atol=5e-2, rtol=5e-2)


# config.json of released checkpoints (classic rope form), trimmed of nothing that matters to the architecture.
RELEASED_CONFIGS = {
    "Qwen2.5-0.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {
            "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
}


@pytest.mark.parametrize("name", list(RELEASED_CONFIGS))
def test_released_configs_give_hf_shapes(name):
    """Full-size architectures, built on the meta device: same keys and shapes as transformers' model."""
    config = RELEASED_CONFIGS[name]
    args = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        ours = CausalLM(args)
        # transformers edits the rope dict it is given in place: hand it a copy.
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**copy.deepcopy(config)))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    hf_rope = type(hf.model.rotary_emb)(hf.config).inv_freq  # rebuilt on the CPU (the meta copy has no data)
    torch.testing.assert_close(ours.model.rotary_emb.inv_freq(torch.device("cpu")), hf_rope, atol=0, rtol=0)
    written = args.to_hf_config(dtype="bfloat16")
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "rope_theta", "tie_word_embeddings",
                "eos_token_id", "rope_scaling"):
        assert written.get(key) == config.get(key), key


def test_bf16_load_keeps_tying(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = CausalLM.from_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    moved = loaded.to(torch.float32)
    assert moved.lm_head.weight is moved.model.embed_tokens.weight
    torch.testing.assert_close(moved.model.embed_tokens.weight, model.model.embed_tokens.weight, atol=2e-2, rtol=1e-2)
