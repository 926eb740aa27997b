"""Every difference between vLLM releases that grpo_core's vLLM engine meets, in one place.

The engine (grpo_core/rollout/vllm_engine.py) calls vLLM only through the names declared in `API_NEEDS`
below, and benchmarks/check_vllm_api.py checks those names against the real source of every release
(AST, nothing imported; result table: benchmarks/results/vllm_api_check.md). Supported: vLLM 0.10.2 up to,
not including, 0.35 (SUPPORTED_VLLM), i.e. every minor release 0.10 ... 0.34.

Why 0.10.2 is the oldest: it is the first release with `logprobs_mode` (ModelConfig), without which vLLM
returns only `log_softmax(logits)` at T = 1 and the rollout logprobs would not follow grpo_core's convention
`log_softmax(logits / T)[token]` (rollout/base.py); 0.8.x/0.9.x may also silently run the V0 engine. Older
releases would need a second logprob path (recomputing logprobs in the trainer), which is the contortion
the range avoids.

| vLLM release | logprobs_mode passed as | logprobs container | weight update used | public weight-update API offered (not used) |
|---|---|---|---|---|
| 0.10.2 | `vllm.config.LogprobsMode` Enum member | list of {token: Logprob} | collective_rpc(fn) -> worker.get_model().load_weights(bucket) | none |
| 0.11 - 0.15 | string (Literal in vllm.config.model; vllm.config no longer exports it) | list, or FlatLogprobs | same | none |
| 0.16 | string | same | same | LLM.init_weight_transfer_engine / update_weights; backend nccl |
| 0.17 - 0.20 | string | same | same | same; backends nccl, ipc |
| 0.21 - 0.34 | string | same | same | + start_weight_update / finish_weight_update; backends grow (0.25 sparse_nccl, 0.29 sharded_rdt, 0.31 nccl_m2n) |

(Measured from each release's source by benchmarks/check_vllm_api.py; the per-release rows are in
benchmarks/results/vllm_api_check.md.) Sleep semantics read from the source: from 0.17 `sleep` also pauses
the scheduler; 0.17 - 0.30 resume it on every `wake_up`, 0.31+ only once all memory is resident again. The
engine's order (wake weights, load, wake kv_cache, then generate) is fully awake before generating in all.

Common to all: `LLM(model, distributed_executor_backend="external_launcher", enable_sleep_mode, seed,
logprobs_mode, generation_config="vllm", enable_prefix_caching, tensor_parallel_size, ...)`,
`SamplingParams(n, temperature, top_p, top_k, max_tokens, stop, stop_token_ids, ignore_eos,
include_stop_str_in_output, skip_special_tokens, seed, logprobs)`, `LLM.generate(prompts, sampling_params,
use_tqdm)` with `vllm.inputs.TokensPrompt`, `LLM.collective_rpc(method, timeout, args, kwargs)`,
`LLM.sleep(level=2)`, `LLM.wake_up(tags=["weights"])` then `wake_up(tags=["kv_cache"])`, `LLM.reset_prefix_cache()`,
and the model's
`load_weights(weights)` (Qwen2/Qwen3/Llama ForCausalLM: HF names, fuses q/k/v and gate/up, TP-slices).

Why the public weight-update API is not used where offered (0.16+): its transports (NCCL broadcast from a
trainer process, CUDA IPC handles from another process) move weights *between processes*. grpo_core's
engine lives inside the trainer's own process (external_launcher, in-process engine core), so the
trainer's bucket is already a CUDA tensor on the worker's device: `collective_rpc(fn, args=(bucket,))` runs
`load_weights` on it directly, no broadcast, no IPC handle, no extra copy. (A weight-update API that
takes in-process tensors would be preferred; none of 0.16 - 0.34 offers one at the LLM level.)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from grpo_core import GPU_EXTRA_INSTALL

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ((0, 10, 2), (0, 35, 0))  # [oldest, first unsupported)
# The latest patch of every minor release in the range: the releases the API check was run against.
CHECKED_RELEASES = (
    "0.10.2", "0.11.2", "0.12.0", "0.13.0", "0.14.1", "0.15.1", "0.16.0", "0.17.1", "0.18.1", "0.19.1",
    "0.20.2", "0.21.0", "0.22.1", "0.23.0", "0.24.0", "0.25.1", "0.26.0", "0.27.1", "0.28.0", "0.29.0",
    "0.30.0", "0.31.0", "0.32.0", "0.33.0", "0.34.0",
)
GPU_EXTRA = GPU_EXTRA_INSTALL  # the one install command, as the README gives it
ALLOW_UNTESTED_ENV = "GRPO_VLLM_ALLOW_UNTESTED"  # =1: a release outside the range only warns


# ----------------------------------------------------------------------------------------------- versions
def parse_version(text: str) -> tuple[int, int, int]:
    """'0.10.2', '0.11.1rc2.dev5+g1234', '0.10.1.1' -> (0, 10, 2), (0, 11, 1), (0, 10, 1)."""
    parts = []
    for piece in str(text).split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple((parts + [0, 0, 0])[:3])


def supported_range() -> str:
    lo, hi = SUPPORTED_VLLM
    return f"vllm>={'.'.join(map(str, lo))},<{'.'.join(map(str, hi[:2]))}"


def is_supported(version: str) -> bool:
    lo, hi = SUPPORTED_VLLM
    return lo <= parse_version(version) < hi


def check_vllm_version(version: str) -> None:
    """One-line ImportError naming the supported range for a release outside it (a newer one only warns when
    GRPO_VLLM_ALLOW_UNTESTED=1: its API has not been checked)."""
    v = parse_version(version)
    lo, hi = SUPPORTED_VLLM
    if v < lo:
        raise ImportError(f"rollout.engine='vllm' needs {supported_range()} (found vllm {version}: it has no "
                          f"logprobs_mode to return logprobs under grpo_core's convention); {GPU_EXTRA}")
    if v >= hi:
        if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
            logger.warning("vllm %s is newer than the releases grpo_core's vLLM adapter was checked against (%s)",
                           version, supported_range())
            return
        raise ImportError(f"rollout.engine='vllm' needs {supported_range()} (found vllm {version}, whose API "
                          f"grpo_core has not been checked against; set {ALLOW_UNTESTED_ENV}=1 to try it anyway); "
                          f"{GPU_EXTRA}")


# ----------------------------------------------------------------------------------------------- the API used
def logprobs_mode_value(name: str, version: str):
    """ModelConfig.logprobs_mode as this release types it: a `vllm.config.LogprobsMode` Enum member in 0.10.x;
    from 0.11 a string Literal (`vllm.config.model.LogprobsMode`, no longer exported by vllm.config)."""
    if parse_version(version) < (0, 11, 0):
        from vllm.config import LogprobsMode

        return LogprobsMode(name)
    return name


def llm_kwargs(version: str, *, model: str, dtype: str, gpu_memory_utilization: float, tensor_parallel_size: int,
               sleep_mode: bool, seed: int, logprobs_mode: str, max_model_len: int | None) -> dict:
    """`vllm.LLM(**kwargs)` for a colocated, in-process engine (same names in every supported release)."""
    kwargs = dict(
        model=str(model), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher",
        enable_sleep_mode=bool(sleep_mode), seed=int(seed), logprobs_mode=logprobs_mode_value(logprobs_mode, version),
        generation_config="vllm",  # sampling comes only from our SamplingParams, never the model's defaults
        enable_prefix_caching=True,  # the n samples of a prompt share its prefill
    )
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    return kwargs


def sampling_kwargs(*, temperature: float, top_p: float, top_k: int, max_tokens: int, stop: list[str] | None,
                    stop_token_ids: list[int], seed: int) -> dict:
    """`vllm.SamplingParams(**kwargs)` of one sample with its sampled token's logprob."""
    return dict(n=1, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=stop,
                stop_token_ids=stop_token_ids, ignore_eos=True, include_stop_str_in_output=False,
                skip_special_tokens=True, seed=seed, logprobs=0)


