"""Data loading (verl / plain, parquet / JSONL), validation errors, rendering, resumable sampling."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo_core.data import (
    DataError,
    PromptDataset,
    PromptSampler,
    epoch_permutation,
    read_records,
    shard_batch,
    write_dataset,
)


class CharTokenizer:
    """Char-level fake: one id per character; the chat template tags each turn."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text):
        return [ord(c) for c in text]


TOK = CharTokenizer()

VERL_ROWS = [
    {
        "data_source": "gsm8k",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
        "reward_model": {"style": "rule", "ground_truth": "2"},
        "extra_info": {"split": "train", "index": 0},
    },
    {
        "data_source": "math",
        "prompt": [{"role": "user", "content": "Half of 1?"}],
        "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"},
        "extra_info": {"split": "train", "index": 1},
    },
]
PLAIN_ROWS = [
    {"prompt": "What is 2+3?", "answer": "5", "data_source": "arith_l1", "solution": "2+3=5. \\boxed{5}"},
    {"prompt": "What is 4+4?", "answer": "8"},
]


def _write_parquet(rows, path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write_jsonl(rows, path, raw_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(raw_lines))
    return path


def test_verl_parquet_loads_as_is(tmp_path):
    path = _write_parquet(VERL_ROWS, tmp_path / "train.parquet")
    ds = PromptDataset(path, TOK)
    assert ds.formats == {str(path): "verl"} and len(ds) == 2
    first, second = ds[0], ds[1]
    assert first.uid == "train-0" and second.uid == "train-1"
    assert first.messages == VERL_ROWS[0]["prompt"]
    assert (first.answer, first.data_source, first.solution) == ("2", "gsm8k", None)
    assert second.answer == "\\frac{1}{2}" and first.extra_info == {"split": "train", "index": 0}
    assert first.prompt_ids == TOK.encode("<system>Be brief.\n<user>1+1?\n<assistant>")


def test_plain_parquet_and_jsonl_load_with_template(tmp_path):
    pq_path = _write_parquet(PLAIN_ROWS, tmp_path / "a.parquet")
    js_path = _write_jsonl(PLAIN_ROWS, tmp_path / "b.jsonl", raw_lines=["\n"])  # a blank line is no row
    ds = PromptDataset([pq_path, js_path], TOK, prompt_template="Question: {prompt}\nAnswer:")
    assert [s.uid for s in ds.samples] == ["a-0", "a-1", "b-0", "b-1"]
    assert set(ds.formats.values()) == {"plain"}
    s = ds[0]
    assert s.messages == [{"role": "user", "content": "What is 2+3?"}]
    assert (s.answer, s.data_source, s.solution) == ("5", "arith_l1", "2+3=5. \\boxed{5}")
    assert s.prompt_ids == TOK.encode("Question: What is 2+3?\nAnswer:")
    assert ds[1].data_source == "a" and ds[3].data_source == "b"  # default: file stem
    assert [x.uid for x in ds.get_batch([3, 0])] == ["b-1", "a-0"]
    assert ds.has_labels


def test_template_braces_stay_literal(tmp_path):
    path = _write_jsonl(PLAIN_ROWS[:1], tmp_path / "t.jsonl")
    ds = PromptDataset(path, TOK, prompt_template="{prompt} Put it in \\boxed{}.")
    assert ds[0].prompt_ids == TOK.encode("What is 2+3? Put it in \\boxed{}.")
    with pytest.raises(DataError, match="must contain"):
        PromptDataset(path, TOK, prompt_template="no placeholder")


def test_template_with_system_and_multi_turn(tmp_path):
    path = _write_parquet(VERL_ROWS, tmp_path / "v.parquet")
    ds = PromptDataset(path, TOK, prompt_template="Q: {prompt}\nA:")
    assert ds[0].prompt_ids == TOK.encode("Be brief.\nQ: 1+1?\nA:")  # system text goes first
    multi = [{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}], "reward_model": {"ground_truth": "1"}}]
    path = _write_jsonl(multi, tmp_path / "m.jsonl")
    with pytest.raises(DataError, match=r"m.jsonl sample m-0: prompt_template needs a single user message"):
        PromptDataset(path, TOK, prompt_template="Q: {prompt}")
    assert PromptDataset(path, TOK, prompt_template="")[0].prompt_ids == TOK.encode(
        "<user>a\n<assistant>b\n<user>c\n<assistant>")  # "" means the chat template (DataConfig)


