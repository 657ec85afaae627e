"""Run by tests/test_launch.py: a world-of-one gloo group used and destroyed, then ``exit_process(3)`` with a
non-daemon thread still writing, an atexit handler and an object on ``sys`` whose ``__del__`` only the
interpreter's finalisation would call. argv: a folder for the marks."""

import atexit
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from dml_dist.errors import exit_process

marks = sys.argv[1]
FINALISED = os.path.join(marks, "finalised")


def mark(name):
    with open(os.path.join(marks, name), "w") as f:
        f.write(name)


class FinalisedLate:
    # bound now: the finalisation may have cleared this module's globals and builtins when __del__ runs
    def __del__(self, _open=open, _path=FINALISED):
        with _open(_path, "w") as f:
            f.write("finalised")


sys.dml_finalised_late = FinalisedLate()  # on sys: its dict is cleared in the finalisation whatever else holds ours
dist.init_process_group("gloo", init_method=f"file://{marks}/store", rank=0, world_size=1)
out = [torch.zeros(2)]
dist.all_gather(out, torch.ones(2))
dist.destroy_process_group()
atexit.register(mark, "atexit")
threading.Thread(target=lambda: (time.sleep(0.5), mark("thread"))).start()
exit_process(3)
