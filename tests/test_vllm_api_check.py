"""The vLLM API check (benchmarks/check_vllm_api.py) and the adapter's declared needs (rollout/vllm_compat.py).

Self-contained: a small synthetic vLLM source tree, written by the test, built the way real releases are
(lazy MODULE_ATTRS exports, LLM's **kwargs forwarded to the EngineArgs dataclass, methods in a mixin base,
msgspec-style fields, a Literal alias, TypedDict prompts) passes; each doctored copy (one name removed) fails
naming the release and the missing name. Against real releases: the unpacked wheels under GRPO_VLLM_SRC
(default /work/cache/vllm-src/<version>, made by `pip download --no-deps vllm==X`); skipped when absent,
so the suite needs no network. The committed result table must cover every supported minor release.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from benchmarks import check_vllm_api as check
from grpo_core.rollout import vllm_compat as compat

VERSION = "0.34.0"
SYNTHETIC = {
    "vllm/__init__.py": '''
from .version import __version__
MODULE_ATTRS = {
    "LLM": ".entrypoints.llm:LLM",
    "SamplingParams": ".sampling_params:SamplingParams",
}
def __getattr__(name):
    raise AttributeError(name)
''',
    "vllm/version.py": f'__version__ = "{VERSION}"\n',
    "vllm/entrypoints/llm.py": '''
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.rl_mixin import RLMixin

class LLM(RLMixin):
    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False, **kwargs):
        engine_args = EngineArgs(model=model, tensor_parallel_size=tensor_parallel_size, **kwargs)
        self.llm_engine = engine_args

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        return []

    def get_tokenizer(self):
        return None

    def reset_prefix_cache(self):
        return True
''',
    "vllm/entrypoints/rl_mixin.py": '''
class RLMixin:
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return []

    def sleep(self, level: int = 1):
        self.level = level

    def wake_up(self, tags: list[str] | None = None):
        self.level = 0
''',
    "vllm/engine/arg_utils.py": '''
from dataclasses import dataclass

@dataclass
class EngineArgs:
    model: str = ""
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    enable_sleep_mode: bool = False
    logprobs_mode: str = "raw_logprobs"
    generation_config: str = "auto"
    enable_prefix_caching: bool | None = None
    max_model_len: int | None = None
''',
    "vllm/config/__init__.py": "from vllm.config.model import ModelConfig\n",
    "vllm/config/model.py": '''
from typing import Literal
LogprobsMode = Literal["raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs"]

class ModelConfig:
    max_model_len: int = 0
    logprobs_mode: LogprobsMode = "raw_logprobs"
    enable_sleep_mode: bool = False
''',
    "vllm/config/parallel.py": '''
from typing import Literal
DistributedExecutorBackend = Literal["ray", "mp", "uni", "external_launcher"]
''',
    "vllm/sampling_params.py": '''
import msgspec

class SamplingParams(msgspec.Struct):
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
''',
    "vllm/inputs/__init__.py": "from .llm import TokensPrompt\n",
    "vllm/inputs/llm.py": '''
from typing import TypedDict

class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
''',
    "vllm/outputs.py": '''
from dataclasses import dataclass

@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    logprobs: object
    finish_reason: str | None = None

class RequestOutput:
    def __init__(self, request_id, outputs):
        self.request_id = request_id
        self.outputs = outputs
''',
    "vllm/logprobs.py": '''
from dataclasses import dataclass

@dataclass
class Logprob:
    logprob: float
''',
    "vllm/v1/worker/gpu_worker.py": '''
class Worker:
    def get_model(self):
        return self.model_runner.get_model()

    def load_model(self):
        with self.pool(tag="weights"):
            self.model = None

    def initialize_cache(self):
        with self.pool(tag="kv_cache"):
            self.cache = None
''',
    "vllm/v1/executor/abstract.py": '''
from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher as _ExecutorWithExternalLauncher

ExecutorWithExternalLauncher = _ExecutorWithExternalLauncher
''',
    "vllm/v1/executor/uniproc_executor.py": '''
from vllm.v1.worker.worker_base import WorkerWrapperBase

class UniProcExecutor:
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [method(self.driver_worker, *args, **(kwargs or {}))]

class ExecutorWithExternalLauncher(UniProcExecutor):
    def _init_executor(self):
        self.driver_worker = WorkerWrapperBase()
''',
    "vllm/v1/worker/worker_base.py": '''
class WorkerWrapperBase:
    def __getattr__(self, attr):
        return getattr(self.worker, attr)
''',
    "vllm/distributed/parallel_state.py": '''
class GroupCoordinator:
    def __init__(self, ranks, rank):
        self.world_size = len(ranks)
        self.rank_in_group = ranks.index(rank)
        self.cpu_group = None

def get_tp_group():
    return None
''',
    **{f"vllm/model_executor/models/{mod}.py": f'''
class {cls}:
    def load_weights(self, weights):
        return set()
''' for mod, cls in (("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM"))},
}


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text.lstrip("\n"), encoding="utf-8")
    return root


def _doctor(files: dict[str, str], path: str, old: str, new: str) -> dict[str, str]:
    assert old in files[path], (path, old)  # the doctoring must really remove something
    return {**files, path: files[path].replace(old, new)}


def test_synthetic_release_passes(tmp_path, capsys):
    root = _write_tree(tmp_path / VERSION, SYNTHETIC)
    res = check.check_release(root)
    assert res.release == VERSION and res.ok, res.missing
    assert res.checked == len(compat.api_needs(VERSION)) >= 20
    assert check.main([str(root)]) == 0
    assert f"vllm {VERSION}: ok" in capsys.readouterr().out


@pytest.mark.parametrize("path,old,new,missing", [
    ("vllm/sampling_params.py", "    seed: int | None = None\n", "", "vllm.SamplingParams field 'seed'"),
    ("vllm/engine/arg_utils.py", '    logprobs_mode: str = "raw_logprobs"\n', "",
     "vllm.LLM.__init__ parameter 'logprobs_mode'"),
    # LLM still has **kwargs, but no longer forwards it to EngineArgs: the engine-level names are gone.
    ("vllm/entrypoints/llm.py", "tensor_parallel_size=tensor_parallel_size, **kwargs)",
     "tensor_parallel_size=tensor_parallel_size)", "vllm.LLM.__init__ parameter 'enable_sleep_mode'"),
    ("vllm/entrypoints/rl_mixin.py", "def wake_up(self, tags: list[str] | None = None):", "def wake_up(self):",
     "vllm.LLM.wake_up parameter 'tags'"),
    ("vllm/entrypoints/rl_mixin.py", "def collective_rpc(", "def _collective_rpc(", "missing vllm.LLM.collective_rpc "),
    ("vllm/model_executor/models/qwen2.py", "def load_weights(", "def load_weights_v2(",
     "missing vllm.model_executor.models.qwen2.Qwen2ForCausalLM.load_weights "),
    ("vllm/config/model.py", ', "processed_logprobs"]', "]",
     "vllm.config.model.LogprobsMode value 'processed_logprobs'"),
    ("vllm/__init__.py", '    "LLM": ".entrypoints.llm:LLM",\n', "", "missing vllm.LLM.__init__ "),
    ("vllm/v1/worker/gpu_worker.py", 'tag="kv_cache"', 'tag="kv"', "vllm.v1.worker.gpu_worker.Worker string 'kv_cache'"),
    ("vllm/v1/worker/worker_base.py", "def __getattr__(", "def _getattr(",
     "missing vllm.v1.executor.uniproc_executor.WorkerWrapperBase.__getattr__ "),
    ("vllm/v1/executor/uniproc_executor.py", "class ExecutorWithExternalLauncher(UniProcExecutor):",
     "class ExecutorWithExternalLauncher:", "missing vllm.v1.executor.abstract.ExecutorWithExternalLauncher.collective_rpc "),
    ("vllm/distributed/parallel_state.py", "self.rank_in_group =", "self.rank =",
     "GroupCoordinator.__init__ attribute 'rank_in_group'"),
])
def test_doctored_release_fails_naming_release_and_name(tmp_path, capsys, path, old, new, missing):
    root = _write_tree(tmp_path / VERSION, _doctor(SYNTHETIC, path, old, new))
    res = check.check_release(root)
    assert not res.ok
    assert any(m.startswith(f"vllm {VERSION}: missing ") and missing in m for m in res.missing), res.missing
    assert check.main([str(root)]) == 1
    assert missing in capsys.readouterr().out


def test_an_abstract_base_method_is_not_an_implementation(tmp_path):
    worker = """
