"""Run under `torchrun --nproc_per_node=1` by tests/test_launch.py: the collective rule at a world of one.

1. A group with no CPU backend (``cuda:gloo``: what an NCCL-only group is to CPU tensors) must make our
   collectives fail on CPU tensors even with one process: the real collective runs, nothing short-circuits.
2. With the backend string the placement rule gives, every collective the trainer uses works.
Prints one JSON line.
"""
import json

import torch
import torch.distributed as dist

from dml_dist import distributed as D

out = {}
dist.init_process_group("cuda:gloo")
try:
    D.all_gather_tensor(torch.ones(2))
    out["device_only_group"] = "no error"
except RuntimeError as e:
    out["device_only_group"] = str(e).splitlines()[0]
dist.destroy_process_group()

placement = D.resolve_placement(0, 1, 0)
dist.init_process_group(D.process_group_backend(placement))
out["backend"] = str(dist.get_backend())
out["all_gather"] = D.all_gather_logits(torch.arange(6.0).view(2, 3)).shape == (1, 2, 3)
out["gather_to_main"] = D.gather_to_main(torch.ones(3)).tolist() == [[1.0, 1.0, 1.0]]
out["objects"] = D.gather_objects({"a": 1}) == [{"a": 1}] and D.broadcast_object("x") == "x" \
    and D.scatter_objects(["only"]) == "only"
D.barrier()
dist.destroy_process_group()
print(json.dumps(out))
