"""Bucketed weight streaming (grpo_core/weight_sync.py): a plain module and a DeepSpeed ZeRO-3 engine
(1 process in-process, 2 processes under torchrun, gloo on CPU) stream exactly the HF checkpoint's names,
shapes and values in bounded buckets, gathering one submodule at a time; a torch rollout engine fed by the
stream generates what an engine loaded from the saved checkpoint generates.

This file is also the torchrun worker script (see `__main__` at the bottom).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from grpo_core.model import CausalLM
from grpo_core.model.checkpoint_io import weight_files
from grpo_core.rollout import SamplingParams, TorchRolloutEngine
from grpo_core.weight_sync import SyncStats, flatten_buckets, iter_weight_buckets, sync_engine_weights

BUCKET_BYTES = 40_000  # the tiny model's embedding (~24 KB fp32) and MLP matrices (32 KB) force several buckets


class _Wrapped(nn.Module):
    """Like the trainer's PolicyForward: the CausalLM sits under `policy.`; the loss touches every weight."""

    def __init__(self, policy: CausalLM):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.policy.lm_head(self.policy(input_ids)).float()
        return torch.log_softmax(logits, -1)[..., 3].mean()


def _read_checkpoint(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in weight_files(path):
        out.update(load_file(str(f)))
    return out


def _check_stream(buckets, expected: dict[str, torch.Tensor], bucket_bytes: int, on_yield=None) -> dict:
    """Consume a bucket stream and compare it with a checkpoint; returns a small summary."""
    names, sizes = [], []
    for bucket in buckets:
        if on_yield is not None:
            on_yield()
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= bucket_bytes or len(bucket) == 1, f"bucket of {size} bytes holds {len(bucket)} tensors"
        sizes.append(size)
        for name, tensor in bucket:
            names.append(name)
            ref = expected[name]
            assert tuple(tensor.shape) == tuple(ref.shape), name
            torch.testing.assert_close(tensor.float(), ref.float(), rtol=0, atol=0, msg=name)
    assert len(names) == len(set(names)), "a weight was yielded twice"
    assert sorted(names) == sorted(expected), (sorted(set(expected) - set(names)), sorted(set(names) - set(expected)))
    return {"names": names, "bucket_sizes": sizes}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- plain modules
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_plain_module_stream_matches_checkpoint(tmp_path, tied):
    from grpo_core.tiny import build_tiny_model_dir

    src = build_tiny_model_dir(tmp_path / "src", tie_word_embeddings=tied, seed=3)
    model = CausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "saved")
    expected = _read_checkpoint(tmp_path / "saved")
    assert ("lm_head.weight" in expected) == (not tied)
    stats = SyncStats()
    out = _check_stream(iter_weight_buckets(_Wrapped(model), BUCKET_BYTES, stats=stats), expected, BUCKET_BYTES)
    assert out["names"][0] == "model.embed_tokens.weight"  # the tied weight under the name HF checkpoints use
    assert stats.buckets == len(out["bucket_sizes"]) >= 3
    assert stats.bytes == sum(t.numel() * t.element_size() for t in expected.values())
    assert stats.max_bucket_bytes == max(out["bucket_sizes"])
    # The clones never alias the live weights.
    first = next(iter_weight_buckets(model, BUCKET_BYTES, prefix_to_strip=""))[0][1]
    first.add_(1.0)
    assert not torch.equal(first, model.model.embed_tokens.weight)


def test_one_tensor_larger_than_bucket_gets_its_own_bucket(tiny_dir):
    model = CausalLM.from_pretrained(tiny_dir)
    buckets = list(iter_weight_buckets(model, 1, prefix_to_strip=""))
    assert all(len(b) == 1 for b in buckets) and len(buckets) == len(model.hf_state_dict_keys())


def test_bad_bucket_size_is_one_clear_error(tiny_dir):
    model = CausalLM.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(iter_weight_buckets(model, 0))


# ----------------------------------------------------------------------------- ZeRO-3
def _zero3_engine(model_dir: str, world: int):
    import deepspeed

    policy = CausalLM.from_pretrained(model_dir)
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": False}, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_allow_untested_optimizer": True}
    module = _Wrapped(policy)
    engine, *_ = deepspeed.initialize(model=module, config=ds_cfg, model_parameters=list(module.parameters()))
    # One optimizer step, different data per rank, so the weights differ from the checkpoint loaded above.
    rank = torch.distributed.get_rank()
    ids = torch.tensor([[1 + rank, 5, 7, 9, 11, 2]])
    engine.backward(engine(ids))
    engine.step()
    return engine, module


