"""What ``compile`` does to the step's work around the model (docs/benchmarks.md): the ATen operations that the
eager ``batch_transform`` (the augmentations with normalisation) and ``score_step`` (the DML loss with the meters'
statistics, forward and backward) dispatch, against the kernels inductor generates for them, and the largest
difference between the two results. On CPU the kernels are inductor's C++ kernels, counted when they are generated
(``torch._inductor.metrics.generated_kernel_count``), not launches counted per step; a GPU's Triton kernels fuse
differently.

    python benchmarks/compiled_parts.py                 # batch 128, 10 classes, 2 peers, all four augmentations
"""

from __future__ import annotations

import argparse

import torch
import torch._inductor.metrics as inductor_metrics

from dml_dist.data import batch_transform
from dml_dist.data.augment import AUGMENTATIONS, AugParams
from dml_dist.engine import score_step
from dml_dist.tools.ops import OpCounter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    b, c = args.batch, args.classes
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (b, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    params = AugParams.draw(b, g)
    peers, y = torch.randn(2, b, c, generator=g), torch.randint(0, c, (b,), generator=g)

    def transform(fn):
        return fn(x, params, AUGMENTATIONS)

    def loss(fn):
        logits = peers[0].clone().requires_grad_(True)
        total, stats, _ = fn(logits, peers, 0, y, 3.0, 1.0, "dml", None)
        total.backward()
        return torch.cat([stats.float(), logits.grad.flatten()])

    for name, fn, run in (("batch_transform", batch_transform, transform), ("score_step", score_step, loss)):
        with OpCounter() as ops:
            eager = run(fn)
        inductor_metrics.reset()
        compiled = run(torch.compile(fn))
        diff = (compiled - eager).abs().max().item()
        print(
            f"{name}: eager {ops.ops} ATen operations, compiled {inductor_metrics.generated_kernel_count} kernels, "
            f"largest difference {diff:.1e}"
        )


if __name__ == "__main__":
    main()
