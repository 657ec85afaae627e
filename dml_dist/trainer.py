"""The Trainer: one rank's peer (or one replica of it), its loaders and checkpointer, and the cohort's train state.

Every call goes down: ``fit`` -> ``engine.train_one_epoch`` (which tells the checkpointer each position) ->
``engine.evaluate`` -> ``Checkpointer.save``. The train state (epochs and steps done, history, best accuracies,
run facts) is the same on every rank; the checkpointer reads it through ``state_dict()`` and restores it through
``load_state_dict()``.
"""

from __future__ import annotations

import os
import time

import torch

from . import distributed as D
from . import faults, stall
from .checkpoint import Checkpointer, PeerState, latest_path, peer_path, public_config, versions
from .data import Datasets, build_datasets, make_eval_loader, make_train_loader
from .engine import Peer, compile_step_parts, evaluate, resolve_amp, train_one_epoch
from .errors import DMLError
from .exchange import resolve_exchange
from .meters import Meters, gather_meters
from .models import build_model, channels_last_choice, pretrained_meta
from .parallel import (
    CUDA_GRAPH_MODES,
    compile_choice,
    compile_report,
    dynamo_counts,
    take_first_replica_buffers,
    wrap_replicas,
)
from .resolved import Resolved
from .weights import apply_statistics, load_init, peer_statistics
from .world import peer_model_name


