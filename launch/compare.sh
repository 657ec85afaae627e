#!/usr/bin/env bash
# DML against independent training (kl_weight=0), SEEDS seeds each, then dml-compare's table and curves.
# This is how docs/results.md's measured comparison was made (2 CPU cores: about 12 minutes per run).
#
#   launch/compare.sh [key=value ...]      # extra overrides apply to every run
#
# Variables:
#   CONFIG   YAML config (default: configs/compare_cifar10small_resnet20.yaml of this checkout)
#   SEEDS    seeds to run (default: "1 2 3")
#   OUT      output folder for report.md and curves.png (default: report)
#   RUNS     folder for the runs' logs and checkpoints (default: runs/compare)
set -euo pipefail

config=${CONFIG:-$(dirname "$0")/../configs/compare_cifar10small_resnet20.yaml}
runs=${RUNS:-runs/compare}
summaries=()
for seed in ${SEEDS:-1 2 3}; do
    for kl in 1 0; do
        name="resnet20_kl${kl}_seed${seed}"
        if [[ ! -f "$runs/logs/${name}_summary.json" ]]; then
            dml-train --config "$config" seed="$seed" kl_weight="$kl" experiment_name="$name" \
                save_dir="$runs/checkpoints" log_dir="$runs/logs" progress_bar=false "$@"
        fi
        summaries+=("$runs/logs/${name}_summary.json")
    done
done
dml-compare "${summaries[@]}" --out "${OUT:-report}"
