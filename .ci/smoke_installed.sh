#!/usr/bin/env bash
# grpo-core as a user has it, outside the checkout: in the environment `make install` made (the newest transformers
# with Hugging Face's `kernels` beside it), then from a wheel installed into a fresh venv. Each pass trains the demo
# recipe for a few steps, evaluates the checkpoint, and loads the export with transformers in the same interpreter
# that imported grpo-core (logits compared).
set -euo pipefail
checkout="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PY:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset TRITON_INTERPRET  # as a user runs it: no Triton interpreter
FEW=(--set trainer.max_steps=2 --set warm_start.steps=20 --set warm_start.target_accuracy=0 --set data.synthetic_train_size=200
     --set data.synthetic_eval_size=16 --set trainer.eval_every=0 --set logging.progress_bar=false --set logging.plot=false)

run_pass() {  # $1 = python of the environment, $2 = label, $3 = recipe argument
  local py=$1 label=$2 recipe=$3 dir="$work/$2"
  mkdir -p "$dir" && cd "$dir"
  echo "== $label: $(command -v "$py") from $dir"
  "$py" - "$checkout" <<'PY'
import grpo_core, grpo_kernels, kernels
print("grpo_core:", grpo_core.__file__)
print("grpo_kernels:", grpo_kernels.__file__)
from kernels import get_kernel  # Hugging Face's kernel hub package, untouched by grpo-core
print("kernels (Hugging Face):", kernels.__file__)
assert "site-packages" in kernels.__file__, kernels.__file__
PY
  local grpo
  grpo=$("$py" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "grpo"))')
  "$grpo" train "$recipe" --set trainer.output_dir=run_cli "${FEW[@]}"
  "$py" -m grpo_core train "$recipe" --set trainer.output_dir=run_module "${FEW[@]}"
  local hf="run_cli/checkpoints/step_000002/hf"
  "$grpo" eval "$hf" run_cli/data/test.parquet --k 1 2 --max-prompts 8 --max-new-tokens 32 --out eval_out
  test -s eval_out/eval.json
  "$py" - "$hf" <<'PY'
import sys
import torch
import grpo_core  # noqa: F401  (imported first, as a user who trains and then loads the result would)
from grpo_core.model import CausalLM
import transformers
from kernels import get_kernel  # noqa: F401
hf = sys.argv[1]
ours = CausalLM.from_pretrained(hf, dtype=torch.float32).eval()
theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
vocab = theirs.config.vocab_size
ids = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a = ours.lm_head(ours(ids))
    b = theirs(ids).logits
diff = (a - b).abs().max().item()
assert diff <= 1e-5, f"grpo-core and transformers logits differ by {diff:.3g}"
print(f"transformers {transformers.__version__} loads the export: logits max |diff| {diff:.2e}")
PY
  cd "$checkout"
}

# 1. The environment `make install` made, from a directory outside the checkout; the recipe by path.
run_pass "$PY" installed "$checkout/configs/demo_cpu.yaml"

# 2. A wheel in a fresh venv (dependencies from the system site, grpo-core itself only from the wheel); the recipe
#    by name, shipped as package data.
"$PY" -m pip wheel -q --no-deps "$checkout" -w "$work/wheel"
"$PY" -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --ignore-installed "$work"/wheel/grpo_core-*.whl
(cd "$work" && "$work/venv/bin/python" - <<PY
import grpo_core, grpo_kernels
for m in (grpo_core, grpo_kernels):
    assert m.__file__.startswith("$work/venv/"), f"{m.__name__} imported from {m.__file__}, not from the wheel"
PY
)
run_pass "$work/venv/bin/python" wheel demo_cpu
echo "installed smoke test: passed"
