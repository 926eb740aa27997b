"""Tokenizer over the HF layout: the tiny tokenizer, chat templates, and agreement with transformers."""
import json
import string

import pytest
import torch

from grpo_core.tiny import build_tiny_model_dir
from grpo_core.tokenizer import (
    BOXED_TOKEN, CHATML_TEMPLATE, END_OF_TEXT, IM_END, IM_START, TemplateError, Tokenizer, build_tiny_tokenizer,
)

TEXT = "Solve 3*x^2 + 4/(y-1) = 10.5 for x.\nAnswer: \\boxed{-\\frac{1}{2}} [ok] {a|b} ~`'\"!@#$%&_;<>?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tiny_vocabulary_and_specials(tiny):
    assert tiny.vocab_size < 128
    assert tiny.pad_token_id == tiny.token_to_id(END_OF_TEXT)
    assert tiny.eos_token_id == tiny.token_to_id(IM_END)
    ids = {tiny.token_to_id(t) for t in (END_OF_TEXT, IM_START, IM_END, BOXED_TOKEN)}
    assert None not in ids and len(ids) == 4
    for ch in string.digits + string.ascii_letters + "+-*/^=()[]{}\\.,:; \n":
        assert len(tiny.encode(ch)) == 1, ch


def test_boxed_is_one_token(tiny):
    boxed = tiny.token_to_id(BOXED_TOKEN)
    ids = tiny.encode("so \\boxed{42}")
    assert ids.count(boxed) == 1 and len(ids) == len("so ") + 1 + len("42}")
    assert tiny.encode(BOXED_TOKEN) == [boxed]
    assert tiny.decode([boxed]) == BOXED_TOKEN  # not special: kept when specials are skipped


def test_round_trip_and_special_skipping(tiny):
    ids = tiny.encode(TEXT)
    assert tiny.decode(ids) == TEXT
    assert tiny.decode(torch.tensor(ids)) == TEXT
    with_special = tiny.encode(TEXT + IM_END + END_OF_TEXT)
    assert with_special[-2:] == [tiny.eos_token_id, tiny.pad_token_id]
    assert tiny.decode(with_special) == TEXT
    assert tiny.decode(with_special, skip_special_tokens=False) == TEXT + IM_END + END_OF_TEXT
    assert tiny.encode_batch([TEXT, "1+1"]) == [ids, tiny.encode("1+1")]
    with pytest.raises(TypeError, match="str"):
        tiny.encode(ids)


def test_chat_template(tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    prompt = tiny.apply_chat_template(messages)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert tiny.apply_chat_template(messages, add_generation_prompt=False) == prompt[: -len("<|im_start|>assistant\n")]
    ids = tiny.encode(prompt)
    assert ids[0] == tiny.token_to_id(IM_START) and ids.count(tiny.eos_token_id) == 2
    with pytest.raises(TemplateError, match="unknown chat role: tool"):
        tiny.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_helpers_and_tokens(tiny, tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}{{ eos_token }}{% if extra %}{{ extra }}{% endif %}"
    )
    tok = Tokenizer(tiny.backend, {**tiny.config, "bos_token": IM_START}, template)
    out = tok.apply_chat_template([{"role": "user", "content": "<a&b>"}] * 3, extra="!")
    assert out == IM_START + '{"role": "user", "content": "<a&b>"}' * 2 + IM_END + "!"
    # The template may also come from chat_template.jinja (transformers 5) or a named list.
    tiny.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([]) == "D"
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": ""}]) == "J1"


def test_bad_special_token_names_the_key(tiny):
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer(tiny.backend, {"eos_token": "<|not_there|>"}, None)
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer(tiny.backend, {}, None).apply_chat_template([{"role": "user", "content": "x"}])


def test_matches_transformers_both_ways(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny.save_pretrained(tmp_path / "ours")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert hf.encode(TEXT, add_special_tokens=False) == tiny.encode(TEXT)
    assert hf.eos_token_id == tiny.eos_token_id and hf.pad_token_id == tiny.pad_token_id
    messages = [{"role": "user", "content": "2*3?"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tiny.apply_chat_template(messages)
    # transformers' own save (which may move the template to chat_template.jinja) loads back into ours.
    hf.save_pretrained(tmp_path / "hf")
    back = Tokenizer.from_pretrained(tmp_path / "hf")
    assert back.encode(TEXT) == tiny.encode(TEXT)
    assert back.apply_chat_template(messages) == tiny.apply_chat_template(messages)
    assert back.eos_token_id == tiny.eos_token_id and back.pad_token_id == tiny.pad_token_id


def test_tiny_model_dir_uses_the_tokenizer_vocab(tmp_path):
    from grpo_core.model import CausalLM

    out = build_tiny_model_dir(tmp_path / "tiny", family="qwen3", hidden_size=32, num_heads=4, num_kv_heads=2)
    tok = Tokenizer.from_pretrained(out)
    model = CausalLM.from_pretrained(out)
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["vocab_size"] == tok.vocab_size and config["eos_token_id"] == tok.eos_token_id
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "1+2"}]))])
    logits = model.lm_head(model(ids))
    assert logits.shape == (1, ids.shape[1], tok.vocab_size) and torch.isfinite(logits).all()
    assert CHATML_TEMPLATE == tok.chat_template


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_hf_export_round_trips_through_auto_tokenizer(tmp_path, family):
    """transformers' AutoTokenizer on an exported tiny model encodes and decodes exactly like grpo-core (for
    qwen2, transformers 5 rebuilds a Qwen2Tokenizer from the vocabulary: the export must survive that too)."""
    import random

    transformers = pytest.importorskip("transformers")
    from grpo_core.tiny import build_tiny_model_dir

    out = build_tiny_model_dir(tmp_path / family, family=family, hidden_size=16, num_layers=1, num_heads=2,
                               num_kv_heads=1, intermediate_size=32)
    ours = Tokenizer.from_pretrained(out)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    rng = random.Random(0)
    alphabet = string.printable + "é…\u212a\u00a0€ü<|>{}"
    texts = ["", " ", "\n\n", "  two  spaces\nand lines\n", "Solve: 3 + 4 = \\boxed{7}", "<|im_start|>user\nhi<|im_end|>",
             "tab\there\r\n", "Kelvin \u212a, café"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)
        for skip in (True, False):
            assert hf.decode(ids, skip_special_tokens=skip) == ours.decode(ids, skip_special_tokens=skip), repr(text)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1 = ?\nthink"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == ours.apply_chat_template(msgs)
    assert hf.eos_token_id == ours.eos_token_id and hf.pad_token_id == ours.pad_token_id
