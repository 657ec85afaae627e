"""The whole-loop throughput benchmark: a thin alias of ``dml-bench`` (``dml_dist/bench.py``, which documents it).

torchrun --standalone --nproc_per_node=2 benchmarks/throughput.py model=resnet20 batch_size=128
"""

from dml_dist.tools.bench import cli

if __name__ == "__main__":
    cli()  # ends through end_with, as every command
