"""launch/slurm.sbatch on a real SLURM (issue 16): a throwaway cluster on this machine, launch/slurm_local.sh,
with 2 fake nodes (two slurmd on one host; the 1-node form runs the same script and is left out to keep the
suite under 15 minutes). `.ci/run` installs SLURM from Debian's packages."""

import os
import re
import shutil
import sys

import pytest
from conftest import REPO, SHARED_DATA, requires, run_cmd

SLURM = all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")) and os.geteuid() == 0


@requires(
    SLURM and SHARED_DATA.is_dir(),
    "SLURM (apt-get install slurmctld slurmd slurm-client munge, as root) or ../shared/data/cifar10-small is missing",
)
@pytest.mark.parametrize("nodes", [2])
def test_sbatch_trains_is_requeued_and_resumes(nodes):
    """2 peers, 3 short epochs; `scontrol requeue` after epoch 1 (rank 1 stops itself at epoch 2 until it lands);
    the requeued run resumes from its checkpoint and finishes, each run with its own rendezvous (<job>.0, <job>.1)
    and a port of its own (another process holds the first run's port during the requeue), and the job's output
    (--open-mode=append) holds both runs."""
    r = run_cmd(
        ["bash", str(REPO / "launch" / "slurm_local.sh"), str(nodes)], env={"PYTHON": sys.executable}, timeout=840
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"slurm_local: PASS {nodes} node(s)" in r.stdout and "(2 runs in" in r.stdout
    held = re.search(r"on port (\d+) while another process held the first run's port (\d+)", r.stdout)
    assert held and held.group(1) != held.group(2), r.stdout[-2000:]
