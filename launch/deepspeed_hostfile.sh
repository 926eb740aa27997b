#!/usr/bin/env bash
# The deepspeed launcher over a hostfile (lines like "node0 slots=8"); passwordless ssh between nodes.
# Usage: HOSTFILE=hostfile launch/deepspeed_hostfile.sh CONFIG [--set key=value ...] [--resume auto]
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE (lines like: node0 slots=8)}"
exec deepspeed --hostfile "$HOSTFILE" --module grpo_core train "$@"
