"""The vLLM rollout engine: one colocated vLLM instance per training rank, fed by the streaming weight sync.

Written against vLLM 0.10.2 - 0.11.x (V1 engine; see SUPPORTED_VLLM). What it relies on:
  - `LLM(model, distributed_executor_backend="external_launcher", ...)`: under torchrun every rank builds its
    own instance inside its own process; vLLM reuses the trainer's torch.distributed world and forms
    tensor-parallel groups of `tensor_parallel_size` consecutive ranks (world / tp independent instances).
    This backend switches vLLM's engine core to in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so weights are
    handed over as CUDA tensors with no serialisation, and it requires a fixed `seed`.
  - Weight loading: `LLM.collective_rpc(fn, args=(bucket,))` runs `fn(worker, bucket)` on this rank's worker;
    `fn` calls `worker.model_runner.get_model().load_weights(bucket)`, the model's own HF-name loader (it
    fuses q/k/v and gate/up, slices for TP and skips lm_head when tied) and returns the names it loaded.
  - Sleep mode (`enable_sleep_mode=True`): `LLM.sleep(level=2)` discards weights and KV cache (the weights
    are re-sent by the next sync anyway, so nothing is copied to CPU); `LLM.wake_up(tags=["weights"])`
    re-maps the weight memory (vLLM restores its buffers, e.g. rotary tables), the sync loads the new
    weights, then `wake_up(tags=["kv_cache"])` re-creates the KV cache, so the peak during the sync is
    weights + one bucket, not weights + KV cache + bucket.
  - `logprobs_mode` (ModelConfig, 0.10.2+; see `choose_logprobs_mode`) so the returned per-token logprob
    follows grpo_core's convention `log_softmax(logits / T)[token]` before top-k / top-p
    (grpo_core/rollout/base.py). vLLM's default, "raw_logprobs", is `log_softmax(logits)` at T = 1;
    "processed_logprobs" is taken after temperature AND after top-k/top-p renormalisation. So: no
    truncation -> "processed_logprobs" (exact at every T); truncation at T == 1 -> "raw_logprobs" (exact);
    truncation at T != 1 -> no mode matches: "processed_logprobs" with a warning (the logprob of a kept token
    is then higher by -log(kept mass)). Greedy requests get T = 1 logprobs in both modes, as our convention.
Version differences handled here: before 0.10.2 there is no processed mode (V1 only returned raw T = 1
logprobs, and 0.8.x/0.9.x may silently run the V0 engine), so those versions are refused at start-up;
`LogprobsMode` is an Enum in 0.10.x and a Literal of strings in 0.11.x (`_logprobs_mode_value`);
`CompletionOutput.logprobs` is a list of {token_id: Logprob} or a FlatLogprobs (0.11+); both index as
`logprobs[i][token_id].logprob`.

Sampling semantics match the torch engine: each of the n samples of a prompt is its own vLLM request with a
seed derived from (params.seed, request id, sample index), so results do not depend on how prompts are split
over ranks or calls (they differ from the torch engine's draws: another RNG); stop tokens are exactly
`params.stop_token_ids` (eos by default; the model's generation_config is ignored: `ignore_eos=True` plus an
explicit stop list), kept in token_ids; stop strings end the text before the string, the completing token
kept in token_ids.
"""
from __future__ import annotations

import enum
import gc
import importlib
import logging
import os
import socket
from typing import Iterable

import torch
from torch import Tensor

from grpo_core import GPU_EXTRA_INSTALL
from grpo_core.rollout.base import Generation, RolloutEngine, SamplingParams, check_requests

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ((0, 10, 2), (0, 12, 0))  # [min, max): the versions whose API this file was written against
_GPU_EXTRA = GPU_EXTRA_INSTALL
_MASK64 = 0xFFFFFFFFFFFFFFFF


# ----------------------------------------------------------------------------------------------- checks
def require_cuda() -> None:
    """One clear line when vLLM is asked for on a machine without CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("rollout.engine='vllm' needs a CUDA GPU (vLLM is CUDA-only; install the gpu extra on a "
                           f"CUDA machine: {_GPU_EXTRA}); use rollout.engine='torch' here")


def parse_version(text: str) -> tuple[int, int, int]:
    """'0.10.2', '0.11.1rc2.dev5+g1234', '0.10.1.1' -> (0, 10, 2), (0, 11, 1), (0, 10, 1)."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple((parts + [0, 0, 0])[:3])


