#!/usr/bin/env bash
# Self-check for a GPU machine (a minute or two): trains a few steps on a generated image folder through
#   1. the NCCL path: one GPU per peer (2 peers if there are 2+ GPUs, else 1),
#   2. the shared-GPU path: 2 peers on GPU 0 with gloo, logits staged through host memory,
#   3. both with bf16 autocast (amp=auto resolves to bf16 on GPUs that support it),
# then prints one line: "gpu_check: PASS ..." or "gpu_check: FAIL ..." (exit 0 / 1).
#
#   launch/gpu_check.sh
#
# Variables:
#   PYTHON   interpreter that has dml_dist installed (default: python)
#   WORKDIR  scratch folder for data, logs and checkpoints (default: a new temp folder)
set -uo pipefail

py=${PYTHON:-python}
work=${WORKDIR:-$(mktemp -d)}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ "$gpus" -lt 1 ]]; then
    echo "gpu_check: FAIL no GPU visible to torch (torch.cuda.device_count() == 0)"
    exit 1
fi
"$py" - "$work/data" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split, n in (("train", 64), ("val", 16)):
    for c in range(4):
        d = Path(sys.argv[1]) / split / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(40 + 50 * c + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
PY

verdicts=()
status=0
check() {  # name nproc [env...]
    local name=$1 nproc=$2
    shift 2
    if env "$@" "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m dml_dist.train \
        data_dir="$work/data" model=resnet20 epochs=1 batch_size=32 num_workers=2 progress_bar=false \
        save_dir="$work/$name/ckpt" log_dir="$work/$name/logs" experiment_name="$name" \
        >"$work/$name.log" 2>&1; then
        local info
        info=$("$py" -c 'import json, sys; s = json.load(open(sys.argv[1]))
print("amp=%s acc=%s" % (s["config"]["amp"], ["%.2f" % a for a in s["best_accuracies"]]))' \
            "$work/$name/logs/${name}_summary.json")
        local backend
        backend=$(grep -o "backend [a-z]*" "$work/$name/logs/$name.log" | sort -u | tr '\n' ' ')
        verdicts+=("$name: ok ($backend$info)")
    else
        verdicts+=("$name: FAILED (see $work/$name.log)")
        status=1
    fi
}
check nccl "$(( gpus >= 2 ? 2 : 1 ))"
check shared_gpu 2 CUDA_VISIBLE_DEVICES=0

if [[ $status -eq 0 ]]; then
    echo "gpu_check: PASS ${verdicts[*]}"
else
    echo "gpu_check: FAIL ${verdicts[*]}"
fi
exit $status
