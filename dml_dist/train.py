"""Train a cohort of peers with Deep Mutual Learning, one process per peer.

    # this machine, no torchrun: starts model_num (default 2) peer processes itself
    python -m dml_dist.train --config configs/quickstart.yaml
    python -m dml_dist.train --config configs/quickstart.yaml model_num=1      # one model, plain cross-entropy

    # one node under torchrun (CPU/gloo here, one GPU per peer with NCCL where there are GPUs)
    torchrun --standalone --nproc_per_node=2 -m dml_dist.train --config configs/quickstart.yaml epochs=3

    # two nodes, 4 peers each (run on both nodes; NODE_RANK=0 on the first, 1 on the second)
    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=$NODE_RANK --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER_ADDR:29500 -m dml_dist.train --config configs/cifar10_resnet32.yaml model_num=8

    # an 8-GPU node, 2 peers x 4 data-parallel replicas (DDP within each peer)
    torchrun --standalone --nproc_per_node=8 -m dml_dist.train --config configs/cifar10_resnet32.yaml model_num=2 replicas=4

    # a mixed pair on an 8-GPU node: the ResNet-32 on one GPU, the 75x costlier WRN-28-10 on seven
    torchrun --standalone --nproc_per_node=8 -m dml_dist.train --config configs/paper_cifar100_resnet32.yaml model=[resnet32,wrn28_10] replicas=[1,7] batch_size=56

    # ImageNet-sized folders: 2 ResNet-50 peers x 4 replicas, each batch decoded once per node (stream path)
    torchrun --standalone --nproc_per_node=8 -m dml_dist.train --config configs/imagenet_resnet50.yaml replicas=4 data_dir=/data/imagenet

    # a worker dies -> torchrun restarts the group, which resumes from <exp>_latest.pth by itself
    torchrun --standalone --nproc_per_node=2 --max-restarts=3 -m dml_dist.train --config configs/quickstart.yaml

Every rank draws the same batches (shared-seed sampler), runs its own peer, all-gathers the logits and
computes its DML loss locally. Rank 0 evaluates the ensemble, logs and writes every peer's checkpoints.
"""  # noqa: E501 - command lines

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from datetime import timedelta

import torch

from . import distributed as D
from . import faults, stall
from .checkpoint import latest_path, peer_path, remove_stale_temp_files, versions
from .cohort import CohortCheckpoint, public_config
from .config import build_config, default_model_num, finalize_config, parse_overrides, peer_model_name, world_size_for
from .data import Datasets, build_datasets, make_eval_loader, make_train_loader
from .engine import evaluate, train_one_epoch
from .errors import (
    DMLError,
    Stopped,
    die_of_sigterm,
    in_entry_process,
    sigterm_deferred,
    sigterm_received,
    stop_on_sigterm,
)
from .exchange import resolve_exchange
from .launcher import DMLTrainingError, launch_local
from .logger import NullLogger, make_logger
from .loss import kl_ramp
from .meters import Meters, gather_meters
from .models import build_model, channels_last_choice
from .parallel import take_first_replica_buffers, wrap_replicas

ERROR_PREFIX = "dml-dist: error:"


def resolve_amp(cfg: dict, device: torch.device) -> str:
    """Mixed precision applies on GPUs only; CPU runs stay in fp32 so their results never change."""
    if device.type != "cuda":
        return "off"
    if cfg["amp"] == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return cfg["amp"]


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from dynamo's private counters; (0, 0) when
    they cannot be read (a log line must never stop training)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001
        return 0, 0


def compile_report(model, before: tuple[int, int]) -> str:
    """What torch.compile did in the first epoch (dynamo's counters since ``before``, so a caller's own
    compiled graphs do not count), logged after it: proof that the peer really runs compiled, and how
    often dynamo fell back to eager."""
    graphs, breaks = (now - then for now, then in zip(_dynamo_counts(), before))
    return f"compile: {type(model).__name__}, {graphs} graph(s) compiled, {breaks} graph break(s) in the first epoch"


