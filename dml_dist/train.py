"""The training entry point: parse, build, train, close. One process per peer under torchrun, or without
torchrun a local cohort started by this process (``dml-train``; commands in the README).

Every rank draws the same batches (shared-seed sampler), runs its own peer, exchanges predictions and
computes its DML loss locally. Rank 0 evaluates the ensemble, logs and writes every peer's checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from . import distributed as D
from . import faults, stall
from .config import build_config, parse_overrides
from .data import Datasets
from .errors import (
    DMLError,
    end_with,
    in_entry_process,
    is_peer_loss,
    sigterm_deferred,
    sigterm_received,
    stop_on_sigterm,
)
from .launcher import DMLTrainingError, launch_local
from .logger import NullLogger, make_logger
from .report import report_error, report_lost_contact
from .trainer import Trainer
from .world import default_model_num, finalize_config, world_size_for


def run(cfg: dict, data: Datasets | None = None, stream=None) -> dict:
    """Train this rank's peer inside the current torchrun world (or alone); return the results on every
    rank: ``model`` is this rank's peer. ``data``: ready datasets (the API's custom loaders) instead of
    ``data_dir``. Raises DMLError on bad input."""
    created_group = not torch.distributed.is_initialized()
    ctx = D.init_distributed(cfg)
    logger, trainer, finished = NullLogger(), None, False
    try:
        asked_replicas = cfg["replicas"]
        cfg = finalize_config(cfg, ctx.world_size)
        faults.at_setup(ctx.rank)
        if ctx.device.type == "cuda" and created_group:
            # Fixed-shape training: let cuDNN pick the fastest convolution algorithms once per shape (only in
            # processes this package started: a user's own process keeps its global setting).
            torch.backends.cudnn.benchmark = True
        logger = make_logger(ctx.is_main, cfg, stream)
        D.log_start(ctx, logger.info, cfg, asked_replicas)  # collective
        trainer = Trainer(cfg, ctx, logger, data)  # collective: datasets, peer, loaders, what the run resolves
        trainer.resume()
        trainer.fit()
        results = trainer.finish()
        finished = True
        return results
    # Our own entry points report an error here, before the cleanup below: rank 0 may spend long draining
    # its checkpoint writes, and torchrun stops every rank once one has exited.
    except DMLError as e:
        if created_group and D.is_active():
            e.store = stall.default_store()  # outlives destroy_distributed below: report_error's channel
            if in_entry_process():
                report_error(e)
        raise
    except RuntimeError as e:
        if D.is_active() and stall.is_timeout(e):  # a rank stopped answering: name it while the store is up
            err = DMLError(stall.describe_stall(ctx.peer_of, D.group_timeout(), e), all_ranks=False)
            err.reported = stall.reported()  # rank 0's watch named the rank from the heartbeats already
            if in_entry_process():
                report_error(err)
            raise err from None
        if is_peer_loss(e) and in_entry_process() and not sigterm_received():  # not a peer stopped by a SIGTERM
            report_lost_contact(e)
        raise
    finally:
        with sigterm_deferred():  # a SIGTERM must not cut the writes short; the process dies of it afterwards
            try:
                # Said whichever way the signal surfaced here: as Stopped, or as a collective that a peer
                # stopped by the same SIGTERM broke first.
                if trainer is not None and sigterm_received() and trainer.checkpointer.writing():
                    with contextlib.suppress(Exception):  # a closed pipe must not skip the drain below
                        logger.info("SIGTERM: finishing the queued checkpoint writes, then stopping")
                if trainer is not None:
                    trainer.close()
            finally:
                logger.close(failed=not finished)
                if created_group and not sigterm_received():  # stopping: no teardown with peers gone
                    D.destroy_distributed()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="dml-train", description=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file of config keys (docs/configuration.md); key=value pairs override it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, values parsed as YAML")
    # Intermixed: key=value pairs may stand on both sides of --config.
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    """``dml-train``'s work; a SIGTERM outside ``run`` (which handles its own) escapes as ``Stopped``, and
    ``end_with`` dies of it."""
    args = parse_args(argv)
    try:
        cfg = build_config(args.config, parse_overrides(args.overrides))
        if D.under_launcher():
            stop_on_sigterm()
            run(cfg)
        else:
            # No torchrun: this process starts the cohort itself (one local process per replica of every peer).
            cfg = finalize_config(cfg, world_size_for({**cfg, "model_num": default_model_num(cfg)}))
            if world_size_for(cfg) == 1:
                stop_on_sigterm()
                run(cfg)
            else:
                launch_local(cfg)
    except DMLTrainingError:
        return 1  # the failing peer printed its own one-line error
    except DMLError as e:
        report_error(e)
        return 1
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        if not is_peer_loss(e):
            raise
        report_lost_contact(e)  # another rank died mid-collective
        return 1
    return 0


def cli() -> None:
    """The ``dml-train`` command (``python -m dml_dist.train`` alike): ``main``, ended by ``end_with``."""
    import faulthandler

    faulthandler.enable()  # a native crash (SIGSEGV, SIGABRT) prints every thread's Python stack first
    end_with(main)


if __name__ == "__main__":
    cli()