def _gathered_reference(module: nn.Module) -> dict[str, torch.Tensor]:
    """The old all-at-once gather (a second full copy), used only as the reference here."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k[len("policy."):]: v.detach().clone() for k, v in module.state_dict().items()}


def _zero3_check(model_dir: str, out_dir: str) -> dict:
    """Collective: every rank runs it. Saves the gathered reference with CausalLM.save_pretrained (rank 0),
    then checks the bucketed stream against that file on every rank."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    engine, module = _zero3_engine(model_dir, world)
    ref = _gathered_reference(module)
    saved = Path(out_dir) / "saved"
    if rank == 0:
        module.policy.save_pretrained(saved, state_dict=ref)
    torch.distributed.barrier()
    expected = _read_checkpoint(saved)
    original = _read_checkpoint(model_dir)
    assert any(not torch.equal(expected[k], original[k]) for k in expected), "the optimizer step changed nothing"
    params = list(module.parameters())
    assert all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in params), "ZeRO-3 did not partition the weights"

    def nothing_gathered():  # at every yield, every partition is released again (no second full copy)
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params)

    stats = SyncStats()
    res = _check_stream(iter_weight_buckets(module, BUCKET_BYTES, stats=stats), expected, BUCKET_BYTES,
                        on_yield=nothing_gathered)
    return {"rank": rank, "world": world, "buckets": stats.buckets, "tensors": stats.tensors,
            "bucket_sizes": res["bucket_sizes"], "engine": engine, "module": module, "saved": str(saved)}


@pytest.fixture(scope="module")
def zero3_single(tiny_dir, tmp_path_factory):
    from grpo_core.distributed import init_distributed

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed("cpu")
    if torch.distributed.get_world_size() != 1:
        pytest.skip("needs a single-process world")
    return _zero3_check(tiny_dir, str(tmp_path_factory.mktemp("zero3")))


def test_zero3_stream_single_process(zero3_single):
    assert zero3_single["world"] == 1 and zero3_single["buckets"] >= 3


def test_torch_engine_fed_by_stream_matches_saved_checkpoint(zero3_single, tiny_dir):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, stop_token_ids=[], seed=11)
    prompts = [[1, 5, 9], [4, 4, 7, 8, 2]]
    reference = TorchRolloutEngine(CausalLM.from_pretrained(zero3_single["saved"])).generate(prompts, params)
    # An engine that starts from different (pre-step) weights and is synced through the stream.
    synced = TorchRolloutEngine(CausalLM.from_pretrained(tiny_dir))
    before = synced.generate(prompts, params)
    stats = sync_engine_weights(synced, zero3_single["module"], bucket_bytes=BUCKET_BYTES)
    after = synced.generate(prompts, params)
    assert [g.token_ids for g in before] != [g.token_ids for g in reference]  # the sync has work to do
    assert [g.token_ids for g in after] == [g.token_ids for g in reference]
    for a, r in zip(after, reference):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(r.logprobs), rtol=0, atol=1e-6)
    assert stats.seconds > 0 and stats.buckets >= 3 and stats.bytes > 0


def test_flatten_buckets_is_lazy():
    pulled = []

    def gen():
        for i in range(3):
            pulled.append(i)
            yield [(f"w{i}", torch.zeros(1))]

    it = flatten_buckets(gen())
    assert next(it)[0] == "w0" and pulled == [0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_stream_two_processes_torchrun(tiny_dir, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), __file__, tiny_dir, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2]
    assert results[0]["bucket_sizes"] == results[1]["bucket_sizes"] and results[0]["buckets"] >= 3


if __name__ == "__main__":  # torchrun worker: python -m torch.distributed.run ... tests/test_weight_sync.py DIR OUT
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from grpo_core.distributed import init_distributed

    init_distributed("cpu")
    result = _zero3_check(sys.argv[1], sys.argv[2])
    keep = {k: v for k, v in result.items() if k in ("rank", "world", "buckets", "tensors", "bucket_sizes")}
    (Path(sys.argv[2]) / f"rank{result['rank']}.json").write_text(json.dumps(keep))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