class Trainer:
    """Holds one rank's peer (or one replica of it) and the cohort bookkeeping every rank keeps in step."""

    def __init__(self, cfg: dict, ctx: D.DistContext, logger: NullLogger, data: Datasets):
        self.cfg, self.ctx, self.logger, self.data = cfg, ctx, logger, data
        self.arch = peer_model_name(cfg, ctx.peer)
        self.archs = [peer_model_name(cfg, k) for k in range(cfg["model_num"])]
        torch.manual_seed(cfg["seed"] + ctx.peer)  # peers start from different weights, a peer's replicas alike
        try:
            model = build_model(self.arch, data.num_classes, image_size=cfg["image_size"], pretrained=cfg["pretrained"])
        except DMLError as e:
            raise DMLError(f"peer {ctx.peer + 1}: {e}", all_ranks=False) from None
        cfg["channels_last"], self.channels_last_why = channels_last_choice(
            cfg["channels_last"], model, ctx.device, cfg["amp"]
        )
        model = model.to(
            ctx.device, memory_format=torch.channels_last if cfg["channels_last"] else torch.contiguous_format
        )
        # self.model: the peer itself (its state dict is what checkpoints hold); self.train_model: what the
        # step calls (DDP over the peer's replicas and/or torch.compile).
        self.model, self.train_model = wrap_replicas(model, ctx, cfg["sync_bn"])
        if cfg["compile"]:
            self.train_model = torch.compile(self.train_model)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            weight_decay=cfg["weight_decay"],
            nesterov=cfg["nesterov"] and cfg["momentum"] > 0,
            fused=ctx.device.type == "cuda",
        )  # CUDA: one kernel, no GradScaler sync
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg["step_size"], cfg["gamma"])
        self.scaler = torch.amp.GradScaler("cuda") if cfg["amp"] == "fp16" else None
        seed = cfg["seed"] + faults.seed_offset(ctx.rank)
        shard = (ctx.replica, ctx.replicas)
        # The stream path decodes each sample once per job: the ranks of a node that train on the same rows
        # split them (collective: the decode groups).
        node = (ctx.local_rank, ctx.local_world_size)
        decode = D.decode_group(ctx) if data.path == "stream" and data.collate_fn is None else None
        self.train_loader = make_train_loader(
            data.train,
            cfg["batch_size"],
            seed,
            cfg["num_workers"],
            ctx.device,
            shard,
            collate_fn=data.collate_fn,
            node=node,
            decode=decode,
        )
        self.val_loader, self.test_loader = (
            make_eval_loader(ds, 2 * cfg["batch_size"], cfg["num_workers"], ctx.device, shard, node, decode)
            if ds is not None
            else None
            for ds in (data.val, data.test)
        )
        self.steps_per_epoch = len(self.train_loader)

        # The cohort's state, identical on every rank, and its checkpoints (cohort.py).
        self.ckpt = CohortCheckpoint(
            cfg, ctx, logger, data, (self.arch, self.model, self.optimizer, self.scheduler, self.scaler), self.archs
        )
        self.watch = stall.StepWatch(logger, D.stall_timeout().total_seconds(), ctx.peer_of) if ctx.is_main else None

    def kl_weight(self, epoch: int):
        """The mutual term's weight per step of ``epoch`` (``loss.kl_ramp``: warm-up, then kl_weight)."""
        cfg = self.cfg
        return lambda step: kl_ramp(cfg["kl_weight"], cfg["kl_warmup_epochs"], self.steps_per_epoch, epoch, step)

    # ------------------------------------------------------------------------------------------- loop
    def _on_step(self, epoch: int):
        every = self.cfg["save_every_steps"]

        def hook(step: int, meters: Meters) -> None:
            global_step = (epoch - 1) * self.steps_per_epoch + step + 1
            if every and global_step % every == 0 and step + 1 < self.steps_per_epoch:
                self.ckpt.step = step + 1
                self.ckpt.save(meters, epoch_done=epoch)

        return hook

    def fit(self) -> None:
        cfg, ctx, log, c = self.cfg, self.ctx, self.logger, self.ckpt
        if c.epoch >= cfg["epochs"]:
            log.info(f"nothing to train: the checkpoint already holds {c.epoch} epoch(s); raise epochs= to go on")
        first_epoch, compiled_before = c.epoch + 1, _dynamo_counts()
        for epoch in range(first_epoch, cfg["epochs"] + 1):
            t0 = time.time()
            self.train_loader.set_epoch(epoch - 1, c.step)
            meters = train_one_epoch(
                self.train_model,
                self.optimizer,
                self.train_loader,
                ctx,
                cfg,
                epoch,
                log,
                start_step=c.step,
                meters=c.meters,
                scaler=self.scaler,
                on_step=self._on_step(epoch),
                kl_weight=self.kl_weight(epoch),
                watch=self.watch,
            )
            c.meters, c.step = None, 0
            if cfg["compile"] and epoch == first_epoch:
                log.info(compile_report(self.train_model, compiled_before))
            train = gather_meters(meters, ctx, epoch, self.steps_per_epoch - 1)  # sync point
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            stall.report_progress(epoch, self.steps_per_epoch, "evaluation")
            take_first_replica_buffers(self.model, ctx)  # collective: evaluate what the checkpoint holds
            val = evaluate(self.model, self.val_loader, ctx, cfg)
            self._report_bad_images()  # collective
            c.epoch = epoch
            # The first epoch always sets a best (so every peer has a _best.pth), later ones when higher.
            new_best = [k for k, a in enumerate(val["peer_acc"]) if c.best[k] is None or a > c.best[k]]
            for k in new_best:
                c.best[k] = val["peer_acc"][k]
            c.best_ensemble = max(c.best_ensemble, val["ensemble_acc"])
            c.history.append(
                {
                    "epoch": epoch,
                    "lr": lr,
                    "train_loss": [t[0] for t in train],
                    "train_ce": [t[1] for t in train],
                    "train_kl": [t[2] for t in train],
                    "train_acc": [t[3] for t in train],
                    "val_loss": val["peer_loss"],
                    "val_acc": val["peer_acc"],
                    "ensemble_acc": val["ensemble_acc"],
                    "ensemble_loss": val["ensemble_loss"],
                }
            )
            c.run_info["epoch_seconds"].append(round(time.time() - t0, 3))
            self._log_epoch(c.history[-1])
            c.save(new_best=new_best, final=epoch == cfg["epochs"])
            log.write_json(f"{cfg['experiment_name']}_summary.json", self.summary())
        c.writer.wait()

    def _report_bad_images(self) -> None:
        """Collective: the files that ``bad_images: skip`` replaced since the last call, from every rank (each
        decodes a share), named once in the log and kept in the run facts (checkpoint, summary)."""
        mine, self.data.skipped = list(self.data.skipped), []  # the cache's, once
        for loader in (self.train_loader, self.val_loader, self.test_loader):
            if getattr(loader, "skipped", None):
                mine += loader.skipped
                loader.skipped = []
        seen = self.ckpt.run_info.setdefault("bad_images", [])  # the files' paths
        found = {path: line for lines in D.gather_objects(mine) or [] for path, line in lines}
        for path in sorted(set(found) - set(seen)):
            self.logger.info(f"bad_images=skip: {found[path].split(';')[0]}; a grey stand-in takes its place")
            seen.append(path)

    def _log_epoch(self, h: dict) -> None:
        scalars = {"lr": h["lr"], "ensemble/val_acc": h["ensemble_acc"], "ensemble/val_loss": h["ensemble_loss"]}
        for k in range(self.cfg["model_num"]):
            for key in ("train_loss", "train_ce", "train_kl", "train_acc", "val_loss", "val_acc"):
                scalars[f"peer{k + 1}/{key}"] = h[key][k]
        self.logger.scalars(scalars, h["epoch"])
        peers = " | ".join(
            f"peer{k + 1} {self.archs[k]} train {h['train_loss'][k]:.3f}/{h['train_acc'][k]:.3f} "
            f"val {h['val_loss'][k]:.3f}/{h['val_acc'][k]:.3f}"
            for k in range(self.cfg["model_num"])
        )
        self.logger.info(
            f"epoch {h['epoch']}/{self.cfg['epochs']} lr {h['lr']:.4g} | {peers} | "
            f"ensemble val acc {h['ensemble_acc']:.4f}"
        )

    def test(self) -> dict | None:
        """Collective: final peers and their ensemble on the test split (None when there is none)."""
        if self.test_loader is None:
            return None
        take_first_replica_buffers(self.model, self.ctx)
        res = evaluate(self.model, self.test_loader, self.ctx, self.cfg)
        self._report_bad_images()  # collective
        self.logger.info(
            "test acc "
            + " ".join(f"peer{k + 1} {a:.4f}" for k, a in enumerate(res["peer_acc"]))
            + f" ensemble {res['ensemble_acc']:.4f}"
        )
        return {"peer_acc": res["peer_acc"], "peer_loss": res["peer_loss"], "ensemble_acc": res["ensemble_acc"]}

    def summary(self, test_results: dict | None = None) -> dict:
        cfg, c = self.cfg, self.ckpt
        last = c.history[-1] if c.history else None
        return {
            "experiment_name": cfg["experiment_name"],
            "config": public_config(cfg),
            "classes": list(self.data.classes),
            "best_accuracies": [b or 0.0 for b in c.best],
            "avg_best_accuracy": sum(b or 0.0 for b in c.best) / len(c.best),
            "best_ensemble_accuracy": c.best_ensemble,
            "final_accuracies": last["val_acc"] if last else None,
            "final_ensemble_accuracy": last["ensemble_acc"] if last else None,
            "test_results": test_results,
            "bad_images_skipped": len(c.run_info.get("bad_images", [])),
            "history": c.history,
            "checkpoints": {
                "latest": latest_path(cfg["save_dir"], cfg["experiment_name"]),
                "best": [
                    peer_path(cfg["save_dir"], cfg["experiment_name"], k + 1, "best") for k in range(cfg["model_num"])
                ],
                "final": [
                    peer_path(cfg["save_dir"], cfg["experiment_name"], k + 1, "final") for k in range(cfg["model_num"])
                ],
            },
            "versions": versions(),
            "run": c.run_info,  # wall-clock facts: the only part that differs between equal runs
        }


