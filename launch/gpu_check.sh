#!/usr/bin/env bash
# GPU acceptance run (about 5 minutes on one GPU (an estimate: it has not run on a GPU yet), never more than TOTAL_TIMEOUT): what CPU CI cannot see. Trains one short epoch on a
# generated image folder through
#   nccl1      NCCL in a world of one: real collectives (CPU fingerprints/meters over gloo, the exchange's
#              all-reduce of the softmax sums over NCCL)
#   nccl2      2 peers, one GPU each (only with 2+ GPUs), fp16 with a GradScaler, the all-reduce exchange
#   shared     2 peers sharing GPU 0 over gloo (the exchange's all-reduce staged through host memory), bf16
#   teacher    2 peers sharing GPU 0, the second a frozen teacher from the shared run's checkpoint (bf16, compiled)
#   compile_fp16  2 compiled peers sharing GPU 0: fp16, the all-reduce exchange, the KL warm-up
#   compile    compile=reduce-overhead (torch.compile with CUDA graphs, one rank: no DDP)
#   compile_ddp  the same over DDP, 1 peer x 2 replicas (only with 2+ GPUs): the default mode, as its log says
#   replicas   2 peers x 2 replicas: DDP + PyTorch's SyncBatchNorm over NCCL (only with 4+ GPUs)
#   layout     replicas=[1,2] (3+ GPUs): DDP for one peer only, the exchange over the world by batch rows
# (multi-rank all-gathers over NCCL: stream2 and replicas)
#   stream     the stream path with decode_device=cuda: batched nvJPEG on the GPU, RandomResizedCrop there,
#              on a generated ImageNet-shaped JPEG folder (then its images/s alone, data.probe)
#   stream2    the same with 2 ranks decoding cooperatively: the uint8 node all-gather over NCCL (2+ GPUs),
#              or through host memory for 2 peers sharing GPU 0 (1 GPU)
# and checks that the device data path gave byte-identical batches on every rank (fingerprints of every
# step), then times dml-bench (world of one) for ResNet-20/32/56. It ends with one line:
#   gpu_check: PASS <figures>        or        gpu_check: FAIL <reason>
# and exits 0 / 1.
#
#   launch/gpu_check.sh
#
# Variables:
#   PYTHON   interpreter that has dml_dist installed (default: python)
#   WORKDIR  scratch folder for data, logs and checkpoints (default: a new temp folder)
#   STEP_TIMEOUT  seconds allowed per run (default: 90)
#   TOTAL_TIMEOUT seconds for the whole check: later runs get what is left, so it ends in time even when
#                 a run hangs (default: 540)
#   CUDA_VISIBLE_DEVICES  kept as a scheduler set it; the shared-GPU runs use its first device
set -uo pipefail

py=${PYTHON:-python}
work=${WORKDIR:-$(mktemp -d)}
limit=${STEP_TIMEOUT:-90}
deadline=$((SECONDS + ${TOTAL_TIMEOUT:-540}))
first_gpu=${CUDA_VISIBLE_DEVICES:-0}
first_gpu=${first_gpu%%,*}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 PYTHONUNBUFFERED=1
budget() {  # seconds for the next run: STEP_TIMEOUT, or what is left before the deadline (0: none left)
    local left=$((deadline - SECONDS))
    if ((left < limit)); then echo $((left > 0 ? left : 0)); else echo "$limit"; fi
}
run_within() {  # run_within CMD...: under the budget, killed 10 s after its time (torchrun's grace is 30 s)
    local t
    t=$(budget)
    if ((t < 10)); then return 124; fi
    timeout -k 10 "$t" "$@"
}
if ! command -v "$py" >/dev/null 2>&1; then
    echo "gpu_check: FAIL no Python interpreter '$py' (set PYTHON to the one that has dml_dist installed)"
    exit 1
fi
if ! err=$("$py" -c 'import torch, dml_dist' 2>&1); then
    echo "gpu_check: FAIL $py cannot import torch and dml_dist (pip install -e . with that interpreter): ${err##*$'\n'}"
    exit 1
fi
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [[ "$gpus" -lt 1 ]]; then
    echo "gpu_check: FAIL no GPU visible to torch (torch.cuda.device_count() == 0; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
    exit 1
