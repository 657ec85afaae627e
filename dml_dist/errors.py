"""The exceptions the entry points turn into exits, and the SIGTERM rule that lets rank 0 finish its writes."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist


class DMLError(Exception):
    """A user-facing error: the message names the problem and the fix.

    ``all_ranks`` is True when every rank detects the same problem (config, data, checkpoint checks), so
    only rank 0 prints it; a rank-specific failure (a model that cannot be built on one rank, an injected
    fault) sets it False and the failing rank prints its own message.
    """

    def __init__(self, message: str, all_ranks: bool = True):
        super().__init__(message)
        self.all_ranks = all_ranks
        # The process group's store, attached by ``train.run`` when the error ends a group it created: the
        # other ranks wait there for rank 0 to have printed the line (``report.report_error``).
        self.store = None


class Stopped(BaseException):
    """SIGTERM arrived: torchrun stopping the group after another rank failed, SLURM preempting or
    ``scancel``-ing the job, ``docker stop``. A BaseException, so no ``except Exception`` on the way
    swallows it."""


class _Sigterm:
    pid = None  # the process that installed the handler (forked DataLoader workers inherit it)
    armed = False  # raise Stopped on the next SIGTERM
    received = False


def _on_sigterm(signum, frame) -> None:
    if os.getpid() != _Sigterm.pid:  # a forked worker: die as it would have without us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _Sigterm.received = True
    if _Sigterm.armed:
        _Sigterm.armed = False
        raise Stopped()


def stop_on_sigterm() -> None:
    """Entry points of training processes (``dml-train`` under torchrun, the launcher's peer processes):
    SIGTERM becomes ``Stopped`` in the main thread, so ``train.run``'s cleanup finishes rank 0's queued
    checkpoint writes before the process dies of the signal (torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
    default 30 s, SLURM KillWait, default 30 s, Docker 10 s before SIGKILL). Caveat: Python runs the handler
    when the main thread is back in the interpreter; one blocked inside a C++ call (a hung NCCL wait) is
    SIGKILLed after that grace period, as without this handler. Not used in a caller's own process (API)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _Sigterm.pid, _Sigterm.armed, _Sigterm.received = os.getpid(), True, False
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def sigterm_deferred():
    """Cleanup that a signal must not cut short (draining the checkpoint writer). A SIGTERM during the
    block is remembered; SIGCHLD is ignored meanwhile (torch's DataLoader raises in the main thread when one
    of its workers dies, and torchrun's SIGTERM reaches the workers as well). Afterwards SIGTERM's default action is
    restored and, if one came (now or before), the process dies of it, so torchrun and SLURM see what they
    sent."""
    mine = _Sigterm.pid == os.getpid()
    _Sigterm.armed = False
    chld = signal.getsignal(signal.SIGCHLD) if mine else None
    if mine:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        if mine:
            signal.signal(signal.SIGCHLD, chld if chld is not None else signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if _Sigterm.received:
                die_of_sigterm()


@contextlib.contextmanager
def sigterm_held():
    """A few statements that a ``Stopped`` must not cut in half (queueing a checkpoint write: raised inside
    ``ThreadPoolExecutor.submit``'s thread start, it leaves a write running that nobody waits for). A SIGTERM
    meanwhile is only recorded (the handler is disarmed; blocking the signal in this thread would not do, the
    process's other threads would take it) and raised as ``Stopped`` right after the block."""
    mine = _Sigterm.pid == os.getpid() and threading.current_thread() is threading.main_thread()
    was = _Sigterm.armed
    if mine:
        _Sigterm.armed = False
    try:
        yield
    finally:
        if mine and was:
            _Sigterm.armed = True
            if _Sigterm.received:
                _Sigterm.armed = False
                raise Stopped()


def in_entry_process() -> bool:
    """True in a process whose entry point installed ``stop_on_sigterm`` (dml-train under torchrun, the
    launcher's peers): that entry point reports errors on stderr, so ``train.run`` may report early."""
    return _Sigterm.pid == os.getpid()


def sigterm_received() -> bool:
    return _Sigterm.received and _Sigterm.pid == os.getpid()


def die_of_sigterm() -> None:
    """End as SIGTERM's default action would, after flushing what this process printed."""
    _die_of(signal.SIGTERM)


def _die_of(sig: signal.Signals) -> NoReturn:
    _flush_stdio()
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # not reached unless the signal could not be delivered


def exit_process(code: int, die_of: signal.Signals | None = None) -> NoReturn:
    """End an entry point with ``code`` as the interpreter would, less its finalisation: wait for the
    non-daemon threads and run the atexit handlers (as ``sys.exit`` does), flush, then ``os._exit``.

    Why: ``destroy_process_group`` drops c10d's references, yet something on torch's C++ side keeps the
    gloo backend of the default group alive (its ``pt_gloo_runloop`` and ``gloo_tcp_loop`` threads are
    still there at exit, with no Python object left that refers to it). Its destruction then happens while
    the interpreter shuts down: in 5 of 140 three-rank runs here one rank died of it (``terminate called
    without an active exception``, SIGABRT), and a job that had finished failed (docs/troubleshooting.md). Skipping
    the finalisation also skips the last garbage collection, about 0.6 s of CPU per process. Everything
    these entry points open is closed explicitly (loggers, trackers, the checkpoint writer) or by atexit
    handlers.

    It cannot be cut short: Ctrl-C while the threads are joined is reported and the exit goes on (as the
    interpreter does); a SIGTERM from here on (torchrun stopping the group) is remembered and the process dies
    of it once the atexit handlers ran, as it does of ``die_of`` (``end_with``: Ctrl-C, a ``Stopped``)."""
    import atexit
    import traceback

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("exit_process ends the process from its main thread only (it joins the other threads)")
    _Sigterm.armed = False  # a SIGTERM now is only recorded (its handler raises Stopped only when armed)
    try:
        threading._shutdown()  # what Py_Finalize does first: joins non-daemon threads, stops executors' workers
    except BaseException:  # Ctrl-C while waiting for them
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    atexit._run_exitfuncs()  # reports its handlers' exceptions itself
    if die_of is None and sigterm_received():
        die_of = signal.SIGTERM
    if die_of is not None:
        _die_of(die_of)
    _flush_stdio()
    os._exit(code & 0xFF)


def end_with(main: Callable[[], int | None]) -> NoReturn:
    """Run an entry point's ``main`` and end the process with ``exit_process``, however ``main`` ends, as the
    interpreter would: its return value or ``SystemExit`` code (None is 0; any other non-int is printed, then
    1), an uncaught exception's traceback and 1, Ctrl-C's traceback and death by SIGINT, a ``Stopped``'s death
    by SIGTERM. An exception must not bypass ``exit_process``: after ``run`` has destroyed the group, the
    interpreter's finalisation is where a rank aborts."""
    code, die_of = 1, None
    try:
        try:
            code = _exit_code(main())
        except SystemExit as e:
            code = _exit_code(e.code)
        except Stopped:
            die_of = signal.SIGTERM
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                die_of = signal.SIGINT
            with contextlib.suppress(BaseException):  # a closed stderr, a failing excepthook
                sys.excepthook(*sys.exc_info())
    finally:
        exit_process(code, die_of)


def _exit_code(value) -> int:
    """The exit status ``sys.exit(value)`` gives."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    if sys.stderr is not None:
        with contextlib.suppress(Exception):
            print(value, file=sys.stderr)
    return 1


def _flush_stdio() -> None:
    """Before ``os._exit`` or a fatal signal, which leave Python's buffers unwritten (a closed pipe is ignored)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# What a rank sees when another rank died mid-collective (gloo's TCP pairs, the c10d store).
_CONNECTION_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
    "connection closed",
    "Socket Timeout",
)


def is_peer_loss(e: BaseException) -> bool:
    """An error a rank gets when another rank died mid-collective (the cause is on that other rank):
    a network error of the process group, or a connection failure. Any other backend error is not."""
    if isinstance(e, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(e, (RuntimeError, dist.DistError)) and any(s in str(e) for s in _CONNECTION_LOST)