def run(cfg: dict, data: Datasets | None = None, stream=None) -> dict:
    """Train this rank's peer inside the current torchrun world (or alone); return the results on every
    rank: ``model`` is this rank's peer. ``data``: ready datasets (the API's custom loaders) instead of
    ``data_dir``. Raises DMLError on bad input."""
    created_group = not torch.distributed.is_initialized()
    ctx = D.init_distributed(cfg)
    logger, trainer = NullLogger(), None
    try:
        asked_replicas = cfg["replicas"]
        cfg = finalize_config(cfg, ctx.world_size)
        if cfg["resume"] is None and ctx.restart_count > 0:
            cfg["resume"] = "auto"  # torchrun restarted the group after a failure: carry on from the checkpoint
        faults.at_setup(ctx.rank)
        cfg["amp"] = resolve_amp(cfg, ctx.device)
        cfg["exchange"], exchange_why = resolve_exchange(cfg)
        if ctx.device.type == "cuda" and created_group:
            # Fixed-shape training: let cuDNN pick the fastest convolution algorithms once per shape (only in
            # processes this package started: a user's own process keeps its global setting).
            torch.backends.cudnn.benchmark = True
        logger = make_logger(ctx.is_main, cfg, stream)
        if ctx.restart_count > 0:
            logger.info(f"torchrun restart {ctx.restart_count}: resume={cfg['resume']}")
        if (
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"
        ):
            logger.info(
                "warning: --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted gloo "
                "workers can fail to connect (pytorch/pytorch#135712); export it before torchrun"
            )
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        if asked_replicas == "auto":
            logger.info(
                f"replicas: auto = {cfg['replicas']} per peer ({ctx.world_size} processes, {cfg['model_num']} peers)"
            )
        logger.info(f"rank order: {ctx.order} ({ctx.order_why})")
        for p in D.gather_objects(ctx.describe()) or []:
            logger.info(
                "placement: rank {rank} (peer {peer}, replica {replica}) host {host} device {device} "
                "backend {backend} group {group} threads {threads}".format(**p)
            )
        if ctx.is_main:
            for stale in remove_stale_temp_files(cfg["save_dir"], cfg["experiment_name"]):
                logger.info(f"removed {stale}: a temp file left by a process killed while saving")
        if data is None:
            # collective: one folder scan per job, one cache build or CIFAR download per node
            data = build_datasets(cfg, ctx.device, logger.info)
        logger.info(
            f"data: {len(data.train)} train / {len(data.val)} val"
            + (f" / {len(data.test)} test" if data.test is not None else "")
            + f" images, {data.num_classes} classes; {cfg['model_num']} peers: "
            + ", ".join(peer_model_name(cfg, r) for r in range(cfg["model_num"]))
        )
        logger.info(f"data path: {data.path} ({data.why})")
        logger.info(f"exchange: {cfg['exchange']} ({exchange_why})")
        trainer = Trainer(cfg, ctx, logger, data)
        layouts = D.gather_objects((ctx.peer, cfg["channels_last"], trainer.channels_last_why))  # per peer's model
        for peer, _, why in sorted(set(layouts or [])):
            logger.info(f"channels_last: peer {peer + 1}: {why}")
        # the config records rank 0's peer's; each peer's own choice is kept in the run facts
        trainer.ckpt.run_info["channels_last"] = [on for _, on, _ in sorted(set(layouts or []))]
        trainer.ckpt.resume(cfg["resume"])
        t0 = time.time()
        trainer.fit()
        test_results = trainer.test()
        trainer.ckpt.run_info.update(
            {
                "started_at": started,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "elapsed_s": round(time.time() - t0, 3),
                "restarts": ctx.restart_count,
            }
        )
        summary = trainer.summary(test_results)
        logger.write_json(f"{cfg['experiment_name']}_summary.json", summary)
        logger.info(
            f"done: best acc {[f'{a:.4f}' for a in summary['best_accuracies']]} "
            f"(avg {summary['avg_best_accuracy']:.4f}), "
            f"best ensemble {trainer.ckpt.best_ensemble:.4f}; summary in "
            f"{os.path.join(cfg['log_dir'], cfg['experiment_name'] + '_summary.json')}"
        )
        return {
            **summary,
            "model": trainer.model.cpu(),
            "rank": ctx.rank,
            "summary_path": os.path.join(cfg["log_dir"], f"{cfg['experiment_name']}_summary.json"),
        }
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
        if D.is_peer_loss(e) and in_entry_process():
            report_lost_contact(e)
        raise
    except Stopped:
        if trainer is not None and any(not f.done() for f in trainer.ckpt.writer.pending):
            logger.info("SIGTERM: finishing the queued checkpoint writes, then stopping")
        raise
    finally:
        with sigterm_deferred():  # a SIGTERM must not cut the writes short; the process dies of it afterwards
            try:
                if trainer is not None:
                    if trainer.watch is not None:
                        trainer.watch.close()
                    trainer.ckpt.writer.close()
            finally:
                logger.close()
                if created_group and not sigterm_received():  # stopping: no teardown with peers gone
                    D.destroy_distributed()