def check_vllm_version(version: str) -> None:
    """Refuse versions older than SUPPORTED_VLLM[0]; warn on newer ones (not yet checked against)."""
    lo, hi = SUPPORTED_VLLM
    v = parse_version(version)
    span = f"vllm>={'.'.join(map(str, lo))},<{'.'.join(map(str, hi[:2]))}"
    if v < lo:
        raise ImportError(f"rollout.engine='vllm' needs {span} (found vllm {version}: it has no logprobs_mode to "
                          f"return logprobs under grpo_core's convention); {_GPU_EXTRA}")
    if v >= hi:
        logger.warning("vllm %s is newer than the versions grpo_core's vLLM engine was written against (%s)",
                       version, span)


def _import_vllm():
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as e:
        raise ImportError(f"rollout.engine='vllm' needs vLLM: {_GPU_EXTRA} ({e})") from None
    check_vllm_version(getattr(vllm, "__version__", "0"))
    return vllm


# ----------------------------------------------------------------------------------------------- logprobs
def choose_logprobs_mode(temperature: float, top_p: float, top_k: int) -> tuple[str, bool]:
    """vLLM logprobs_mode giving `log_softmax(logits / T)[token]` before top-k/top-p for these settings, and
    whether it is exact (see the module docstring)."""
    truncated = top_p < 1.0 or top_k > 0
    if not truncated:
        return "processed_logprobs", True
    if temperature in (0.0, 1.0):
        return "raw_logprobs", True
    return "processed_logprobs", False


def _mode_is_exact(mode: str, params: SamplingParams) -> bool:
    truncated = params.top_p < 1.0 or params.top_k > 0
    if params.temperature == 0.0:
        return True  # greedy: both modes give the T = 1 log-softmax
    if mode == "raw_logprobs":
        return params.temperature == 1.0
    return not truncated


def _logprobs_mode_value(name: str):
    """0.10.x types ModelConfig.logprobs_mode as an Enum, 0.11.x as a string Literal."""
    try:
        from vllm.config import LogprobsMode
    except ImportError:
        return name
    if isinstance(LogprobsMode, type) and issubclass(LogprobsMode, enum.Enum):
        return LogprobsMode(name)
    return name


# ----------------------------------------------------------------------------------------------- seeds
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def request_seed(seed: int, request_id: int, sample_index: int) -> int:
    """The vLLM seed of one sample: a 63-bit hash of (params.seed, request id, sample index)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (request_id & 0xFFFFFFFF))
    h = _splitmix64(h ^ ((sample_index & 0xFFFFFFFF) << 32))
    return h & 0x7FFFFFFFFFFFFFFF


# ----------------------------------------------------------------------------------------------- worker-side
def _load_into_model(worker, weights) -> list[str] | None:
    """Runs inside vLLM's worker (in-process): load (HF name, tensor) pairs into the live model."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    loaded = model.load_weights(weights)
    return None if loaded is None else sorted(loaded)


def _model_param_names(worker) -> list[str]:
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    return [name for name, _ in model.named_parameters()]


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
        if dtype not in names:
            raise ValueError(f"vLLM engine dtype must be bfloat16, float16 or float32, got {dtype}")
        return names[dtype]
    return str(dtype)