fi
"$py" - "$work/data" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split, n in (("train", 256), ("val", 64)):
    for c in range(4):
        d = Path(sys.argv[1]) / split / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(40 + 50 * c + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
PY
"$py" "$(dirname "$0")/../benchmarks/make_imagenet_folder.py" "$work/jpeg" --train 1024 --val 128 --classes 4 \
    >/dev/null || { echo "gpu_check: FAIL could not write the JPEG folder"; exit 1; }
# Three files of train/ made odd (the count stays 1024, whole batches, so every epoch meets them): a CMYK JPEG
# and a PNG named .JPEG (the workers decode them: 2 per epoch), and a progressive JPEG (the header rule sends
# it to the batched nvJPEG call, which must take it).
"$py" - "$work/jpeg/train" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
cmyk, png, progressive = sorted(sorted(Path(sys.argv[1]).iterdir())[0].iterdir())[:3]
Image.new("CMYK", (480, 360), (10, 200, 30, 5)).save(cmyk, "JPEG")
Image.fromarray(np.full((360, 480, 3), 99, np.uint8)).save(png, "PNG")
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)).save(progressive, "JPEG", progressive=True)
PY

verdicts=()
status=0
check() {  # name nproc expected-backend(nccl|gloo) expected-amp "key=value ..." [ENV=value ...]
    local name=$1 nproc=$2 want_backend=$3 want_amp=$4 keys=$5
    shift 5
    mkdir -p "$work/$name/fp"
    # shellcheck disable=SC2086  # keys is a list of key=value words on purpose
    if run_within env "$@" DML_FINGERPRINT_DIR="$work/$name/fp" "$py" -m torch.distributed.run --standalone \
        --nproc_per_node="$nproc" -m dml_dist.train data_dir="$work/data" model=resnet20 epochs=1 \
        batch_size=128 augment=true consistency_check_every=1 progress_bar=false print_freq=4 \
        save_dir="$work/$name/ckpt" log_dir="$work/$name/logs" experiment_name="$name" $keys \
        >"$work/$name.log" 2>&1; then
        local info
        info=$("$py" - "$work/$name" "$name" "$want_backend" "$want_amp" <<'PY'
import json, sys
from pathlib import Path
w, name, want_backend, want_amp = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = json.loads((w / "logs" / f"{name}_summary.json").read_text())
fps = sorted((w / "fp").glob("fingerprints_rank*.txt"))
r = s["config"]["replicas"]
texts = {int(f.stem.split("rank")[1]): f.read_text() for f in fps}
log = (w / "logs" / f"{name}.log").read_text().splitlines()
# "placement: rank R (peer P, replica Q) ...": the ranks that hold the same rows are those of one replica index
slot = {int(l.split("rank ")[1].split(" ")[0]): int(l.split("replica ")[1].split(")")[0]) for l in log if "placement:" in l}
if isinstance(r, list):  # shares of different sizes: the trainer compared every chunk of rows at every step
    same = "checked-by-trainer" if len(texts) == sum(r) and texts[0].count("\n") >= 8 else False
else:
    by_replica = {}
    for k, t in texts.items():
        by_replica.setdefault(slot[k], []).append(t)
    # with 2+ ranks, at least one replica index held by 2+ ranks (2+ peers), else nothing was compared
    # one peer: each replica index holds one rank, so there is nothing to compare (its rows differ by design)
    same = (all(len(set(ts)) == 1 for ts in by_replica.values()) and texts[0].count("\n") >= 8
            and (len(texts) == 1 or s["config"]["model_num"] == 1 or max(map(len, by_replica.values())) >= 2))
group = [l.split(" group ")[1].split(" ")[0] for l in log if "placement:" in l][0]
applied = ("nccl" in group) == (want_backend == "nccl") and s["resolved"]["amp"] == want_amp
print(("" if same and applied else "MISMATCH ") + f"want backend={want_backend} amp={want_amp}: group={group} amp={s['resolved']['amp']} compile={s['resolved']['compile']} "
      f"ranks={len(fps)} batches-identical={same} acc={['%.2f' % a for a in s['best_accuracies']]}")
PY
) || info="MISMATCH the verdict script failed (see $work/$name.log)"
        if [[ "$info" != want* ]]; then
            verdicts+=("$name: FAILED batches differ between ranks, or backend/amp not as asked ($info)")
            status=1
        else
            verdicts+=("$name: ok ($info)")
        fi
    else
        verdicts+=("$name: FAILED ($(grep -m1 'dml-dist: error\|Error' "$work/$name.log" || echo "see $work/$name.log"))")
        status=1
    fi
}
check nccl1 1 nccl bf16 "amp=bf16 exchange=all_reduce"
if [[ "$gpus" -ge 2 ]]; then
    check nccl2 2 nccl fp16 "amp=fp16 exchange=all_reduce"
