#!/usr/bin/env bash
# A throwaway SLURM cluster on this machine, to run launch/slurm.sbatch for real without a cluster:
# munged, slurmctld and NODES slurmd (several slurmd on one host fake several nodes) in a temporary
# folder, on free localhost ports. It submits launch/slurm.sbatch for 2 peers and 3 short epochs on the
# shared CIFAR-10 subset, requeues the job (scontrol requeue) once the first epoch is saved, has another
# process take the first run's rendezvous port, waits for the requeued run to resume from the checkpoint and
# finish, checks the job's output, then cancels whatever job is left and stops only the daemons it started
# (by their PIDs). Every wait is bounded: at most about 11 minutes in all (about 30 s when it passes on an
# idle machine). Needs root and Debian's slurmctld, slurmd, slurm-client and munge.
#
#   launch/slurm_local.sh        # 1 node, 2 processes
#   launch/slurm_local.sh 2      # 2 fake nodes, 1 process each (the c10d rendezvous crosses "nodes")
#
# It ends with one line, `slurm_local: PASS ...` or `slurm_local: FAIL <reason>`, and exits 0 / 1.
# Variables: PYTHON (interpreter with dml_dist installed, default: python), DATA (default: the shared
# subset next to this checkout), KEEP=1 keeps the temporary folder.
set -uo pipefail

nodes=${1:-1}
procs=$((2 / nodes))  # processes per node: 2 peers in all
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
data=${DATA:-$repo/../shared/data/cifar10-small}
tmp=$(mktemp -d /tmp/dml-slurm.XXXXXX)
pids=()

fail() { echo "slurm_local: FAIL $*"; exit 1; }
cleanup() {
    if [[ -n "${job:-}" ]]; then  # the job's processes live under slurmstepd, not under our daemons
        scancel -f "$job" 2>/dev/null
        for _ in $(seq 50); do [[ -z "$(squeue -h -j "$job" 2>/dev/null)" ]] && break; sleep 0.2; done
    fi
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    sleep 1
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
    [[ "${KEEP:-0}" == 1 ]] || rm -rf "$tmp"
}
trap cleanup EXIT
for tool in munged slurmctld slurmd sbatch scontrol squeue scancel sinfo; do
    command -v "$tool" >/dev/null || fail "$tool not found: apt-get install slurmctld slurmd slurm-client munge"
done
[[ -d "$data/train" ]] || fail "no data at $data (set DATA to an image folder with train/)"
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

mkdir -p "$tmp"/{munge,state,log,spool,run}
chmod 700 "$tmp/munge"
dd if=/dev/urandom of="$tmp/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$tmp/munge/munge.key"
munged --force --key-file="$tmp/munge/munge.key" --socket="$tmp/munge/munge.socket" \
    --pid-file="$tmp/munge/munged.pid" --log-file="$tmp/log/munged.log" --seed-file="$tmp/munge/seed" \
    || fail "munged did not start (see $tmp/log/munged.log)"
pids+=("$(cat "$tmp/munge/munged.pid")")

cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys them; the host's CPUs do not
# Two fake nodes differ, as a cluster's may: node n has n x a third of the host's CPUs (1 and 2 on 2 cores, one
# more than the host has), so a step that gives every node the batch node's count shows in the ranks' threads.
node_cpus=("$cpus")
((nodes == 1)) || node_cpus=($((cpus / 3 > 0 ? cpus / 3 : 1)) $((2 * (cpus / 3 > 0 ? cpus / 3 : 1))))
conf="$tmp/slurm.conf"
{
    echo "ClusterName=dmllocal"
    echo "SlurmctldHost=localhost(127.0.0.1)"
    echo "SlurmctldPort=$(free_port)"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$tmp/munge/munge.socket"
    echo "CredType=cred/munge"
    echo "StateSaveLocation=$tmp/state"
    echo "SlurmdSpoolDir=$tmp/spool/%n"
    echo "SlurmctldPidFile=$tmp/run/slurmctld.pid"
    echo "SlurmdPidFile=$tmp/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$tmp/log/slurmctld.log"
    echo "SlurmdLogFile=$tmp/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "MpiDefault=none"
    echo "JobRequeue=1"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    for n in $(seq 1 "$nodes"); do
        echo "NodeName=node$n NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$(free_port) CPUs=${node_cpus[n - 1]} State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} >"$conf"
export SLURM_CONF="$conf"

slurmctld -f "$conf" || fail "slurmctld did not start (see $tmp/log/slurmctld.log)"
for _ in $(seq 50); do [[ -s "$tmp/run/slurmctld.pid" ]] && break; sleep 0.2; done
[[ -s "$tmp/run/slurmctld.pid" ]] && pids+=("$(cat "$tmp/run/slurmctld.pid")")
for n in $(seq 1 "$nodes"); do
    mkdir -p "$tmp/spool/node$n"
    slurmd -f "$conf" -N "node$n" || fail "slurmd node$n did not start (see $tmp/log/slurmd-node$n.log)"
    for _ in $(seq 50); do [[ -s "$tmp/run/slurmd-node$n.pid" ]] && break; sleep 0.2; done
    [[ -s "$tmp/run/slurmd-node$n.pid" ]] && pids+=("$(cat "$tmp/run/slurmd-node$n.pid")")
done
for _ in $(seq 100); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)
    [[ "$idle" -ge "$nodes" ]] && break
    sleep 0.3
