#!/usr/bin/env bash
# The deepspeed launcher.
#   Several nodes: a hostfile (lines like "node0 slots=8") and passwordless ssh between the nodes.
#   One node: no ssh needed. Either a one-line hostfile, or no HOSTFILE at all (then NPROC_PER_NODE processes,
#   default: the visible GPUs, else 1) on this machine, rendezvous at 127.0.0.1 (MASTER_ADDR/MASTER_PORT
#   override it).
# Usage: [HOSTFILE=hostfile] [NPROC_PER_NODE=N] launch/deepspeed_hostfile.sh CONFIG [--set key=value ...] [--resume auto]
set -euo pipefail
tmp_hostfile=""
cleanup() { [[ -n "$tmp_hostfile" ]] && rm -f "$tmp_hostfile"; return 0; }
trap cleanup EXIT

if [[ -z "${HOSTFILE:-}" ]]; then
  if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || NPROC_PER_NODE=1
  fi
  tmp_hostfile=$(mktemp "${TMPDIR:-/tmp}/grpo-hostfile.XXXXXX")
  echo "localhost slots=${NPROC_PER_NODE}" > "$tmp_hostfile"
  HOSTFILE="$tmp_hostfile"
fi
[[ -f "$HOSTFILE" ]] || { echo "error: HOSTFILE '$HOSTFILE' does not exist" >&2; exit 2; }

# Hosts = non-empty, non-comment lines.
hosts=$( { grep -v '^[[:space:]]*\(#\|$\)' "$HOSTFILE" || true; } | wc -l)
if [[ "$hosts" -eq 0 ]]; then
  echo "error: HOSTFILE '$HOSTFILE' lists no hosts (lines like: node0 slots=8)" >&2; exit 2
fi
extra=()
if [[ "$hosts" -eq 1 ]]; then
  # One node: deepspeed would still ssh to it to check reachability and to find its address; skip both.
  extra=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
fi
[[ -n "${MASTER_PORT:-}" ]] && extra+=(--master_port "$MASTER_PORT")
# Not exec: the EXIT trap removes a temporary hostfile when the run ends.
deepspeed --hostfile "$HOSTFILE" "${extra[@]}" --module grpo_core train "$@"