fi
if [[ "$gpus" -ge 4 ]]; then  # 2 peers x 2 replicas: the peers of each replica index must draw the same rows
    check replicas 4 nccl bf16 "model_num=2 replicas=2 sync_bn=true amp=bf16"
fi
check shared 2 gloo bf16 "amp=bf16 exchange=all_reduce" CUDA_VISIBLE_DEVICES="$first_gpu"
# a frozen teacher (inference_mode under autocast, no optimizer) from the shared run's peer 1, weighted; compiled:
# the loss compiles with its KL term against a peer and the weights
check teacher 2 gloo bf16 "amp=bf16 init_from=[null,$work/shared/ckpt/shared_model1_final.pth] frozen=[false,true] \
mutual_weights=[1,2] compile=true" CUDA_VISIBLE_DEVICES="$first_gpu"
# 2 compiled peers with fp16's GradScaler, the all-reduce's sums and the KL warm-up (a new weight every step)
check compile_fp16 2 gloo fp16 "amp=fp16 exchange=all_reduce kl_warmup_epochs=1 compile=true" CUDA_VISIBLE_DEVICES="$first_gpu"
for name in teacher compile_fp16; do  # each part compiled, and not once per step (past 8, dynamo runs it eager)
    parts=$(grep -oE "; of them batch transform [0-9]+, loss and meters [0-9]+" "$work/$name/logs/$name.log" 2>/dev/null | head -n 1)
    if [[ "$parts" =~ transform\ ([12]),\ loss\ and\ meters\ ([12])$ ]]; then
        verdicts+=("$name compiled parts: ok (${parts#; of them })")
    else
        verdicts+=("$name compiled parts: FAILED want 1 or 2 graphs each for the batch transform and the loss: got '${parts:-none}'")
        status=1
    fi
done
if [[ "$gpus" -ge 3 ]]; then
    check layout 3 nccl bf16 "model=[resnet20,resnet32] replicas=[1,2] amp=bf16"
fi
check compile 1 nccl bf16 "compile=reduce-overhead amp=bf16"
# and the compile report proves it: at least one graph, no graph break in ResNet-20's step, no CUDA-graph skip
# event counted by inductor, and graphs of the step's work around the model (augmentation with normalisation,
# the loss with the meters)
report=$(grep -oE "compile: [A-Za-z]+, [0-9]+ graph\(s\) compiled, [0-9]+ graph break\(s\) in the first epoch, [0-9]+ CUDA-graph skip\(s\); of them batch transform [0-9]+, loss and meters [0-9]+" \
    "$work/compile/logs/compile.log" 2>/dev/null | head -n 1)
if [[ "$report" =~ ^compile:\ OptimizedModule,\ ([0-9]+)\ graph.*,\ ([0-9]+)\ graph\ break.*,\ ([0-9]+)\ CUDA-graph\ skip.*batch\ transform\ ([0-9]+),\ loss\ and\ meters\ ([0-9]+)$ ]] \
    && [[ "${BASH_REMATCH[1]}" -ge 1 && "${BASH_REMATCH[2]}" -eq 0 && "${BASH_REMATCH[3]}" -eq 0 ]] \
    && [[ "${BASH_REMATCH[4]}" =~ ^[12]$ && "${BASH_REMATCH[5]}" =~ ^[12]$ ]] \
    && grep -qF "compile: peer 1: compile=reduce-overhead: CUDA graphs" "$work/compile/logs/compile.log"; then
    verdicts+=("compile report: ok ($report)")