done
[[ "$idle" -ge "$nodes" ]] || fail "the $nodes node(s) did not come up idle: $(sinfo -N 2>&1 | tr '\n' ' ')"

# The job: 2 peers in all, 3 short epochs, checkpoints and logs in the temporary folder (shared by the fake
# nodes, as a cluster's shared filesystem would be). Its first run cannot outrun the requeue: rank 1 stops itself
# (SIGSTOP, DML_FAULT) at the first step of epoch 2, after epoch 1's checkpoint, so the requeue always finds the job
# mid-run (SLURM continues and terminates the stopped rank); the requeued run (SLURM_RESTART_COUNT=1) is not stopped.
work="$tmp/work"
mkdir -p "$work"
epochs=3
job=$(cd "$work" && env -u RDZV_PORT -u SLURM_RESTART_COUNT NPROC_PER_NODE="$procs" MAX_RESTARTS=0 PYTHON="$py" \
    CONFIG="$repo/configs/quickstart.yaml" DML_FAULT="action=sigstop,rank=1,epoch=2,step=0" \
    sbatch --parsable --nodes="$nodes" --exclusive --time=10 --output="$work/slurm-%j.out" "$repo/launch/slurm.sbatch" \
    data_dir="$data" train_subset=256 image_size=16 epochs="$epochs" batch_size=32 save_dir="$work/ckpt" \
    log_dir="$work/logs" cache_dir="$work/cache" progress_bar=false print_freq=4) || fail "sbatch refused the job"
out="$work/slurm-$job.out"
# Requeue once the first epoch's checkpoint exists: the requeued run must resume from it.
for _ in $(seq 240); do
    grep -q "^epoch 1/$epochs" "$out" 2>/dev/null && break
    # the job ended (it failed): say so now; a failed squeue call (a busy slurmctld) is not an ended job
    if queued=$(squeue -h -j "$job" -t PENDING,CONFIGURING,RUNNING 2>/dev/null) && [[ -z "$queued" ]]; then break; fi
    sleep 0.5
done
grep -q "^epoch 1/$epochs" "$out" 2>/dev/null || fail "the job did not finish epoch 1: $(tail -n 5 "$out" 2>/dev/null | tr '\n' ' ')"
for _ in $(seq 100); do [[ -s "$work/ckpt/quickstart_latest.pth" ]] && break; sleep 0.2; done
scontrol requeue "$job" || fail "scontrol requeue $job failed"
# Another process takes the first run's rendezvous port before the rerun starts, as another job's store on the
# batch host would: the rerun must rendezvous on a port of its own (slurm.sbatch picks one free per run).
rdzv_port() {  # the port that run $1 of the job rendezvous on (slurm.sbatch prints it first)
    local line
    line=$(grep -oE "rendezvous $job\.$1 at [^ ]+" "$out" | head -n 1)
    echo "${line##*:}"
}
port0=$(rdzv_port 0)
[[ $port0 =~ ^[0-9]+$ ]] || fail "no rendezvous port for run $job.0 in the output: $(grep 'slurm.sbatch:' "$out" | tr '\n' ' ')"
"$py" -c '
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
for _ in range(1150):  # the first run'"'"'s store closes once SLURM has stopped it
    try:
        s.bind(("", int(sys.argv[1])))
        s.listen(16)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(1)
open(sys.argv[2], "w").close()
time.sleep(600)
' "$port0" "$tmp/port0-taken" &
holder=$!
pids+=("$holder")
for _ in $(seq 1200); do [[ -e "$tmp/port0-taken" ]] && break; kill -0 "$holder" 2>/dev/null || break; sleep 0.1; done
[[ -e "$tmp/port0-taken" ]] || fail "no process could take the first run's rendezvous port $port0 within 2 minutes of the requeue"
! grep -q "rendezvous $job\.1 at " "$out" || fail "the requeued run started before the first run's port $port0 was held"
# SLURM holds a requeued job for about two minutes (its begin time): once it is pending, start it now.
for _ in $(seq 150); do
    if scontrol show job "$job" 2>/dev/null | grep -q 'JobState=PENDING'; then
        scontrol update JobId="$job" StartTime=now && break
    fi
    sleep 0.2