class WorkerBase:
    def get_model(self):
        \"\"\"Implemented by subclasses.\"\"\"
        raise NotImplementedError

class Worker(WorkerBase):
    def get_model_renamed(self):
        return self.model_runner.get_model()

    def load_model(self):
        with self.pool(tag="weights"), self.pool(tag="kv_cache"):
            self.model = None
"""
    res = check.check_release(_write_tree(tmp_path / VERSION, {**SYNTHETIC, "vllm/v1/worker/gpu_worker.py": worker}))
    assert [m.split(" (")[0] for m in res.missing] == [f"vllm {VERSION}: missing vllm.v1.worker.gpu_worker.Worker.get_model"]
    res = check.check_release(_write_tree(tmp_path / VERSION, {
        "vllm/v1/worker/gpu_worker.py": worker.replace("raise NotImplementedError", "return self.model")}))
    assert res.ok  # inherited and implemented: fine


def test_needs_follow_the_release(tmp_path):
    # 0.10.x types LogprobsMode as an Enum exported by vllm.config: a tree that only has 0.11's Literal in
    # vllm.config.model fails as 0.10.2 and passes as 0.34.0.
    root = _write_tree(tmp_path / "t", {**SYNTHETIC, "vllm/version.py": '__version__ = "0.10.2"\n',
                                        # 0.10's external_launcher executor lives in the V0 package
                                        "vllm/executor/uniproc_executor.py":
                                            SYNTHETIC["vllm/v1/executor/uniproc_executor.py"]})
    res = check.check_release(root)
    assert res.release == "0.10.2"
    assert [m for m in res.missing] == ["vllm 0.10.2: missing vllm.config.LogprobsMode (logprobs under "
                                        "grpo_core's convention (an Enum: logprobs_mode_value))"]
    enum_config = SYNTHETIC["vllm/config/__init__.py"] + '''
import enum
class LogprobsMode(enum.Enum):
    RAW_LOGPROBS = "raw_logprobs"
    PROCESSED_LOGPROBS = "processed_logprobs"
'''
    root = _write_tree(tmp_path / "t", {"vllm/config/__init__.py": enum_config})
    assert check.check_release(root).ok


def test_out_writes_the_table(tmp_path):
    a = _write_tree(tmp_path / "a", SYNTHETIC)
    b = _write_tree(tmp_path / "b", {**_doctor(SYNTHETIC, "vllm/sampling_params.py", "    seed: int | None = None\n",
                                               ""), "vllm/version.py": '__version__ = "0.33.0"\n'})
    assert check.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    table = (tmp_path / "out" / "vllm_api_check.md").read_text()
    assert "| 0.33.0 |" in table and "FAIL: vllm.SamplingParams field 'seed'" in table and "| 0.34.0 |" in table
    data = json.loads((tmp_path / "out" / "vllm_api_check.json").read_text())
    assert [(r["release"], r["ok"]) for r in data["releases"]] == [("0.33.0", False), ("0.34.0", True)]
    assert a.exists() and b.exists()


# ----------------------------------------------------------------------------------------------- real releases
SRC = Path(os.environ.get("GRPO_VLLM_SRC", "/work/cache/vllm-src"))
# The oldest, the one pinning torch 2.13 (the project's torch) and the newest: each ~1 s to parse. The script
# covers every release: python benchmarks/check_vllm_api.py $GRPO_VLLM_SRC --out benchmarks/results
REAL = ("0.10.2", "0.32.0", "0.34.0")


@pytest.mark.parametrize("version", REAL)
def test_real_release_passes(version):
    root = SRC / version
    if not (root / "vllm" / "__init__.py").is_file():
        pytest.skip(f"no unpacked vllm {version} under {SRC} (pip download --no-deps vllm=={version}; unzip)")
    res = check.check_release(root)
    assert res.release == version and res.ok, res.missing


def test_real_release_doctored_fails(tmp_path):
    src = SRC / "0.34.0"
    if not (src / "vllm" / "__init__.py").is_file():
        pytest.skip(f"no unpacked vllm 0.34.0 under {SRC}")
    dst = tmp_path / "0.34.0"
    shutil.copytree(src, dst, copy_function=os.symlink)  # a linked copy; only the doctored file is real
    f = dst / "vllm" / "v1" / "worker" / "gpu_worker.py"
    text = f.read_text()
    f.unlink()
    assert "    def get_model(self)" in text
    f.write_text(text.replace("    def get_model(self)", "    def get_model_renamed(self)"))
    res = check.check_release(dst)
    assert res.missing == ["vllm 0.34.0: missing vllm.v1.worker.gpu_worker.Worker.get_model "
                           "(the live model inside the worker)"]


def test_result_table_covers_every_supported_minor_release():
    data = json.loads((check.REPO_ROOT / "benchmarks" / "results" / "vllm_api_check.json").read_text())
    rows = {r["release"]: r for r in data["releases"]}
    assert tuple(rows) == compat.CHECKED_RELEASES
    assert all(r["ok"] and r["supported"] and r["checked"] == len(compat.api_needs(v)) for v, r in rows.items())
    lo, hi = compat.SUPPORTED_VLLM
    minors = {compat.parse_version(v)[:2] for v in compat.CHECKED_RELEASES}
    assert minors == {(0, m) for m in range(lo[1], hi[1])}  # every minor release in the range, none missing
    assert rows["0.32.0"]["torch"] == "torch==2.13.0"  # the README's install advice rests on this


def test_gpu_extra_admits_exactly_the_supported_range():
    import re

    setup = (check.REPO_ROOT / "setup.py").read_text()
    pins = re.findall(r'"(vllm[^"]*)"', setup)
    assert pins == [compat.supported_range()] == ["vllm>=0.10.2,<0.35"]