def worker_model(worker):
    """The live nn.Module inside a vLLM worker (Worker.get_model in every supported release)."""
    return worker.get_model()


def load_into_model(worker, weights) -> list[str] | None:
    """Runs inside vLLM's worker (in-process): load (HF name, tensor) pairs into the live model; returns the
    names loaded (None when the model's loader does not say)."""
    loaded = worker_model(worker).load_weights(weights)
    return None if loaded is None else sorted(loaded)


def model_param_names(worker) -> list[str]:
    return [name for name, _ in worker_model(worker).named_parameters()]


def load_weights(llm, bucket) -> list[str] | None:
    """One bucket into this rank's model (worker 0 of the in-process executor); returns names loaded."""
    return llm.collective_rpc(load_into_model, args=(bucket,))[0]


def param_names(llm) -> list[str]:
    return llm.collective_rpc(model_param_names)[0]


def sleep(llm) -> None:
    """Level 2: weights and KV cache discarded (the next sync re-sends the weights; nothing goes to CPU)."""
    llm.sleep(level=2)


def wake_up(llm, tags: list[str] | None = None) -> None:
    """Re-map the given memory pools ("weights", "kv_cache"; None = all). From 0.31 the engine resumes
    scheduling only once fully awake (0.32+ return whether it is); older releases return None."""
    if tags is None:
        llm.wake_up()
    else:
        llm.wake_up(tags=tags)