done
# The rerun's rendezvous line comes before its agents start: it must name a port of its own.
for _ in $(seq 120); do grep -q "rendezvous $job\.1 at " "$out" 2>/dev/null && break; sleep 0.5; done
port1=$(rdzv_port 1)
[[ $port1 =~ ^[0-9]+$ ]] || fail "the requeued run printed no rendezvous line within a minute: $(tail -n 3 "$out" | tr '\n' ' ')"
[[ $port1 != "$port0" ]] || fail "the requeued run rendezvous on the first run's port $port0, which another process holds"
for _ in $(seq 480); do  # the requeued run: up to 4 minutes (2 epochs; slower on a loaded machine)
    state=$(scontrol show job "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    [[ "$state" =~ ^(PENDING|RUNNING|REQUEUED|CONFIGURING|COMPLETING|RESIZING|REQUEUE_HOLD)?$ ]] || break
    sleep 0.5
done
how="ended ${state:-with no state}"
[[ "${state:-}" =~ ^(PENDING|RUNNING|REQUEUED|CONFIGURING|COMPLETING|RESIZING|REQUEUE_HOLD)$ ]] && how="is still $state after 4 minutes"
[[ "${state:-}" == COMPLETED ]] || fail "job $job $how: $(grep -m 10 -E 'slurm.sbatch:|dml-dist: error|Error|srun: error|resumed from|^epoch [0-9]/' "$out" | tr '\n' ' ') | slurmctld: $(grep -E "JobId=$job" "$tmp/log/slurmctld.log" | tail -n 6 | tr '\n' ' ')"
runs=$(grep -c "placement: rank 0" "$out")
[[ "$runs" -ge 2 ]] || fail "the output holds $runs run(s): the requeue started no second run, or the first run's output was lost (KEEP=1 keeps $out)"
# Each run of the job has a rendezvous ID of its own (slurm.sbatch: <job>.<restarts>).
if ! grep -qF "rendezvous $job.0 at " "$out" || ! grep -qF "rendezvous $job.1 at " "$out"; then
    fail "the runs did not rendezvous as $job.0 and $job.1: $(grep 'slurm.sbatch:' "$out" | tr '\n' ' ')"
fi
resumed=$(grep -Eo "resumed from .*quickstart_latest.pth: [0-9]+ epoch\(s\) and [0-9]+ step\(s\)" "$out" | head -n 1)
done_epochs=${resumed#*: }
done_epochs=${done_epochs%% *}
[[ $done_epochs =~ ^[0-9]+$ ]] || fail "the requeued run did not resume from its checkpoint (KEEP=1 keeps $out)"
# A requeue that reaches the job only after its last epoch leaves a rerun that resumes with every epoch done:
# the job outran the requeue (slurmctld or this machine was slow), which is not a failure to resume.
((done_epochs < epochs)) || fail "the requeue reached the job only after its last epoch ($resumed): nothing was left to resume"
((done_epochs >= 1)) || fail "the requeued run resumed before epoch 1's checkpoint ($resumed)"
grep -q "^done: best acc" "$out" || fail "the requeued run did not finish (KEEP=1 keeps $out)"
# Each fake node has the CPUs slurm.conf gives it (the job holds them all, --exclusive) but no CPU binding
# (task/none): the ranks of the first run must take their threads from the CPUs SLURM gives the step on their
# own node, not from every core of the host the fake nodes share, nor from the batch node's count.
threads=$(grep -oE "^placement: rank [0-9]+ .* threads [0-9]+" "$out" | head -n 2 | grep -oE "[0-9]+$" | sort -n | xargs)
want=$(for c in "${node_cpus[@]}"; do for _ in $(seq "$procs"); do echo $((c / procs > 0 ? c / procs : 1)); done; done | sort -n | xargs)
[[ "$threads" == "$want" ]] || fail "the ranks compute with ${threads:-?} thread(s), not the $want that the nodes' ${node_cpus[*]} CPU(s) give their $procs process(es) each"
kill -0 "$holder" 2>/dev/null || fail "the process holding the first run's port $port0 ended before the rerun did"
echo "slurm_local: PASS $nodes node(s): job $job trained 2 peers, was requeued mid-run, resumed from its checkpoint (${resumed##*: }) and finished ($runs runs in $(basename "$out"), on port $port1 while another process held the first run's port $port0)"
