"""Run under `torchrun --nproc_per_node=4` by tests/test_train_distributed.py: ``exchange: all_reduce``
against ``all_gather`` over gloo, through the trainer's own step (``exchange.exchange`` + ``peer_update``).

For cohorts of 3 (a subgroup) and 4 peers, ``mutual`` dml and ensemble, with and without ``mutual_weights``,
T = 3 and a warm-up ramp: every
peer trains a ResNet-20 for a few SGD steps on the same batches, once per mode from the same initial
weights. Rank 0 prints one JSON line per case: the largest loss and weight differences between the modes,
the mutual term's size, how far the weights moved, and how far they land without the mutual term (so
the tolerance is shown to be far below the mutual term's own effect; with weights, also how far they land
from the unweighted run's).
"""

import json
from types import SimpleNamespace

import torch
import torch.distributed as dist

from dml_dist import distributed as D
from dml_dist.engine import peer_update
from dml_dist.errors import exit_process
from dml_dist.exchange import exchange
from dml_dist.loss import kl_ramp
from dml_dist.models import build_model

STEPS, T, KL = 6, 3.0, 1.0
dist.init_process_group("gloo")
torch.set_num_threads(1)
rank = dist.get_rank()
groups = {3: dist.new_group([0, 1, 2]), 4: None}  # collective: every rank creates every group
g = torch.Generator().manual_seed(0)  # the same batches on every rank
batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(STEPS)]


WEIGHTS = {3: [1.0, 0.5, 2.0], 4: [1.0, 0.5, 2.0, 1.5]}


def train(n: int, mode: str, mutual: str, kl: float = KL, weights=None):
    torch.manual_seed(100 + rank)
    model = build_model("resnet20", 10, image_size=16)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx = SimpleNamespace(peer_group=groups[n], uniform=True, peer=rank)  # one replica per peer
    stats = []
    for step, (x, y) in enumerate(batches):
        logits = model(x)
        got = exchange(logits, ctx, mode, T, weights)
        w = kl_ramp(kl, 1, STEPS // 2, 1 + step // (STEPS // 2), step % (STEPS // 2))  # warm-up over 3 steps
        s, _ = peer_update(logits, got, rank, y, opt, T, w, mutual, weights=weights)
        stats.append(s[:3] / s[4])  # loss, ce, kl
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), start))
    return torch.stack(stats), [p.detach().clone() for p in model.parameters()], moved


out = []
for n in (3, 4):
    for mutual in ("dml", "ensemble"):
        for weights in (None, WEIGHTS[n]):
            if rank < n:
                sa, wa, moved = train(n, "all_gather", mutual, weights=weights)
                sb, wb, _ = train(n, "all_reduce", mutual, weights=weights)
                # control: what dropping the mutual term changes (with weights: what dropping the weights changes)
                _, wc, _ = train(n, "all_reduce", mutual, kl=0.0 if weights is None else KL)
                row = {
                    "peers": n,
                    "mutual": mutual,
                    "weighted": weights is not None,
                    "rank": rank,
                    "loss_diff": (sa - sb).abs().max().item(),
                    "weight_diff": max((a - b).abs().max().item() for a, b in zip(wa, wb)),
                    "kl_min": sa[1:, 2].min().item(),
                    "moved": moved,
                    "control_diff": max((a - c).abs().max().item() for a, c in zip(wa, wc)),
                }
            else:
                row = None
            out.append(D.gather_objects(row))
if rank == 0:
    for rows in out:
        for row in rows:
            if row is not None:
                print(json.dumps(row), flush=True)
dist.barrier()  # every rank leaves together (rank 3 sat out the 3-peer cases)
D.destroy_distributed()
exit_process(0)  # the interpreter's finalisation after a gloo group can abort a rank (dml_dist.errors)