def test_same_stem_files_get_distinct_uids(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = _write_jsonl(PLAIN_ROWS, tmp_path / "x" / "train.jsonl")
    b = _write_jsonl(PLAIN_ROWS, tmp_path / "y" / "train.jsonl")
    ds = PromptDataset([a, b], TOK)
    assert [s.uid for s in ds.samples] == ["x/train-0", "x/train-1", "y/train-0", "y/train-1"]


def test_prompt_length_filter_drops_and_counts(tmp_path):
    rows = [{"prompt": "x" * n, "answer": "1"} for n in (3, 10, 4, 20)]
    path = _write_jsonl(rows, tmp_path / "len.jsonl")
    ds = PromptDataset(path, TOK, prompt_template="{prompt}", max_prompt_tokens=5)
    assert [s.uid for s in ds.samples] == ["len-0", "len-2"]  # uids keep the source row index
    assert ds.num_dropped_too_long == 2
    with pytest.raises(DataError, match="no usable rows"):
        PromptDataset(path, TOK, prompt_template="{prompt}", max_prompt_tokens=2)


def test_unlabeled_rows_need_opt_in(tmp_path):
    plain = _write_jsonl([{"prompt": "What is 1+1?"}], tmp_path / "u.jsonl")
    with pytest.raises(DataError, match=r"u.jsonl row 0: field 'answer' is missing.*allow_unlabeled"):
        PromptDataset(plain, TOK)
    ds = PromptDataset(plain, TOK, allow_unlabeled=True)
    assert ds[0].answer is None and not ds.has_labels
    verl = _write_parquet([{"data_source": "d", "prompt": [{"role": "user", "content": "q"}],
                            "reward_model": {"style": "rule", "ground_truth": None}}], tmp_path / "v.parquet")
    with pytest.raises(DataError, match=r"v.parquet row 0: field 'reward_model.ground_truth' is missing"):
        PromptDataset(verl, TOK)
    assert PromptDataset(verl, TOK, allow_unlabeled=True)[0].answer is None


@pytest.mark.parametrize(
    "rows, message",
    [
        ([PLAIN_ROWS[0], {"prompt": "q", "answer": 7}], r"bad.jsonl row 1: field 'answer' must be a string, got int"),
        ([{"prompt": 3, "answer": "1"}], r"bad.jsonl row 0: field 'prompt' must be a string, got int"),
        ([{"prompt": "q", "answer": "1", "solution": ["x"]}], r"row 0: field 'solution' must be a string, got list"),
        ([{"prompt": "  ", "answer": "1"}], r"row 0: field 'prompt' is empty"),
        ([{"prompt": "q", "answer": "1", "data_source": 5}], r"row 0: field 'data_source' must be a string"),
        ([{"question": "q", "gold": "1"}], r"bad.jsonl: cannot detect the row format: no 'prompt' column"),
        ([{"question": "q", "answer": "1"}], r"bad.jsonl row 0: field 'prompt' is missing"),
        ([{"prompt": [{"role": "user", "content": "q"}], "reward_model": "5"}],
         r"row 0: field 'reward_model' must be a dict"),
        ([{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "5"}}],
         r"row 0: field 'prompt\[0\].content' is missing"),
        ([{"prompt": [{"role": "user", "content": 1}], "reward_model": {"ground_truth": "5"}}],
         r"row 0: field 'prompt\[0\].content' must be a string, got int"),
        ([{"prompt": "q", "reward_model": {"ground_truth": "5"}}],
         r"row 0: field 'prompt' must be a list of \{role, content\} messages, got str"),
        ([{"prompt": [], "reward_model": {"ground_truth": "5"}}], r"row 0: field 'prompt' is an empty message list"),
        ([{"prompt": ["hi"], "reward_model": {"ground_truth": "5"}}], r"field 'prompt\[0\]' must be a \{role"),
        ([{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": True}}],
         r"row 0: field 'reward_model.ground_truth' must be a string, number, list or dict, got bool"),
        ([{"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "5"}, "extra_info": 3}],
         r"row 0: field 'extra_info' must be a dict"),
    ],
    ids=["answer-int", "prompt-int", "solution-list", "prompt-empty", "source-int", "no-prompt", "plain-no-prompt",
         "rm-str",
         "content-missing", "content-int", "verl-prompt-str", "verl-prompt-empty", "message-str", "gt-bool",
         "extra-int"],
)
def test_bad_rows_raise_one_error_naming_file_row_field(tmp_path, rows, message):
    path = _write_jsonl(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=message):
        PromptDataset(path, TOK)


def test_bad_parquet_row_names_file_row_field(tmp_path):
    rows = [{"prompt": "q", "answer": "1"}] * 17 + [{"prompt": "q", "answer": None}]
    path = _write_parquet(rows, tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"train.parquet row 17: field 'answer' is missing"):
        PromptDataset(path, TOK)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "missing.parquet")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_records(tmp_path / "data.csv")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="corrupt.parquet: cannot read parquet"):
        read_records(corrupt)
    broken = _write_jsonl(PLAIN_ROWS, tmp_path / "broken.jsonl", raw_lines=["{not json\n"])
    with pytest.raises(DataError, match=r"broken.jsonl line 3 \(row 2\): invalid JSON"):
        read_records(broken)
    array = _write_jsonl([], tmp_path / "array.jsonl", raw_lines=["[1, 2]\n"])
    with pytest.raises(DataError, match="expected a JSON object, got list"):
        read_records(array)
    assert issubclass(DataError, ValueError)


def test_write_dataset_roundtrip_and_atomic(tmp_path):
    for name in ("out/d.parquet", "out/d.jsonl"):
        path = write_dataset(PLAIN_ROWS, tmp_path / name)
        rows, _ = read_records(path)
        assert [r["prompt"] for r in rows] == [r["prompt"] for r in PLAIN_ROWS]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d.jsonl", "d.parquet"]  # no temp files left
    with pytest.raises(DataError, match="empty"):
        write_dataset([], tmp_path / "e.parquet")


# ---- sampler ----


def test_permutation_per_seed_and_epoch():
    assert epoch_permutation(50, seed=1, epoch=0) == epoch_permutation(50, seed=1, epoch=0)
    assert epoch_permutation(50, seed=1, epoch=0) != epoch_permutation(50, seed=1, epoch=1)
    assert epoch_permutation(50, seed=1, epoch=0) != epoch_permutation(50, seed=2, epoch=0)
    assert sorted(epoch_permutation(50, 1, 3)) == list(range(50))
    assert epoch_permutation(5, 1, 3, shuffle=False) == [0, 1, 2, 3, 4]


def test_sampler_crosses_epochs_and_covers_each_epoch():
    sampler = PromptSampler(10, batch_size=4, seed=3)
    stream = [i for _ in range(5) for i in sampler.next_batch()]  # 20 indices = exactly 2 epochs
    assert stream[:10] == epoch_permutation(10, 3, 0)
    assert stream[10:] == epoch_permutation(10, 3, 1)
    assert (sampler.epoch, sampler.position) == (2, 0)
    assert sampler.next_batch(3) == epoch_permutation(10, 3, 2)[:3]


def test_sampler_resume_mid_epoch_is_identical():
    reference = PromptSampler(7, batch_size=3, seed=11)
    full = [reference.next_batch() for _ in range(8)]
    first = PromptSampler(7, batch_size=3, seed=11)
    head = [first.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    assert (state["epoch"], state["position"]) == (1, 2)  # 9 indices read: mid-epoch
    resumed = PromptSampler(7, batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert head + [resumed.next_batch() for _ in range(5)] == full
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(7, batch_size=3, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_len"):
        PromptSampler(8, batch_size=3, seed=11).load_state_dict(state)


def test_rank_shards_union_to_global_batch():
    world = 4
    samplers = [PromptSampler(13, batch_size=8, seed=5, rank=r, world_size=world) for r in range(world)]
    single = PromptSampler(13, batch_size=8, seed=5)
    for _ in range(4):
        shares = [s.next_local_batch() for s in samplers]
        assert [i for share in shares for i in share] == single.next_batch()
        assert all(len(share) == 2 for share in shares)
    assert shard_batch([1, 2, 3, 4, 5, 6], rank=1, world_size=3) == [3, 4]
    with pytest.raises(ValueError, match="divide evenly"):
        shard_batch([1, 2, 3], rank=0, world_size=2)
    with pytest.raises(ValueError, match="divide evenly"):
        PromptSampler(10, batch_size=6, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        shard_batch([1, 2], rank=2, world_size=2)


def test_dataset_with_real_tiny_tokenizer_if_available(tmp_path):
    tokenizer_mod = pytest.importorskip("grpo_core.tokenizer")
    if not hasattr(tokenizer_mod, "build_tiny_tokenizer"):
        pytest.skip("grpo_core.tokenizer.build_tiny_tokenizer not available")
    tok = tokenizer_mod.build_tiny_tokenizer(tmp_path / "tok")
    path = _write_jsonl(PLAIN_ROWS, tmp_path / "t.jsonl")
    ds = PromptDataset(path, tok, prompt_template="Q: {prompt}\nA:")
    assert ds[0].prompt_ids == list(tok.encode("Q: What is 2+3?\nA:"))
    chat = PromptDataset(path, tok)
    assert chat[0].prompt_ids == list(tok.encode(tok.apply_chat_template(chat[0].messages,
                                                                          add_generation_prompt=True)))
    # The single \\boxed{ token: a solution's anchor is one id after rendering.
    boxed = tok.encode("\\boxed{5}")
    assert len(boxed) == 3 and tok.decode(boxed) == "\\boxed{5}"