def max_model_len(llm) -> int:
    return int(llm.llm_engine.model_config.max_model_len)


def token_logprobs(completion, token_ids: list[int]) -> list[float]:
    """The sampled tokens' logprobs: `logprobs[i][token].logprob` for a list of dicts (all releases) and for
    FlatLogprobs (0.11+, indexes the same way)."""
    lps = completion.logprobs
    if lps is None or len(lps) < len(token_ids):
        raise RuntimeError("vLLM returned no per-token logprobs (SamplingParams.logprobs=0 was ignored)")
    return [float(lps[i][t].logprob) for i, t in enumerate(token_ids)]


def tp_group():
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group()


def tokens_prompt(token_ids: list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=token_ids)


# ----------------------------------------------------------------------------------------------- declared needs
@dataclass(frozen=True)
class ApiNeed:
    """One vLLM name the adapter relies on, as the engine reaches it.

    symbol: public dotted path (`vllm.LLM.__init__`, `vllm.SamplingParams`, `vllm.config.LogprobsMode`).
    kind: "params" (a callable's parameters; LLM's **kwargs count through the class they are forwarded to),
        "fields" (a class's annotated fields, bases included), "values" (a Literal alias's or Enum's strings),
        "attrs" (`self.X = ...` assigned in a method), "mentions" (string constants used in a class or
        function), "exists".
    releases: (first, first-not) versions it applies to; None = the whole range.
    """

    symbol: str
    kind: str = "exists"
    names: tuple[str, ...] = ()
    why: str = ""
    releases: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None


_LLM_ARGS = ("model", "dtype", "gpu_memory_utilization", "tensor_parallel_size", "distributed_executor_backend",
             "enable_sleep_mode", "seed", "logprobs_mode", "generation_config", "enable_prefix_caching",
             "max_model_len", "enforce_eager")
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "max_tokens", "stop", "stop_token_ids", "ignore_eos",
                    "include_stop_str_in_output", "skip_special_tokens", "seed", "logprobs")