else
    verdicts+=("compile report: FAILED want an OptimizedModule, >= 1 graph, 0 graph breaks, 0 CUDA-graph skips, 1 or 2 graphs each for the batch transform and the loss, mode reduce-overhead: got '${report:-none}'")
    status=1
fi
if [[ "$gpus" -ge 2 ]]; then  # the default mode over DDP: CUDA graphs are not used there, and the log says so
    check compile_ddp 2 nccl bf16 "model_num=1 replicas=2 compile=reduce-overhead amp=bf16"
    if grep -qF "compile: peer 1: reduce-overhead: CUDA graphs are not used over DDP (2 replicas); mode default instead" \
        "$work/compile_ddp/logs/compile_ddp.log" 2>/dev/null \
        && grep -qE "compile: OptimizedModule, [1-9][0-9]* graph\(s\) compiled" "$work/compile_ddp/logs/compile_ddp.log"; then
        verdicts+=("compile over DDP: ok (default mode, >= 1 graph)")
    else
        verdicts+=("compile over DDP: FAILED want the default-mode fallback line and >= 1 compiled graph")
        status=1
    fi
fi
stream_keys="data_dir=$work/jpeg loader=stream decode_device=cuda augment=rrc,flip image_size=128 amp=bf16"
check stream 1 nccl bf16 "$stream_keys num_workers=4"
if [[ "$gpus" -ge 2 ]]; then
    check stream2 2 nccl bf16 "$stream_keys num_workers=2"
else
    check stream2 2 gloo bf16 "$stream_keys num_workers=2" CUDA_VISIBLE_DEVICES="$first_gpu"
fi

