#!/usr/bin/env bash
# One node, N peers: one process per peer on this machine (a laptop, one GPU, or an 8-GPU node).
#
#   launch/local.sh N [--config FILE] [key=value ...]
#
# With no --config, CONFIG (default configs/quickstart.yaml) is used. Placement is automatic: one GPU per
# peer with NCCL, peers sharing GPUs round-robin with gloo when N > GPUs, CPU with gloo when there is none.
#
# Variables:
#   CONFIG        YAML config when no --config is given (default: configs/quickstart.yaml of this checkout)
#   MAX_RESTARTS  torchrun --max-restarts: restart the group after a worker dies; the trainer resumes
#                 from <exp>_latest.pth by itself (default: 0)
#   PYTHON        interpreter that has dml_dist installed (default: python)
#   TORCHRUN_ARGS extra torchrun arguments, e.g. "--log-dir /tmp/tr" (default: none)
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 N [--config FILE] [key=value ...]   (N = number of peers)" >&2
    exit 2
fi
nproc=$1
shift
config_args=()
if [[ " $* " != *" --config "* ]]; then
    config_args=(--config "${CONFIG:-$(dirname "$0")/../configs/quickstart.yaml}")
fi
# Restarted gloo workers must not read dead workers' addresses from a shared store (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of words on purpose
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    --max-restarts="${MAX_RESTARTS:-0}" ${TORCHRUN_ARGS:-} \
    -m dml_dist.train "${config_args[@]}" "$@"
