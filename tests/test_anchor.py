"""grpo_core.anchor: anchor position before the last answer marker, single- and multi-token markers."""
import pytest

from grpo_core.anchor import find_anchor, find_anchors, token_char_ends

MARKER = "\\boxed{"


class PieceTokenizer:
    """Greedy longest-match tokenizer over a fixed list of string pieces; counts decode work."""

    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.decode_calls = 0
        self.decoded_tokens = 0

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            best = max((k for k, p in enumerate(self.pieces) if text.startswith(p, i)),
                       key=lambda k: len(self.pieces[k]))
            ids.append(best)
            i += len(self.pieces[best])
        return ids

    def decode(self, ids, skip_special_tokens=True):
        self.decode_calls += 1
        self.decoded_tokens += len(ids)
        return "".join(self.pieces[i] for i in ids)


class ByteTokenizer:
    """One token per UTF-8 byte, decoded with replacement characters for incomplete sequences."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer():  # like the project's tiny tokenizer: `\boxed{` is one token
    return PieceTokenizer(CHARS + [MARKER])


def bpe_tokenizer():  # the marker spans 3 tokens, and one piece joins text before the marker to it
    return PieceTokenizer(CHARS + ["\\bo", "xed", "{", "= \\", "boxed", "the"])


def _anchor_by_hand(tok, ids, marker=MARKER):
    """Brute force: smallest k such that decoding ids[:k+1] reaches past the last occurrence's start."""
    text = tok.decode(ids)
    pos = text.rfind(marker)
    if pos < 0:
        return None
    for k in range(len(ids)):
        if len(tok.decode(ids[:k + 1])) > pos:
            return k - 1 if k > 0 else None


@pytest.mark.parametrize("make", [char_tokenizer, bpe_tokenizer], ids=["single-token", "multi-token"])
@pytest.mark.parametrize("text", [
    "so x = 4, the answer is \\boxed{4}",
    "first \\boxed{3} then \\boxed{5} done",
    "\\boxed{7}",  # marker at position 0
    "no marker here",
    "a = \\boxed{1}",  # in bpe, '= \\' holds text before the marker
    "trailing \\boxed{",
])
def test_matches_brute_force(make, text):
    tok = make()
    ids = tok.encode(text)
    assert find_anchor(ids, tok) == _anchor_by_hand(tok, ids)


def test_hand_positions():
    tok = char_tokenizer()
    ids = tok.encode("ab\\boxed{1}")
    assert ids[2] == len(CHARS)  # the single marker token
    assert find_anchor(ids, tok) == 1
    assert find_anchor(tok.encode("\\boxed{1}"), tok) is None
    assert find_anchor(tok.encode("x"), tok) is None
    assert find_anchor([], tok) is None
    bpe = bpe_tokenizer()
    ids = bpe.encode("a = \\boxed{2}")  # a, ' '... greedy: 'a', ' ', '= \\', 'boxed', '{', ...
    k = ids.index(bpe.pieces.index("= \\"))
    assert find_anchor(ids, bpe) == k - 1


def test_single_token_marker_with_later_split_occurrence():
    # The marker's own token appears first; a later occurrence is spelled character by character.
    tok = char_tokenizer()
    ids = tok.encode("\\boxed{1} and ") + [tok.pieces.index(c) for c in "x\\boxed{2}"]
    assert find_anchor(ids, tok) == _anchor_by_hand(tok, ids) == len(tok.encode("\\boxed{1} and "))


def test_custom_marker_and_batch():
    tok = bpe_tokenizer()
    batch = [tok.encode(t) for t in ("Answer: 3", "none", "x Answer: 1 Answer: 2")]
    got = find_anchors(batch, tok, marker="Answer:")
    assert got == [None, None, _anchor_by_hand(tok, batch[2], "Answer:")]
    assert got[2] is not None and got[2] > 5
    with pytest.raises(ValueError, match="marker"):
        find_anchor(batch[0], tok, marker="")


def test_multibyte_characters_split_across_tokens():
    tok = ByteTokenizer()
    text = "∑ é → \\boxed{π} ok"
    ids = tok.encode(text)
    decoded, ends = token_char_ends(ids, tok)
    assert decoded == text and ends[-1] == len(text)
    k = find_anchor(ids, tok)
    # the byte just before the backslash of the marker
    assert k == len(text[: text.rfind(MARKER)].encode("utf-8")) - 1


def test_decoding_is_linear():
    tok = bpe_tokenizer()
    body = "step one, then two. " * 120
    ids = tok.encode(body + "so \\boxed{9}. " + body[:200])
    tok.decode_calls = tok.decoded_tokens = 0
    assert find_anchor(ids, tok) == _anchor_by_hand(bpe_tokenizer(), ids)
    assert tok.decode_calls <= 2 * len(ids) + 2
    assert tok.decoded_tokens <= 6 * len(ids)  # windows of a few tokens, never whole prefixes


def test_real_tiny_tokenizer(tmp_path):
    tokenizer_mod = pytest.importorskip("grpo_core.tokenizer")
    tok = tokenizer_mod.build_tiny_tokenizer(tmp_path)
    text = "x=2, so \\boxed{2} and \\boxed{3}"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    marker_id = tok.encode(MARKER)
    assert len(marker_id) == 1
    assert find_anchor(ids, tok) == len(ids) - 1 - ids[::-1].index(marker_id[0]) - 1
    assert find_anchor(tok.encode("none"), tok) is None


def test_real_byte_level_bpe():
    """A tokenizers byte-level BPE trained on the spot: the marker spans tokens, spaces merge into tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["the answer is \\boxed{42} so ∑ é"] * 50 + ["boxed box xed {} \\"] * 20, trainer)

    class Wrapped:
        def encode(self, text):
            return bpe.encode(text).ids

        def decode(self, ids, skip_special_tokens=True):
            return bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    tok = Wrapped()
    for text in ("é so the answer is \\boxed{42}", "∑ \\boxed{1} then \\boxed{2}!", "no marker"):
        ids = tok.encode(text)
        assert find_anchor(ids, tok) == _anchor_by_hand(tok, ids)
