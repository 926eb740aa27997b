"""Tokenizer over the HF layout (tokenizer.json + tokenizer_config.json), without transformers.

Encoding/decoding is done by the ``tokenizers`` library; the chat template is rendered with a sandboxed jinja2
environment offering what real templates use (``raise_exception``, ``strftime_now``, a JSON ``tojson``, loop
controls). ``build_tiny_tokenizer`` writes the project's own character-level tokenizer in the same layout, so
tiny CPU runs go through the code path real checkpoints use.
"""
from __future__ import annotations

import datetime
import json
import os
import string
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _BackendTokenizer

from grpo_core.errors import UserError, naming

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 stores the template

BOXED_TOKEN = "\\boxed{"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
TINY_UNK = "<unk>"
# ChatML, as Qwen2.5-Instruct uses it (without the tool-calling branches).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TemplateError(ValueError, UserError):
    """A chat template refused a prompt (its raise_exception(...)): a user error (data or template)."""


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's built-in tojson HTML-escapes <, >, & and ', which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _token_content(value: Any) -> str | None:
    """Special-token entries are a string or a serialised AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token entry must be a string or {{'content': str}}, got {value!r}")


class Tokenizer:
    """Text <-> token ids and chat-template rendering for one HF tokenizer directory."""

    def __init__(self, backend: _BackendTokenizer, config: dict[str, Any], chat_template: str | None):
        self.backend = backend
        self.config = dict(config)
        self.chat_template = chat_template
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_token = _token_content(config.get("bos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        for key, token in (("eos_token", self.eos_token), ("bos_token", self.bos_token), ("pad_token", self.pad_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{CONFIG_FILE} key {key!r} = {token!r} is not in the tokenizer's vocabulary")
        self._compiled = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load ``path/tokenizer.json`` and ``path/tokenizer_config.json`` (+ ``chat_template.jinja`` if present)."""
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}")

        try:
            backend = _BackendTokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as e:  # the Rust library raises a bare Exception for a file it cannot parse
            raise UserError(f"{path / TOKENIZER_FILE} cannot be read as a tokenizer ({' '.join(str(e).split())}); "
                            f"restore it from the model's source") from None
        config: dict[str, Any] = {}
        if (path / CONFIG_FILE).is_file():
            try:
                with open(path / CONFIG_FILE, encoding="utf-8") as f:
                    config = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"{path / CONFIG_FILE} is not valid JSON ({e}); restore it from the model's "
                                f"source") from None
            if not isinstance(config, dict):
                raise UserError(f"{path / CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (path / TEMPLATE_FILE).is_file():
            template = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
        tokenizer = cls(backend, config, template)
        if template is not None:  # a broken template is found at load (the preflight), not at the first prompt
            try:
                if not isinstance(template, str):
                    raise TypeError(f"it is a {type(template).__name__}, not a string")
                tokenizer._compiled = _template_env().from_string(template)
            except (jinja2.TemplateError, TypeError) as e:
                raise UserError(f"the chat template in {path} ({CONFIG_FILE} 'chat_template' or {TEMPLATE_FILE}) "
                                f"cannot be compiled: {e}; fix it, or set data.prompt_template") from None
        return tokenizer

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (template inline, as transformers 4.x reads it)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with naming(path / TOKENIZER_FILE):
            self.backend.save(str(path / TOKENIZER_FILE))
        config = dict(self.config)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with naming(path / CONFIG_FILE), open(path / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (a model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        """The pad token's id; the eos id when the tokenizer defines no pad token (padding is always masked)."""
        return self.backend.token_to_id(self.pad_token) if self.pad_token is not None else self.eos_token_id

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts at once (the backend parallelises across them)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """ids: list[int] or a 1-D integer tensor/array."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Render messages [{"role", "content"}, ...] to the prompt string (not tokenised).

        Extra keyword arguments (e.g. ``enable_thinking`` for Qwen3) are passed to the template.
        """
        if self.chat_template is None:
            raise ValueError(f"this tokenizer has no chat template ({CONFIG_FILE} key 'chat_template')")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of dicts with 'role' and 'content'")
        if self._compiled is None:
            self._compiled = _template_env().from_string(self.chat_template)
        try:
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **template_kwargs,
            )
        except (jinja2.TemplateError, TemplateError) as e:  # e.g. raise_exception("System role not supported")
            raise TemplateError(f"the tokenizer's chat template refused a prompt ({' '.join(str(e).split())}); "
                                f"change the data (e.g. data.system_prompt) or set data.prompt_template") from None


def _template_env() -> jinja2.Environment:
    # Same environment settings as HF's template renderer, so templates render byte-identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-character table (what ByteLevel pre-tokenizers/decoders use).
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_UNICODE = _bytes_to_unicode()


def tiny_vocabulary() -> list[str]:
    """Tokens of the tiny tokenizer, in id order: specials, then printable ASCII and newline (in the byte-level
    alphabet: space is "Ġ", newline "Ċ"), then ``\\boxed{``."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable + "\n"
    return [END_OF_TEXT, IM_START, IM_END, TINY_UNK, *(_BYTE_TO_UNICODE[ord(c)] for c in chars), BOXED_TOKEN]


def build_tiny_tokenizer(out_dir: str | os.PathLike) -> Tokenizer:
    """Write the project's character-level tokenizer (HF layout) into out_dir and return it loaded from there.

    Every printable ASCII character and newline is one token; ``\\boxed{`` is one added (non-special) token so
    answer anchors are a single id; ChatML specials, pad = ``<|endoftext|>``, eos = ``<|im_end|>``.

    It is a byte-level BPE without merges (NFC, GPT-2 byte alphabet, no unknown token: a character outside the
    vocabulary is dropped), the pipeline transformers' Qwen2Tokenizer rebuilds from the vocabulary, so
    ``AutoTokenizer.from_pretrained`` on an exported model encodes and decodes every string exactly as this
    tokenizer does, whichever class transformers picks for the model type.
    """
    vocab = {token: i for i, token in enumerate(tiny_vocabulary())}
    backend = _BackendTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False,
                                           byte_fallback=False, continuing_subword_prefix="", end_of_word_suffix=""))
    backend.normalizer = normalizers.NFC()
    # One pre-token per character ([\s\S] also matches newline); without merges the split only matters for speed.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (END_OF_TEXT, IM_START, IM_END, TINY_UNK)])
    backend.add_tokens([AddedToken(BOXED_TOKEN, special=False, normalized=False)])
    added = {
        str(vocab[t]): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False, "special": t != BOXED_TOKEN}
        for t in (END_OF_TEXT, IM_START, IM_END, TINY_UNK, BOXED_TOKEN)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": TINY_UNK,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
    tokenizer = Tokenizer(backend, config, CHATML_TEMPLATE)
    tokenizer.save_pretrained(out_dir)
    return Tokenizer.from_pretrained(out_dir)
