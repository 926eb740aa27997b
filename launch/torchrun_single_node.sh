#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes over gloo when there is no GPU).
# Usage: launch/torchrun_single_node.sh NPROC CONFIG [--set key=value ...] [--resume auto]
set -euo pipefail
nproc=${1:?usage: $0 NPROC CONFIG [args...]}; shift
exec torchrun --standalone --nproc_per_node "$nproc" -m grpo_core train "$@"
