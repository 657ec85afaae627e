"""Run under `torchrun --nproc_per_node=1` by tests/test_launch.py: the collective rule at a world of one.

1. A group with no CPU backend (``cuda:gloo``: what a user's NCCL-only group is to CPU tensors) rejects a
   CPU tensor even with one process (the real collective runs, nothing short-circuits); our host-side
   collectives then run on a gloo group of their own (issue 16: ``train_dml`` inside a user's NCCL group).
2. With the backend string the placement rule gives, every collective the trainer uses works.
Prints one JSON line.
"""

import json

import torch
import torch.distributed as dist

from dml_dist import distributed as D
from dml_dist.distributed.placement import process_group_backend, resolve_placement
from dml_dist.errors import exit_process

out = {}
dist.init_process_group("cuda:gloo")
try:
    dist.all_gather_into_tensor(torch.empty(2), torch.ones(2))
    out["device_only_group"] = "no error"
except RuntimeError as e:
    out["device_only_group"] = str(e).splitlines()[0]
out["host_group_used"] = D.host_group() is not None and D.host_group() is D.host_group()
out["host_side_ok"] = (
    D.all_gather(torch.ones(2)).tolist() == [[1.0, 1.0]]
    and D.gather_to_main(torch.ones(1)).tolist() == [[1.0]]
    and D.all_gather_objects("o") == ["o"]
    and D.broadcast_object("b") == "b"
    and D.gather_objects(1) == [1]
    and D.scatter_objects([2]) == 2
)
D.barrier()
D.destroy_distributed()

placement = resolve_placement(0, 1, 0)
dist.init_process_group(process_group_backend(placement))
out["backend"] = str(dist.get_backend())
out["no_host_group"] = D.host_group() is None  # a group with a CPU backend serves host-side collectives itself
out["all_gather"] = D.all_gather(torch.arange(6.0).view(2, 3)).shape == (1, 2, 3)
out["gather_to_main"] = D.gather_to_main(torch.ones(3)).tolist() == [[1.0, 1.0, 1.0]]
out["objects"] = (
    D.gather_objects({"a": 1}) == [{"a": 1}]
    and D.broadcast_object("x") == "x"
    and D.scatter_objects(["only"]) == "only"
)
D.barrier()
dist.destroy_process_group()
print(json.dumps(out))
exit_process(0)  # the interpreter's finalisation after a gloo group can abort a rank (dml_dist.errors)
