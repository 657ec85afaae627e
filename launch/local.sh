#!/usr/bin/env bash
# One node, N peers: one process per peer on this machine (a laptop, one GPU, or an 8-GPU node).
#
#   launch/local.sh N [--config FILE] [key=value ...]          # N peers
#   REPLICAS=4 launch/local.sh 2                               # 2 peers x 4 replicas (an 8-GPU node)
#   REPLICAS=[1,7] launch/local.sh 2 model=[resnet32,wrn28_10] batch_size=56   # 1 + 7 processes
#
# With no --config, CONFIG (default configs/quickstart.yaml) is used. The quick start trains on the shared
# CIFAR-10 subset when it is there (DML_SHARED_DATA); otherwise on a 5,000-image subset of torchvision's
# CIFAR-10, downloaded into data/ (train_subset=5000). Placement is automatic: one GPU per peer with NCCL,
# peers sharing GPUs round-robin with gloo when N > GPUs, CPU with gloo when there is none.
#
# Variables:
#   CONFIG        YAML config when no --config is given (default: configs/quickstart.yaml of this checkout)
#   DML_SHARED_DATA  the shared subset for the quick start (default: ../shared/data/cifar10-small next to
#                 this checkout)
#   REPLICAS      data-parallel replicas per peer: N peers x REPLICAS processes (default: 1), or a list
#                 with one count per peer, [1,7]: their sum of processes
#   MAX_RESTARTS  torchrun --max-restarts: restart the group after a worker dies; the trainer resumes
#                 from <exp>_latest.pth by itself (default: 0)
#   PYTHON        interpreter that has dml_dist installed (default: python)
#   TORCHRUN_ARGS extra torchrun arguments, e.g. "--log-dir /tmp/tr" (default: none)
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 N [--config FILE] [key=value ...]   (N = number of peers)" >&2
    exit 2
fi
peers=$1
shift
replicas=${REPLICAS:-1}
if [[ $replicas == \[* ]]; then  # one count per peer: as many processes as their sum
    IFS=, read -r -a counts <<< "${replicas//[][ ]/}"
    nproc=0
    for c in "${counts[@]}"; do nproc=$((nproc + c)); done
elif [[ $replicas == auto ]]; then  # one machine: one replica per peer (auto is for elastic multi-node jobs)
    nproc=$peers
else
    nproc=$((peers * replicas))
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
config_args=()
if [[ " $* " != *" --config "* ]]; then
    config_args=(--config "${CONFIG:-$repo/configs/quickstart.yaml}")
    shared=${DML_SHARED_DATA:-$repo/../shared/data/cifar10-small}
    if [[ -z "${CONFIG:-}" && -d "$shared" ]]; then
        config_args+=(data_dir="$shared")
    elif [[ -z "${CONFIG:-}" ]]; then
        echo "local.sh: no shared subset at $shared; using a 5,000-image subset of CIFAR-10 in data/ (downloaded when missing)" >&2
        config_args+=(dataset=cifar10 data_dir=data train_subset=5000)
    fi
fi
# Restarted gloo workers must not read dead workers' addresses from a shared store (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of words on purpose
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    --max-restarts="${MAX_RESTARTS:-0}" ${TORCHRUN_ARGS:-} \
    -m dml_dist.train "${config_args[@]}" model_num="$peers" replicas="$replicas" "$@"
