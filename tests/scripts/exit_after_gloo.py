"""Run by tests/test_launch.py: a world-of-one gloo group used and destroyed, then the end every entry point has,
``end_with(main)``, with a non-daemon thread still writing, an atexit handler, a line left in stdout's buffer and
an object on ``sys`` whose ``__del__`` only the interpreter's finalisation would call. argv: a folder for the
marks, then how main ends: ``return`` (3), ``raise`` (an exception after the group is gone), ``exit-msg``
(``sys.exit`` with a message), ``ctrl-c`` (KeyboardInterrupt), ``stopped`` (``Stopped``, a SIGTERM's exception) or
``ctrl-c-in-join`` (returns 3, and the thread sends SIGINT while the exit waits for it)."""

import atexit
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from dml_dist.errors import Stopped, end_with

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


main_returned = threading.Event()


def late_thread():
    if how == "ctrl-c-in-join":
        main_returned.wait()
        time.sleep(0.5)  # the exit is waiting for this thread by now
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    mark("thread")


threading.Thread(target=late_thread).start()
print("last line, not flushed")  # stdout is a pipe here: block-buffered


def main():
    if how == "raise":
        raise RuntimeError("main failed after the group was destroyed")
    if how == "exit-msg":
        sys.exit("dml-dist: error: the message sys.exit prints")
    if how == "ctrl-c":
        raise KeyboardInterrupt
    if how == "stopped":
        raise Stopped()
    main_returned.set()
    return 3


end_with(main)
