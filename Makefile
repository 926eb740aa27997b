# grpo-core developer commands. `make install` on a fresh machine, `make demo` for the CPU RL run, `make test`.
PY ?= python3
export DS_BUILD_OPS ?= 0

.PHONY: install test smoke test-gpu bench-gpu demo bench lint

# torch: an existing install (e.g. a cluster's CUDA build) is kept; otherwise the CPU wheel 2.13.0.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"

# CPU tests run the Triton kernels in the interpreter; GPU-marked tests are skipped without CUDA.
test:
	TRITON_INTERPRET=$${TRITON_INTERPRET-1} $(PY) -m pytest -q -m "not gpu" tests

# grpo-core as a user has it: train / eval / transformers loading the export, from outside the checkout and from a
# wheel in a fresh venv (CI runs it after `make test`).
smoke:
	PY=$(PY) bash .ci/smoke_installed.sh

test-gpu:
	$(PY) -m pytest -q -m gpu tests

# On a CUDA machine: the kernel benchmarks (JSON + PNG into benchmarks/results/, GPU and versions named).
bench-gpu:
	$(PY) -m grpo_kernels.compile_check --arch 90 80
	$(PY) benchmarks/bench_logprob_entropy.py
	$(PY) benchmarks/bench_policy_loss.py

demo:
	$(PY) -m grpo_core train configs/demo_cpu.yaml

bench:
	$(PY) benchmarks/run_cpu_benchmarks.py

lint:
	$(PY) -m ruff check grpo_core kernels launch benchmarks tests
