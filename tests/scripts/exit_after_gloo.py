"""Run by tests/test_launch.py: a world-of-one gloo group used and destroyed, then the end every entry point has,
``end_with(main)``, with a non-daemon thread still writing, an atexit handler, a line left in stdout's buffer and
an object on ``sys`` whose ``__del__`` only the interpreter's finalisation would call. argv: a folder for the
marks, then ``return`` (main returns 3) or ``raise`` (main raises after the group is gone)."""

import atexit
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from dml_dist.errors import end_with

marks, how = sys.argv[1], sys.argv[2]
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
print("last line, not flushed")  # stdout is a pipe here: block-buffered


def main():
    if how == "raise":
        raise RuntimeError("main failed after the group was destroyed")
    return 3


end_with(main)
