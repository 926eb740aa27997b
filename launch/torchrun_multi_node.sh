#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node.
# Usage: NNODES=2 NPROC_PER_NODE=8 RDZV_HOST=node0 [RDZV_PORT=29400] [RUN_ID=grpo] \
#        launch/torchrun_multi_node.sh CONFIG [--set key=value ...] [--resume auto]
set -euo pipefail
: "${NNODES:?set NNODES}" "${NPROC_PER_NODE:?set NPROC_PER_NODE}" "${RDZV_HOST:?set RDZV_HOST}"
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "${RDZV_HOST}:${RDZV_PORT:-29400}" --rdzv_id "${RUN_ID:-grpo}" \
    -m grpo_core train "$@"