API_NEEDS: tuple[ApiNeed, ...] = (
    ApiNeed("vllm.LLM.__init__", "params", _LLM_ARGS, "engine construction (llm_kwargs; enforce_eager in tests)"),
    ApiNeed("vllm.LLM.__init__", "attrs", ("llm_engine",), "max_model_len via llm.llm_engine.model_config"),
    ApiNeed("vllm.config.ModelConfig", "fields", ("max_model_len", "logprobs_mode", "enable_sleep_mode"),
            "engine limits and modes"),
    ApiNeed("vllm.config.LogprobsMode", "values", ("raw_logprobs", "processed_logprobs"),
            "logprobs under grpo_core's convention (an Enum: logprobs_mode_value)", ((0, 10, 0), (0, 11, 0))),
    ApiNeed("vllm.config.model.LogprobsMode", "values", ("raw_logprobs", "processed_logprobs"),
            "logprobs under grpo_core's convention (a Literal: logprobs_mode_value)", ((0, 11, 0), (1, 0, 0))),
    ApiNeed("vllm.config.parallel.DistributedExecutorBackend", "values", ("external_launcher",),
            "one in-process engine per trainer rank"),
    ApiNeed("vllm.SamplingParams", "fields", _SAMPLING_FIELDS, "per-sample request (sampling_kwargs)"),
    ApiNeed("vllm.inputs.TokensPrompt", "fields", ("prompt_token_ids",), "token-id prompts"),
    ApiNeed("vllm.LLM.generate", "params", ("prompts", "sampling_params", "use_tqdm"), "generation"),
    ApiNeed("vllm.outputs.RequestOutput.__init__", "attrs", ("outputs",), "per-request results"),
    ApiNeed("vllm.outputs.CompletionOutput", "fields", ("token_ids", "logprobs", "finish_reason", "text"),
            "sampled tokens, logprobs, finish reason"),
    ApiNeed("vllm.logprobs.Logprob", "fields", ("logprob",), "per-token logprob value"),
    ApiNeed("vllm.LLM.collective_rpc", "params", ("method", "timeout", "args", "kwargs"),
            "weight loading in buckets on this rank's worker"),
    ApiNeed("vllm.v1.executor.abstract.ExecutorWithExternalLauncher.collective_rpc", "params",
            ("method", "timeout", "args", "kwargs"), "external_launcher runs the engine in this process"),
    ApiNeed("vllm.executor.uniproc_executor.WorkerWrapperBase.__getattr__", "exists", (),
            "collective_rpc's fn gets the wrapper, which hands get_model on to the Worker", ((0, 10, 0), (0, 11, 0))),
    ApiNeed("vllm.v1.executor.uniproc_executor.WorkerWrapperBase.__getattr__", "exists", (),
            "collective_rpc's fn gets the wrapper, which hands get_model on to the Worker", ((0, 11, 0), (1, 0, 0))),
    ApiNeed("vllm.v1.worker.gpu_worker.Worker.get_model", "exists", (), "the live model inside the worker"),
    ApiNeed("vllm.model_executor.models.qwen2.Qwen2ForCausalLM.load_weights", "params", ("weights",),
            "HF-name weight loader (qwen2)"),
    ApiNeed("vllm.model_executor.models.qwen3.Qwen3ForCausalLM.load_weights", "params", ("weights",),
            "HF-name weight loader (qwen3)"),
    ApiNeed("vllm.model_executor.models.llama.LlamaForCausalLM.load_weights", "params", ("weights",),
            "HF-name weight loader (llama)"),
    ApiNeed("vllm.LLM.sleep", "params", ("level",), "level-2 sleep while the trainer updates"),
    ApiNeed("vllm.LLM.wake_up", "params", ("tags",), "wake weights, sync, then wake the KV cache"),
    ApiNeed("vllm.v1.worker.gpu_worker.Worker", "mentions", ("weights", "kv_cache"),
            "the memory-pool tags wake_up(tags=...) takes"),
    ApiNeed("vllm.LLM.reset_prefix_cache", "exists", (), "drop KV of the old weights after a sync"),
    ApiNeed("vllm.LLM.get_tokenizer", "exists", (), "eos when no grpo_core tokenizer is given"),
    ApiNeed("vllm.distributed.parallel_state.get_tp_group", "exists", (), "prompt exchange inside a TP group"),
    ApiNeed("vllm.distributed.parallel_state.GroupCoordinator.__init__", "attrs",
            ("world_size", "rank_in_group", "cpu_group"), "prompt exchange inside a TP group"),
)


def api_needs(version: str) -> list[ApiNeed]:
    """The needs that apply to this release."""
    v = parse_version(version)
    return [n for n in API_NEEDS if n.releases is None or n.releases[0] <= v < n.releases[1]]


def api_used(version: str) -> str:
    """One line for the result table: how the adapter talks to this release."""
    mode = "LogprobsMode enum" if parse_version(version) < (0, 11, 0) else "logprobs_mode str"
    return f"{mode}; collective_rpc + load_weights per bucket; sleep(level=2), wake_up(tags)"