class Trainer:
    def __init__(self, cfg: dict, ctx: D.DistContext, logger, data: Datasets | None = None):
        """Collective: builds the datasets (unless given: the API's custom loaders), this rank's peer, its loaders
        and checkpointer, and resolves what the config leaves to the run (``self.run``)."""
        self.cfg, self.ctx, self.logger = cfg, ctx, logger
        self.started = time.time()
        self.data = data if data is not None else build_datasets(cfg, ctx.device, logger.info)  # collective
        self._log_data()
        self.arch = peer_model_name(cfg, ctx.peer)
        self.archs = [peer_model_name(cfg, k) for k in range(cfg["model_num"])]
        self.frozen = bool(cfg["frozen"] and cfg["frozen"][ctx.peer])  # a teacher: predicts, never steps
        torch.manual_seed(cfg["seed"] + ctx.peer)  # peers start from different weights, a peer's replicas alike
        init = (cfg["init_from"] or [None] * cfg["model_num"])[ctx.peer]
        try:
            model = build_model(
                self.arch, self.data.num_classes, image_size=cfg["image_size"], pretrained=cfg["pretrained"]
            )
            self.init_record = load_init(init, model, self.arch, self.data.num_classes) if init else None
            if self.frozen and init is None:  # a teacher from pretrained weights: their head must fit the data
                head = (pretrained_meta(self.arch) or {}).get("classes")
                if head != self.data.num_classes:
                    raise DMLError(
                        f"it is frozen with {self.arch}'s pretrained weights, whose classifier predicts {head} "
                        f"classes, not this data's {self.data.num_classes}: its new classifier would stay random; "
                        f"give it init_from (a checkpoint trained on these classes)"
                    )
        except DMLError as e:
            raise DMLError(f"peer {ctx.peer + 1}: {e}", all_ranks=False) from None
        self.run, amp, channels_last = self._resolve(model)  # collective; this rank's own choices too
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(ctx.device, memory_format=layout).requires_grad_(not self.frozen)
        apply_statistics(model, *self.run.normalize[ctx.peer], ctx.device)
        # self.model: the peer itself (its state dict is what checkpoints hold); the step calls DDP over the
        # peer's replicas and/or torch.compile of it.
        self.model, train_model = wrap_replicas(model, ctx, cfg["sync_bn"], frozen=self.frozen)
        mode = self.run.compile[ctx.peer]
        if mode is not None:
            train_model = torch.compile(train_model, mode=mode)
        optimizer, self.scheduler, scaler = None, None, None
        if not self.frozen:
            optimizer = torch.optim.SGD(
                self.model.parameters(),
                lr=cfg["lr"],
                momentum=cfg["momentum"],
                weight_decay=cfg["weight_decay"],
                nesterov=cfg["nesterov"] and cfg["momentum"] > 0,
                fused=True,  # one kernel for all parameters on every device; on CUDA also no GradScaler sync
            )
            self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg["step_size"], cfg["gamma"])
            scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self._build_loaders()
        score, self.compiled_parts = compile_step_parts(mode, self.train_loader)  # counted in the compile report
        self.peer = Peer(train_model, optimizer, scaler, amp, channels_last, mode in CUDA_GRAPH_MODES, score)
        self.predicted: dict = {}  # a frozen peer's evaluation logits, per split: they never change
        self.predictions: torch.Tensor | None = None

        # The train state, identical on every rank.
        self.epoch, self.step = 0, 0  # completed epochs; steps done in the current one
        self.history: list[dict] = []
        self.best: list[float | None] = [None] * cfg["model_num"]
        self.best_epochs: list[int | None] = [None] * cfg["model_num"]
        self.best_ensemble = 0.0
        self.meters: Meters | None = None  # a resumed partial epoch's meters
        self.run_info = {"resumed_from": [], "epoch_seconds": []}
        state = PeerState(self.arch, self.model, optimizer, self.scheduler, scaler, self.init_record)
        self.checkpointer = Checkpointer(cfg, ctx, logger, self.data, state, self.archs, self)
        self.watch = stall.StepWatch(logger, D.stall_timeout().total_seconds(), ctx.peer_of) if ctx.is_main else None

    def _resolve(self, model) -> tuple[Resolved, str, bool]:
        """Collective: what this run does with the config, the same record on every rank (a peer's choices as
        its replica 0 made them, AMP as rank 0's GPU takes it), logged once; and this rank's own AMP mode and
        memory format, which its step uses (they differ only on a job that mixes GPU kinds)."""
        cfg, ctx = self.cfg, self.ctx
        amp = resolve_amp(cfg["amp"], ctx.device)
        exchange, exchange_why = resolve_exchange(cfg)
        on, why = channels_last_choice(cfg["channels_last"], model, ctx.device, amp)
        stats, stats_why = peer_statistics(cfg, self.arch, self.init_record)
        mode, mode_why = compile_choice(cfg["compile"], ctx.device, 1 if self.frozen else ctx.replicas)  # no DDP
        mine = (amp, on, why, stats, stats_why, self.init_record, mode, mode_why)
        ranks = D.all_gather_objects((ctx.peer, *mine))  # rank order: a peer's replica 0 comes first
        first = {peer: rest for peer, *rest in reversed(ranks)}  # the lowest rank of each peer wins
        layouts = [first[k] for k in range(ctx.peers)]
        resume = cfg["resume"] if cfg["resume"] is not None or ctx.restart_count == 0 else "auto"
        run = Resolved(
            amp=ranks[0][1],
            exchange=exchange,
            exchange_why=exchange_why,
            channels_last=tuple(p[1] for p in layouts),
            channels_last_why=tuple(p[2] for p in layouts),
            normalize=tuple(p[3] for p in layouts),
            normalize_why=tuple(p[4] for p in layouts),
            init_from=tuple(p[5] for p in layouts),
            compile=tuple(p[6] for p in layouts),
            compile_why=tuple(p[7] for p in layouts),
            frozen=tuple(bool(cfg["frozen"] and cfg["frozen"][k]) for k in range(ctx.peers)),
            resume=resume,  # torchrun restarted the group after a failure: carry on from the checkpoint
            data_path=self.data.path,
            data_why=self.data.why,
            layout=tuple(ctx.layout),
            rank_order=ctx.order,
        )
        if ctx.restart_count > 0:
            self.logger.info(f"torchrun restart {ctx.restart_count}: resume={run.resume}")
        self.logger.info(f"exchange: {run.exchange} ({run.exchange_why})")
        for k, reason in enumerate(run.channels_last_why):
            self.logger.info(f"channels_last: peer {k + 1}: {reason}")
        if cfg["compile"] is not False:
            for k, reason in enumerate(run.compile_why):
                self.logger.info(f"compile: peer {k + 1}: {reason}")
        for k, (record, frozen) in enumerate(zip(run.init_from, run.frozen)):
            mean, std = run.normalize[k]
            origin = f"from {record['path']} ({record['kind']})" if record else "from its initialisation"
            self.logger.info(
                f"peer {k + 1}: {'frozen (a teacher: predicts, never steps), ' if frozen else ''}starts {origin}; "
                f"inputs normalised with mean {mean} std {std} ({run.normalize_why[k]})"
            )
        return run, amp, on

    def _log_data(self) -> None:
        data, cfg = self.data, self.cfg
        self.logger.info(
            f"data: {len(data.train)} train / {len(data.val)} val"
            + (f" / {len(data.test)} test" if data.test is not None else "")
            + f" images, {data.num_classes} classes; {cfg['model_num']} peers: "
            + ", ".join(peer_model_name(cfg, r) for r in range(cfg["model_num"]))
        )
        self.logger.info(f"data path: {data.path} ({data.why})")

    def _build_loaders(self) -> None:
        cfg, ctx, data = self.cfg, self.ctx, self.data
        shard, node = (ctx.replica, ctx.replicas), (ctx.local_rank, ctx.local_world_size)
        # The stream path decodes each sample once per job: the ranks of a node that train on the same rows
        # split them (collective: the decode groups).
        decode = D.decode_group(ctx) if data.path == "stream" and data.collate_fn is None else None
        self.shared_decode = decode is not None
        seed = cfg["seed"] + faults.seed_offset(ctx.rank)
        self.train_loader = make_train_loader(
            data.train, cfg["batch_size"], seed, cfg["num_workers"], ctx.device, shard,
            collate_fn=data.collate_fn, node=node, decode=decode,
        )  # fmt: skip
        self.val_loader, self.test_loader = (
            make_eval_loader(ds, 2 * cfg["batch_size"], cfg["num_workers"], ctx.device, shard, node, decode)
            if ds is not None
            else None
            for ds in (data.val, data.test)
        )
        self.steps_per_epoch = len(self.train_loader)

    # ------------------------------------------------------------------------------------- train state
    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "best_accuracies": self.best,
            "best_epochs": self.best_epochs,
            "best_ensemble_accuracy": self.best_ensemble,
            "run": self.run_info,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best = state["history"], list(state["best_accuracies"])
        self.best_epochs = list(state.get("best_epochs") or [None] * len(self.best))
        self.best_ensemble = state["best_ensemble_accuracy"]
        self.run_info = state["run"]

    def resume(self) -> None:
        """Collective: carry on from a checkpoint as ``resume`` says (a path, ``auto`` or None)."""
        resumed = self.checkpointer.load(self.run.resume)
        self._start_trackers(resumed is not None or self.ctx.restart_count > 0)  # a restart continues the run
        if resumed is None:
            return
        self.meters = resumed.meters
        self.run_info["resumed_from"].append(f"{resumed.path}@epoch{self.epoch}+step{self.step}")
        self.logger.info(f"resumed from {resumed.path}: {self.epoch} epoch(s) and {self.step} step(s) done")
        before = resumed.config.get("replicas")
        if before is not None and before != self.cfg["replicas"]:
            self.logger.info(
                f"replicas: the checkpoint was trained with {before} per peer, this run has "
                f"{self.cfg['replicas']} ({self.ctx.world_size} processes)"
            )

    def _start_trackers(self, resumed: bool) -> None:
        """Collective: rank 0 starts the trackers' run (a resumed one continues its run); a tracker that cannot
        start stops every rank with its line."""
        error = self.logger.start_run(public_config(self.cfg), self.run.record(), resumed)
        error = D.broadcast_object(error)
        if error:
            raise DMLError(error)

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> None:
        cfg, ctx, log = self.cfg, self.ctx, self.logger
        self.fit_started = time.time()
        if self.epoch >= cfg["epochs"]:
            log.info(f"nothing to train: the checkpoint already holds {self.epoch} epoch(s); raise epochs= to go on")
        first_epoch, compiled_before = self.epoch + 1, dynamo_counts()
        for epoch in range(first_epoch, cfg["epochs"] + 1):
            t0 = time.time()
            self.train_loader.set_epoch(epoch - 1, self.step)
            meters = train_one_epoch(
                self.peer, self.train_loader, ctx, cfg, self.run.exchange, epoch,
                start_step=self.step, meters=self.meters, logger=log, checkpointer=self.checkpointer, watch=self.watch,
            )  # fmt: skip
            self.meters, self.step = None, 0
            mode = self.run.compile[ctx.peer]
            if mode is not None and epoch == first_epoch:
                log.info(compile_report(self.peer.model, compiled_before, mode, self.compiled_parts))
            train = gather_meters(meters, ctx, epoch, self.steps_per_epoch - 1)  # sync point
            if self.scheduler is not None:
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
            else:  # a frozen rank 0 has no scheduler: StepLR's value
                lr = cfg["lr"] * cfg["gamma"] ** ((epoch - 1) // cfg["step_size"])
            stall.report_progress(epoch, self.steps_per_epoch, "evaluation")
            val = self._evaluate("val", self.val_loader)
            self.predictions = val["predictions"]  # the last evaluation's classes, for dml-compare's churn
            self._report_bad_images()  # collective
            self.epoch = epoch
            # The first epoch always sets a best (so every peer has a _best.pth), later ones when higher.
            for k, acc in enumerate(val["peer_acc"]):
                if self.best[k] is None or acc > self.best[k]:
                    self.best[k], self.best_epochs[k] = acc, epoch
            self.best_ensemble = max(self.best_ensemble, val["ensemble_acc"])
            self.history.append(
                {
                    "epoch": epoch,
                    "lr": lr,
                    **{key: [t[i] for t in train] for i, key in enumerate(TRAIN_KEYS)},
                    "val_loss": val["peer_loss"],
                    "val_acc": val["peer_acc"],
                    "ensemble_acc": val["ensemble_acc"],
                    "ensemble_loss": val["ensemble_loss"],
                    **{key: val[key] for key in COHORT_KEYS},
                }
            )
            self.run_info["epoch_seconds"].append(round(time.time() - t0, 3))
            self._log_epoch(self.history[-1])
            self.checkpointer.save(epoch, self.steps_per_epoch, last=epoch == cfg["epochs"])
            log.write_json(f"{cfg['experiment_name']}_summary.json", self.summary())
        self.checkpointer.wait()

    def _evaluate(self, split: str, loader) -> dict:
        """Collective: ``engine.evaluate`` of what the checkpoint holds (replica 0's buffers); a frozen peer
        predicts each split once."""
        take_first_replica_buffers(self.model, self.ctx)
        # (not where the node's ranks decode evaluation batches together: every rank must iterate its loader)
        memo = self.predicted.setdefault(split, {}) if self.frozen and not self.shared_decode else None
        return evaluate(self.model, loader, self.ctx, self.peer.amp, self.peer.channels_last, memo=memo)

    def _report_bad_images(self) -> None:
        """Collective: the files that ``bad_images: skip`` replaced since the last call, from every rank (each
        decodes a share), named once in the log and kept in the run facts (checkpoint, summary)."""
        mine, self.data.skipped = list(self.data.skipped), []  # the cache's, once
        for loader in (self.train_loader, self.val_loader, self.test_loader):
            if getattr(loader, "skipped", None):
                mine += loader.skipped
                loader.skipped = []
        seen = self.run_info.setdefault("bad_images", [])  # the files' paths
        found = {path: line for lines in D.gather_objects(mine) or [] for path, line in lines}
        for path in sorted(set(found) - set(seen)):
            self.logger.info(f"bad_images=skip: {found[path].split(';')[0]}; a grey stand-in takes its place")
            seen.append(path)

    def _log_epoch(self, h: dict) -> None:
        scalars = {"lr": h["lr"], "ensemble/val_acc": h["ensemble_acc"], "ensemble/val_loss": h["ensemble_loss"]}
        scalars.update({f"cohort/{key}": h[key] for key in COHORT_KEYS})
        frozen = self.run.frozen
        for k in range(self.cfg["model_num"]):
            for key in (*TRAIN_KEYS, "val_loss", "val_acc"):
                scalars[f"peer{k + 1}/{key}"] = h[key][k]
        self.logger.scalars(scalars, h["epoch"])

        def peer(k: int) -> str:
            if frozen[k] and len(self.history) > 1:  # a teacher's accuracy cannot change: logged once
                return f"peer{k + 1} {self.archs[k]} frozen"
            return (
                f"peer{k + 1} {self.archs[k]}{' frozen' if frozen[k] else ''} train "
                f"{h['train_loss'][k]:.3f}/{h['train_acc'][k]:.3f} val {h['val_loss'][k]:.3f}/{h['val_acc'][k]:.3f}"
            )

        self.logger.info(
            f"epoch {h['epoch']}/{self.cfg['epochs']} lr {h['lr']:.4g} | "
            + " | ".join(peer(k) for k in range(self.cfg["model_num"]))
            + f" | ensemble val acc {h['ensemble_acc']:.4f} | agreement {h['agreement']:.4f} "
            f"pairwise KL {h['pairwise_kl']:.4f} ensemble gain {h['ensemble_gain']:+.4f}"
        )

    def test(self) -> dict | None:
        """Collective: final peers and their ensemble on the test split (None when there is none)."""
        if self.test_loader is None:
            return None
        res = self._evaluate("test", self.test_loader)
        self._report_bad_images()  # collective
        self.logger.info(
            "test acc "
            + " ".join(f"peer{k + 1} {a:.4f}" for k, a in enumerate(res["peer_acc"]))
            + f" ensemble {res['ensemble_acc']:.4f}"
        )
        return {"peer_acc": res["peer_acc"], "peer_loss": res["peer_loss"], "ensemble_acc": res["ensemble_acc"]}

    def summary(self, test_results: dict | None = None) -> dict:
        cfg, last = self.cfg, self.history[-1] if self.history else None
        save_dir, exp, peers = cfg["save_dir"], cfg["experiment_name"], range(1, cfg["model_num"] + 1)
        return {
            "experiment_name": exp,
            "config": public_config(cfg),
            "resolved": self.run.record(),
            "classes": list(self.data.classes),
            "best_accuracies": [b or 0.0 for b in self.best],
            "avg_best_accuracy": sum(b or 0.0 for b in self.best) / len(self.best),
            "best_ensemble_accuracy": self.best_ensemble,
            "final_accuracies": last["val_acc"] if last else None,
            "final_ensemble_accuracy": last["ensemble_acc"] if last else None,
            "cohort": {key: last.get(key) for key in COHORT_KEYS} if last else None,  # what the peers agree on
            # the classes predicted on val/ at the last evaluation, in dataset order: peers, then the ensemble
            "final_predictions": self.predictions.tolist() if self.predictions is not None else None,
            "test_results": test_results,
            "bad_images_skipped": len(self.run_info.get("bad_images", [])),
            "history": self.history,
            "checkpoints": {
                "latest": latest_path(save_dir, exp),
                "best": [peer_path(save_dir, exp, k, "best") for k in peers],
                "final": [peer_path(save_dir, exp, k, "final") for k in peers],
            },
            "versions": versions(),
            "run": self.run_info,  # wall-clock facts: the only part that differs between equal runs
        }

    def finish(self) -> dict:
        """Collective: the test split, the summary (written by rank 0) and the results, on every rank."""
        test_results = self.test()
        self.run_info.update(
            {
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "elapsed_s": round(time.time() - self.fit_started, 3),
                "restarts": self.ctx.restart_count,
            }
        )
        summary = self.summary(test_results)
        path = os.path.join(self.cfg["log_dir"], f"{self.cfg['experiment_name']}_summary.json")
        self.logger.write_json(os.path.basename(path), summary)
        self.logger.artifacts([path, *(p for p in summary["checkpoints"]["best"] if p)])
        best = [f"{a:.4f}" for a in summary["best_accuracies"]]
        self.logger.info(
            f"done: best acc {best} (avg {summary['avg_best_accuracy']:.4f}), "
            f"best ensemble {self.best_ensemble:.4f}; summary in {path}"
        )
        return {**summary, "model": self.model.cpu(), "rank": self.ctx.rank, "summary_path": path}

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.checkpointer.close()


TRAIN_KEYS = ("train_loss", "train_ce", "train_kl", "train_acc")  # the columns of gather_meters' rows
COHORT_KEYS = ("agreement", "pairwise_kl", "ensemble_gain")  # engine.score_logits' figures of the cohort
