#!/usr/bin/env bash
# Several nodes started by hand (or by any scheduler without SLURM): run this once on every node.
# torchrun's c10d rendezvous on RDZV_ENDPOINT groups the nodes; ranks are handed out at rendezvous,
# and rank 0 (wherever it lands) logs and writes checkpoints, so save_dir and log_dir must be on a
# filesystem every node sees if a restart may move rank 0 to another node.
#
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node0:29500 launch/multinode.sh --config configs/cifar100_resnet32.yaml
#
# Variables:
#   NNODES          number of nodes (required); "MIN:MAX" for an elastic range
#   NPROC_PER_NODE  processes per node (default: 1); the cohort has NNODES * NPROC_PER_NODE / REPLICAS peers
#   REPLICAS        data-parallel replicas per peer (default: 1), or auto (the world size / model_num: an elastic
#                   NNODES=1:2 job that loses a node goes on with fewer); rank_order places them (docs/data.md)
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node (required), e.g. the first node
#   RDZV_ID         job id shared by all nodes of one job (default: dml-dist)
#   NODE_RANK       fixes this node's rank (optional; without it ranks follow arrival order)
#   MAX_RESTARTS    torchrun --max-restarts (default: 3); restarted workers resume from <exp>_latest.pth
#   CONFIG          YAML config when no --config is given (default: configs/cifar10_resnet32.yaml of this checkout)
#   PYTHON          interpreter that has dml_dist installed (default: python)
#   TORCHRUN_ARGS   extra torchrun arguments (default: none)
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to host:port of the rendezvous (e.g. the first node:29500)}"
nproc=${NPROC_PER_NODE:-1}
config_args=()
if [[ " $* " != *" --config "* ]]; then
    config_args=(--config "${CONFIG:-$(dirname "$0")/../configs/cifar10_resnet32.yaml}")
fi
node_rank_args=()
if [[ -n "${NODE_RANK:-}" ]]; then
    node_rank_args=(--node_rank="$NODE_RANK")
fi
# Restarted gloo workers must not read dead workers' addresses from a shared store (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of words on purpose
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-dml-dist}" \
    "${node_rank_args[@]}" --max-restarts="${MAX_RESTARTS:-3}" ${TORCHRUN_ARGS:-} \
    -m dml_dist.train "${config_args[@]}" replicas="${REPLICAS:-1}" "$@"