# No host sync in a steady-state step (issue 22): DML_SYNC_CHECK=1 runs every step but the first two, the
# epoch's last and those of a batch check or a save under torch.cuda.set_sync_debug_mode("error"): a hidden
# .item() or blocking copy raises there. print_freq=4 puts the meters' reads (a snapshot, read one step later) in it.
for keys in "amp=bf16" "amp=fp16" "amp=bf16 loader=stream data_dir=$work/jpeg augment=rrc,flip image_size=64 num_workers=2" \
    "amp=bf16 compile=reduce-overhead kl_warmup_epochs=1"; do
    name="syncfree_${keys%% *}"; name=${name//=/}
    [[ "$keys" == *stream* ]] && name=syncfree_stream
    [[ "$keys" == *compile* ]] && name=syncfree_compile
    # shellcheck disable=SC2086  # keys is a list of key=value words on purpose
    if run_within env DML_SYNC_CHECK=1 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m dml_dist.train \
        data_dir="$work/data" model=resnet20 epochs=1 batch_size=64 augment=true consistency_check_every=0 \
        print_freq=4 progress_bar=false save_dir="$work/$name/ckpt" log_dir="$work/$name/logs" \
        experiment_name="$name" $keys >"$work/$name.log" 2>&1 \
        && grep -Eq "sync check: [1-9][0-9]* steady-state steps" "$work/$name.log"; then
        verdicts+=("$name: ok ($(grep -oE "sync check: [0-9]+ steady-state steps" "$work/$name.log" | head -n 1))")
    else
        verdicts+=("$name: FAILED a host sync in a steady-state step, or no step checked ($(grep -m1 -E 'synchroniz|dml-dist: error|Error' "$work/$name.log" || echo "see $work/$name.log"))")
        status=1
    fi
done

# The meters' snapshot (a print_freq boundary's read) holds the values of its step, not what the pinned buffer
# held before the copy landed: the stream is kept busy (torch.cuda._sleep) while the sums change behind it.
if run_within "$py" - >"$work/snapshot.log" 2>&1 <<'PY'
import torch
from dml_dist.meters import Meters
m = Meters("cuda")
stats, finite = torch.arange(1.0, 6.0, dtype=torch.float64, device="cuda"), torch.tensor(False, device="cuda")
torch.cuda.synchronize()
torch.cuda._sleep(500_000_000)  # ~0.2-0.5 s of GPU spin queued before the sums change
m.add(stats, finite)
snap = m.snapshot()
assert snap._copied is not None and not snap._copied.query(), "snapshot() waited for the device"
got = (snap.ready().sums.tolist(), bool(snap.bad))
assert got == ([1.0, 2.0, 3.0, 4.0, 5.0], True), got
print("snapshot ok")
PY
then
    verdicts+=("meters snapshot: ok")
else
    verdicts+=("meters snapshot: FAILED ($(tail -n 1 "$work/snapshot.log"))")
    status=1
fi

# The stream path's hand-over (decode_device=cpu): every share reaches the GPU from pinned memory,
# non-blocking (a count from the loader); every check above also ran the placement exchange through the store.
line=$(run_within "$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m dml_dist.tools.probe \
    data_dir="$work/jpeg" loader=stream augment=rrc,flip image_size=128 batch_size=64 num_workers=2 steps=0 \
    2>"$work/pinned.log" | tail -n 1)
pinned=$("$py" -c 'import json, sys; r = json.loads(sys.argv[1])["ranks"][0]; print(r["pinned_copies"], len(r["fingerprints"]))' "$line" 2>/dev/null)
read -r copies steps <<<"${pinned:-0 -1}"
if [[ "$copies" -gt 0 && "$copies" == "$steps" ]]; then
    verdicts+=("pinned: ok ($copies of $steps shares copied from pinned memory)")
else
    verdicts+=("pinned: FAILED ($copies pinned copies for $steps steps; see $work/pinned.log)")
    status=1
fi

bench=()
for model in resnet20 resnet32 resnet56; do
    line=$(run_within "$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m dml_dist.tools.bench \
        model="$model" batch_size=512 amp=bf16 steps=20 warmup=5 data_dir="$work/data" 2>"$work/bench_$model.log" | tail -n 1)
    ips=$("$py" -c 'import json, sys; r = json.loads(sys.argv[1]); print(r["images_per_s_per_peer"], r["loader"]["batched_images_per_s"])' "$line" 2>/dev/null)
    if [[ -n "$ips" ]]; then
        read -r step loader <<<"$ips"
        bench+=("$model ${step} img/s/peer (loader ${loader} img/s)")
    else
        bench+=("$model FAILED (see $work/bench_$model.log)")
        status=1
    fi
done

line=$(run_within "$py" -m torch.distributed.run --standalone --nproc_per_node=1 -m dml_dist.tools.probe \
    data_dir="$work/jpeg" loader=stream decode_device=cuda augment=rrc,flip image_size=224 batch_size=256 \
    num_workers=4 steps=0 hash=false 2>"$work/probe.log" | tail -n 1)
# nvJPEG must have decoded every image but the two odd files the workers decode (counts from the loader: the
# batched call's, not the absence of errors; the progressive JPEG among the batched ones)
ips=$("$py" -c 'import json, sys; r = json.loads(sys.argv[1])["ranks"][0]; d = r["device_decodes"]
print(r["images_per_s"], d.get("batched", 0), d.get("worker", 0), r["decoded"])' "$line" 2>/dev/null)
read -r ips batched in_worker decoded <<<"${ips:-}"
if [[ -n "$ips" && "$in_worker" == 2 && $((batched + in_worker)) == "$decoded" ]]; then
    bench+=("| stream nvJPEG 224px ${ips} img/s (batched nvJPEG ${batched}/${decoded}, workers ${in_worker})")
elif [[ -n "$ips" ]]; then
    bench+=("| stream nvJPEG: FAILED ${batched} batched + ${in_worker} in workers of ${decoded} decoded, want all with 2 in workers (see $work/probe.log)")
    status=1
else
    bench+=("| stream nvJPEG FAILED (see $work/probe.log)")
    status=1
fi

if [[ "$gpus" -lt 2 ]]; then
    echo "gpu_check: note: 1 GPU: multi-rank NCCL, DDP and SyncBatchNorm on CUDA were not run (they need 2+ GPUs)"
fi
if [[ $status -eq 0 ]]; then
    echo "gpu_check: PASS ${verdicts[*]} | bench bf16 batch 512: ${bench[*]}"
else
    echo "gpu_check: FAIL ${verdicts[*]} | bench: ${bench[*]}"
fi
exit $status
