"""Entry point of each peer process that ``launcher.launch_local`` starts: ``python -m dml_dist.worker JOB``.

``JOB`` is a pickle that the launcher wrote in its own private temporary folder a moment earlier (the
config, custom datasets, the folder for error notes); nothing else is ever loaded here.
"""

from __future__ import annotations

import os
import pickle
import sys


def main(argv=None) -> int:
    """A SIGTERM outside ``run``'s own handling (in ``report_error`` after a pre-group error) escapes as
    ``Stopped``, and ``end_with`` dies of it."""
    from .errors import DMLError, is_peer_loss, stop_on_sigterm
    from .report import ERROR_PREFIX, report_error, report_lost_contact
    from .train import run

    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    error_dir = os.path.join(os.path.dirname(argv[0]), "errors")

    def note(kind: str, text: str) -> None:
        with open(os.path.join(error_dir, f"{kind}{rank}.txt"), "w") as f:
            f.write(text)

    with open(argv[0], "rb") as f:  # our own file, written by the launcher in a private temp folder
        for p in reversed(pickle.load(f)):
            if p not in sys.path:
                sys.path.insert(0, p)
        try:
            job = pickle.load(f)
        except Exception as e:  # a dataset class the peers cannot import
            msg = (
                f"cannot load the config and datasets in the peer process ({type(e).__name__}: {e}); "
                f"define custom datasets and their transforms in an importable module"
            )
            note("error", msg)
            print(f"{ERROR_PREFIX} {msg}", file=sys.stderr, flush=True)
            return 1

    try:
        stop_on_sigterm()
        run(job["cfg"], job["data"])
    except DMLError as e:
        note("error", str(e))
        report_error(e)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # A rank that only lost contact with a failed peer files its note apart: the caller reports the cause.
        if is_peer_loss(e):
            note("lost", f"lost contact with another rank ({str(e).strip().splitlines()[0][:200]})")
            report_lost_contact(e)
            return 1
        note("error", f"{type(e).__name__}: {str(e).strip()[:500]}")
        raise
    return 0


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a native crash (SIGSEGV, SIGABRT) prints every thread's Python stack first
    from dml_dist.errors import end_with

    end_with(main)