REPORT_WAIT_S = 30  # how long a rank waits for rank 0 to print an error every rank hit (normally < 1 s)


def report_error(e: DMLError) -> None:
    """One line on stderr: rank 0 speaks for errors every rank hits; a rank-specific one names its rank.
    Reports ``e`` once (later calls return).

    An error every rank hits: the other ranks must not exit before rank 0 has printed it (a rank's exit
    makes the launcher stop the group, rank 0 included). With a process group (``e.store``, attached by
    ``run``), rank 0 prints, then sets a key in the group's store; the others return when the key is there
    or the store is unreachable (it lives in rank 0's process, which is then gone, its line printed).
    Before any group was formed (a config error) there is no channel to rank 0: the others stay until the
    launcher stops them, which it does once rank 0 has exited with its line. When the wait runs out
    (``REPORT_WAIT_S``: rank 0 alive but stuck, e.g. in a collective this error left unanswered, or an
    error only some ranks hit), one rank prints the line itself, naming its rank."""
    if getattr(e, "reported", False):
        return
    e.reported = True
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0 or not e.all_ranks:
        faults.before_error_report(rank)
        where = f" (rank {rank})" if world > 1 and not e.all_ranks else ""
        print(f"{ERROR_PREFIX}{where} {e}", file=sys.stderr, flush=True)
    if world == 1 or not e.all_ranks:
        return
    # one count on every rank: init_distributed agrees on it (a shared store outlives restarts)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"dml_error_reported/{attempt}"
    store, e.store = e.store, None
    if store is None:
        if rank != 0:
            threading.Event().wait(REPORT_WAIT_S)  # normally ended by the launcher's SIGTERM
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line per node at most
                print(f"{ERROR_PREFIX} (rank {rank}) {e}", file=sys.stderr, flush=True)
        return
    try:
        if rank == 0:
            store.set(key, "1")
            return
        store.wait([key], timedelta(seconds=REPORT_WAIT_S))
        return
    except Exception:  # noqa: BLE001  timed out, or the store's host (rank 0) has exited: its line is out
        pass
    try:
        store.set_timeout(timedelta(seconds=5))
        if store.check([key]):
            return
        # rank 0 is alive (its store answers) but has not printed: the first rank here speaks for it
        first = store.compare_set(f"dml_error_fallback/{attempt}", "", str(rank))
    except Exception:  # noqa: BLE001  rank 0's store is gone: its line is out
        return
    if first.decode() == str(rank):
        print(f"{ERROR_PREFIX} (rank {rank}) {e}", file=sys.stderr, flush=True)


def report_lost_contact(e: BaseException) -> None:
    """Another rank died mid-collective: one line from this rank (its own error, or torchrun's report,
    says why). Reports ``e`` once."""
    if getattr(e, "dml_reported", False) or stall.reported():  # the stall line said why already
        return
    e.dml_reported = True
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    print(
        f"{ERROR_PREFIX} (rank {os.environ.get('RANK', '0')}) lost contact with another rank ({first}); "
        f"see that rank's error",
        file=sys.stderr,
        flush=True,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="dml-train", description=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file with config keys (see README); CLI key=value pairs override it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, values parsed as YAML")
    # Intermixed: key=value pairs may stand on both sides of --config.
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    try:
        return _main(parse_args(argv))
    except Stopped:  # SIGTERM outside run(), which handles its own
        die_of_sigterm()
        return 143


def _main(args) -> int:
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
        if not D.is_peer_loss(e):
            raise
        report_lost_contact(e)  # another rank died mid-collective
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