def _prepare_launcher_env() -> None:
    """external_launcher reads RANK / LOCAL_RANK / MASTER_* (env://); a lone process has none of them. The
    engine core must run in this process (vLLM sets this too for external_launcher; set it before vLLM reads
    its environment, whatever the version)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)


# ----------------------------------------------------------------------------------------------- engine
class VLLMRolloutEngine(RolloutEngine):
    """vLLM generation colocated with training (same interface and conventions as TorchRolloutEngine).

    model_dir: HF checkpoint directory (config.json, safetensors, tokenizer files) vLLM starts from.
    tokenizer: grpo_core tokenizer; when given, `text` is decoded with it exactly as the torch engine does,
        and its eos is the default stop token (else vLLM's tokenizer of model_dir is used for both).
    gpu_memory_utilization: fraction of the GPU's total memory this instance may take (weights + KV cache +
        activations); the trainer's memory must fit in the rest.
    tensor_parallel_size: ranks per vLLM instance (consecutive ranks; must divide the world size). Ranks of one
        TP group exchange their prompts, generate together and each keeps its own results.
    sleep_mode: `sleep()` frees weights and KV cache for the training phase; the next weight sync wakes it.
    temperature, top_p, top_k: the rollout settings, used only to choose vLLM's logprobs_mode.
    seed: vLLM's global seed (required by external_launcher; per-request seeds decide the samples).
    max_model_len: prompt + generated tokens per sequence; default the model's max_position_embeddings.
    llm_kwargs: extra `vllm.LLM` arguments (e.g. max_num_seqs, enforce_eager).
    """

    def __init__(
        self,
        model_dir: str,
        tokenizer=None,
        *,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        sleep_mode: bool = True,
        dtype: torch.dtype | str = "bfloat16",
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        max_model_len: int | None = None,
        llm_kwargs: dict | None = None,
    ):
        require_cuda()
        vllm = _import_vllm()
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist_on else 1
        if world % tensor_parallel_size:
            raise ValueError(f"rollout.tensor_parallel_size={tensor_parallel_size} must divide the world size {world}")
        self.tokenizer = tokenizer
        self.sleep_mode = bool(sleep_mode)
        self.tensor_parallel_size = tensor_parallel_size
        self.logprobs_mode, exact = choose_logprobs_mode(temperature, top_p, top_k)
        if not exact:
            logger.warning("vLLM cannot return log_softmax(logits/T) before top-k/top-p at T=%s with top_p=%s, "
                           "top_k=%s: rollout logprobs are of the truncated distribution (rollout-vs-trainer "
                           "mismatch and TIS weights include -log(kept mass))", temperature, top_p, top_k)
        _prepare_launcher_env()
        kwargs = dict(
            model=str(model_dir), dtype=_dtype_name(dtype), gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher",
            enable_sleep_mode=self.sleep_mode, seed=int(seed), logprobs_mode=_logprobs_mode_value(self.logprobs_mode),
            generation_config="vllm",  # sampling comes only from our SamplingParams, never the model's defaults
            enable_prefix_caching=True,  # the n samples of a prompt share its prefill
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        kwargs.update(llm_kwargs or {})
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._asleep = False
        self._weights_valid = True  # False after a level-2 sleep until the next full weight sync
        self._warned: set[tuple] = set()

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Free weights and KV cache (level-2 sleep) while the trainer runs; no-op without sleep_mode."""
        if not self.sleep_mode or self._asleep or self.llm is None:
            return
        self.llm.sleep(level=2)
        self._asleep = True
        self._weights_valid = False

    def wake_up(self) -> None:
        """Re-allocate weights and KV cache. After `sleep` the weights are garbage until `sync_weights`."""
        if self._asleep:
            torch.cuda.empty_cache()  # hand the trainer's cached-but-free blocks back before vLLM maps its memory
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        self.llm = None
        gc.collect()
        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ weights
    def sync_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load (HF name, tensor) pairs, consumed lazily by one load_weights call."""
        self.load_weight_buckets([named_tensors])

    def load_weight_buckets(self, buckets: Iterable[Iterable[tuple[str, Tensor]]]) -> None:
        """Load a bucket stream (grpo_core.weight_sync.iter_weight_buckets): one load_weights call per bucket.

        Wakes the weights first if asleep, checks afterwards that every vLLM parameter was loaded (as vLLM's
        own checkpoint loader does), drops the prefix cache (it holds KV of the old weights), then wakes the
        KV cache.
        """
        if self.llm is None:
            raise RuntimeError("sync_weights called on a closed VLLMRolloutEngine")
        if self._asleep:
            torch.cuda.empty_cache()  # hand the trainer's cached-but-free blocks back before vLLM maps its memory
            self.llm.wake_up(tags=["weights"])
        loaded: set[str] | None = set()
        for bucket in buckets:
            names = self.llm.collective_rpc(_load_into_model, args=(bucket,))[0]
            loaded = None if (names is None or loaded is None) else loaded | set(names)
        if loaded is not None:
            missing = sorted(set(self.llm.collective_rpc(_model_param_names)[0]) - loaded)
            if missing:
                raise ValueError(f"sync_weights: {len(missing)} vLLM parameters were not given, e.g. {missing[:5]}")
        self._weights_valid = True
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, request_ids: list[int] | None = None
    ) -> list[Generation]:
        """Sample params.n responses per prompt; returns Generations ordered prompt-major (see base.py).

        Collective when tensor_parallel_size > 1: every rank of the TP group must call it (possibly with no
        prompts)."""
        if self.llm is None:
            raise RuntimeError("generate called on a closed VLLMRolloutEngine")
        if self._asleep or not self._weights_valid:
            raise RuntimeError("generate called on a sleeping VLLMRolloutEngine: sync_weights (or wake_up and "
                               "sync_weights, after a sleep the weights are gone) first")
        keys = check_requests(prompts, request_ids)
        prompts = [list(p) for p in prompts]
        for i, p in enumerate(prompts):
            if len(p) >= self.max_model_len:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens but vLLM's max_model_len is {self.max_model_len}: "
                                 "no room to generate (prompt + new tokens must fit)")
        self._warn_inexact(params)
        all_prompts, all_keys, offset = self._gather_tp(prompts, keys)
        outputs = self._generate_all(all_prompts, all_keys, params)
        mine = outputs[offset * params.n:(offset + len(prompts)) * params.n]
        return [Generation(prompt_index=p - offset, sample_index=s, token_ids=t, logprobs=lp, finish_reason=r, text=x)
                for p, s, t, lp, r, x in mine]

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        if params.stop_token_ids is not None:
            return list(params.stop_token_ids)
        tok = self.tokenizer if self.tokenizer is not None else self.llm.get_tokenizer()
        eos = getattr(tok, "eos_token_id", None)
        return [] if eos is None else [int(eos)]

    def _warn_inexact(self, params: SamplingParams) -> None:
        key = (params.temperature, params.top_p, params.top_k)
        if key not in self._warned and not _mode_is_exact(self.logprobs_mode, params):
            self._warned.add(key)
            logger.warning("vLLM logprobs_mode=%s does not give log_softmax(logits/T) before top-k/top-p for "
                           "T=%s top_p=%s top_k=%s; build the engine with these rollout settings",
                           self.logprobs_mode, *key)

    def _gather_tp(self, prompts, keys):
        """With TP > 1 every rank of a TP group must submit the same requests: gather the group's prompts.
        Returns (all prompts, all request ids, index of this rank's first prompt)."""
        if self.tensor_parallel_size == 1:
            return prompts, keys, 0
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        parts = [None] * group.world_size
        torch.distributed.all_gather_object(parts, (prompts, keys), group=group.cpu_group)
        offset = sum(len(p) for p, _ in parts[:group.rank_in_group])
        return [x for p, _ in parts for x in p], [x for _, k in parts for x in k], offset

    def _generate_all(self, prompts, keys, params: SamplingParams) -> list[tuple]:
        """(prompt index, sample index, token_ids, logprobs, finish_reason, text) per sample, prompt-major."""
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        stop_ids = self._stop_ids(params)
        requests = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        inputs, sampling = [], []
        for p, s in requests:
            inputs.append(TokensPrompt(prompt_token_ids=prompts[p]))
            sampling.append(self._vllm.SamplingParams(
                n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                max_tokens=min(params.max_new_tokens, self.max_model_len - len(prompts[p])),
                stop=list(params.stop_strings) or None, stop_token_ids=stop_ids, ignore_eos=True,
                include_stop_str_in_output=False, skip_special_tokens=True,
                seed=request_seed(params.seed, keys[p], s), logprobs=0,
            ))
        outs = self.llm.generate(inputs, sampling, use_tqdm=False)  # returned in submission order
        if len(outs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(requests)} requests")
        results = []
        stop_set = set(stop_ids)
        for (p, s), out in zip(requests, outs):
            comp = out.outputs[0]
            token_ids = [int(t) for t in comp.token_ids]
            if comp.logprobs is None or len(comp.logprobs) < len(token_ids):
                raise RuntimeError("vLLM returned no per-token logprobs (SamplingParams.logprobs=0 was ignored)")
            logprobs = [float(comp.logprobs[i][t].logprob) for i, t in enumerate(token_ids)]
            reason = self._finish_reason(comp.finish_reason, token_ids, stop_set)
            results.append((p, s, token_ids, logprobs, reason, self._text(comp, token_ids, reason, params)))
        return results

    @staticmethod
    def _finish_reason(reason, token_ids: list[int], stop_set: set[int]) -> str:
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with finish_reason={reason!r} (expected stop or length)")
        # vLLM checks the length cap before stop tokens; the torch engine calls a final stop token a stop.
        if reason == "length" and token_ids and token_ids[-1] in stop_set:
            return "stop"
        return reason

    def _text(self, comp, token_ids: list[int], reason: str, params: SamplingParams) -> str | None:
        if self.tokenizer is None:
            return comp.text
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if reason == "stop" and params.stop_strings:
            cuts = [i for i in (text.find(s) for s in params.stop_strings) if i >= 0]
            if cuts:
                text = text[:min(cuts)]
        return text
