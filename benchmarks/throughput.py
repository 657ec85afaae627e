"""The whole-loop throughput benchmark: a thin alias of ``dml-bench`` (``dml_dist/bench.py``, which documents it).

torchrun --standalone --nproc_per_node=2 benchmarks/throughput.py model=resnet20 batch_size=128
"""

import sys

from dml_dist.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
