"""Import-level checks of the vLLM adapter against the installed vLLM (skipped when vLLM is not installed).

vLLM 0.32.0 imports on CPU torch 2.13 once its pure-Python dependencies are installed (measured in a
separate venv: `pip install --no-deps vllm==0.32.0` plus its METADATA requirements minus torch/torchaudio/
torchvision and the CUDA-only wheels; `import vllm`, `vllm.LLM`, the worker and model modules all import,
only `vllm._C` is missing). There the adapter's needs are checked with `inspect` (the second route next to
the AST check), and the objects the engine builds are built for real: SamplingParams, EngineArgs (what
`LLM(**kwargs)` turns the kwargs into), TokensPrompt, and the sampled-token logprobs read from both of
vLLM's logprob containers. No GPU, no model.
"""
from __future__ import annotations

import importlib.util
import types

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

from grpo_core.rollout import vllm_compat as compat  # noqa: E402


@pytest.fixture(scope="module")
def vllm():
    try:
        import vllm as module

        module.LLM, module.SamplingParams  # noqa: B018 (lazy exports: import them now)
    except Exception as e:  # a CUDA-only build that does not import here
        pytest.skip(f"vllm does not import here: {type(e).__name__}: {e}")
    if not compat.is_supported(module.__version__):
        pytest.skip(f"vllm {module.__version__} is outside {compat.supported_range()}")
    return module


def test_needs_by_inspect(vllm):
    from benchmarks import check_vllm_api as check

    res = check.check_imported()
    assert res.release == vllm.__version__ and res.checked == len(compat.api_needs(vllm.__version__))
    assert res.ok, res.missing


def test_real_sampling_params_and_engine_args(vllm):
    sp = vllm.SamplingParams(**compat.sampling_kwargs(temperature=0.7, top_p=0.9, top_k=20, max_tokens=5, stop=["\n\n"],
                                                     stop_token_ids=[2], seed=123))
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.seed, sp.logprobs) == (1, 0.7, 0.9, 20, 5, 123, 0)
    assert sp.ignore_eos and not sp.include_stop_str_in_output and sp.stop == ["\n\n"] and sp.stop_token_ids == [2]
    from vllm.engine.arg_utils import EngineArgs

    kwargs = compat.llm_kwargs(vllm.__version__, model="/unused", dtype="bfloat16", gpu_memory_utilization=0.4,
                               tensor_parallel_size=1, sleep_mode=True, seed=5, logprobs_mode="processed_logprobs",
                               max_model_len=256)
    args = EngineArgs(**kwargs)  # LLM(**kwargs) passes these on to EngineArgs: an unknown name fails here
    assert args.distributed_executor_backend == "external_launcher" and args.enable_sleep_mode
    assert args.generation_config == "vllm" and args.seed == 5 and args.max_model_len == 256
    mode = args.logprobs_mode
    assert getattr(mode, "value", mode) == "processed_logprobs"


def test_tokens_prompt_and_logprob_containers(vllm):
    assert compat.tokens_prompt([3, 4, 5])["prompt_token_ids"] == [3, 4, 5]
    from vllm import logprobs as lp_mod

    if not hasattr(lp_mod, "create_sample_logprobs"):
        pytest.skip(f"vllm {vllm.__version__} has no create_sample_logprobs helper to build the containers")
    tokens, values = [7, 3, 9], [-0.25, -1.5, -0.125]
    for flat in (False, True):
        container = lp_mod.create_sample_logprobs(flat)
        for t, v in zip(tokens, values):
            lp_mod.append_logprobs_for_next_position(container, [t], [v], [None], 1, 0)
        got = compat.token_logprobs(types.SimpleNamespace(logprobs=container), tokens)
        assert got == values, (flat, got)
