"""The training loop: one loop, three modes.

- ``baseline``: every stage trains the whole run (plain cosine annealing).
- ``freezeout``: FreezeOut's per-stage schedule; frozen stages run forward
  only (no parameter needs a gradient) in eval mode and leave the optimizer.
- ``prefast``: like freezeout, but the frozen prefix's output is materialized
  once into the activation store and later epochs start from the cache, so the
  prefix is not computed at all (see ``prefast/caching/materialize.py``).

Sample order per epoch is ``epoch_order(seed, epoch)`` in every mode. The
loop knows nothing about caches: it asks its feed (``prefast/data/sources.py``) for
batches and runs ``model(x, start=batch.start)``. A step never waits for the
device: losses and hit counts add up on it and are read once per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

import prefast.distributed as distributed
import prefast.training.checkpoint as checkpoint
from prefast.caching.costmodel import StageCost
from prefast.caching.replay import load_plan
from prefast.config import TrainConfig
from prefast.data.sources import Batch, Feed, batch_loss
from prefast.errors import TrainingDivergedError
from prefast.models.staged import remember_state
from prefast.store.device import to_host
from prefast.training.build import build_run, deterministic_kernels, schedule_for
from prefast.training.gradnorms import meter_for
from prefast.training.optimizer import drop_from_optimizer, make_optimizer
from prefast.training.progress import bar_shown, epoch_lines
from prefast.training.record import run_record

log = logging.getLogger("prefast")


class Trainer:
    """Owns model, optimizer, schedule and feed for one run. Use :func:`train`.

    Takes what :func:`train` takes. ``costs`` are per-stage costs measured
    beforehand, so the prefast feed does not probe again (tests use it).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module | None = None,
        train_data: Dataset | None = None,
        test_data: Dataset | None = None,
        *,
        on_epoch: Callable[[dict], None] | None = None,
        data_id: str | None = None,
        costs: list[StageCost] | None = None,
        plan: list[dict] | None = None,
    ):
        self.dist = distributed.from_env()
        distributed.init(self.dist, cfg.dist_timeout)
        cfg, self.model, self.raw = build_run(cfg, model, train_data, test_data, data_id, self.dist)
        self.cfg, self.device = cfg, self.raw.device
        try:  # refused after the data source started (workers, threads): stop it
            self.custom_model = model is not None
            # GPU habits, each switchable: bf16 autocast, channels_last, cuDNN autotuning.
            cuda = self.device.type == "cuda"
            self.amp = cuda and cfg.amp
            self.channels_last = cuda and cfg.channels_last
            if cuda:
                # fixed shapes: tune once (autotuning may pick other kernels on every run)
                torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
                deterministic_kernels(cfg.deterministic)
            if self.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
            self.replicas = distributed.Replicas(
                self.dist, self.model, lambda: self.model.num_frozen
            )
            self.opt = make_optimizer(self.model, cfg.lr)
            self.schedule = schedule_for(cfg, self.model.num_stages, self.raw.batches_per_epoch)
            warning = self.schedule.scaling_warning() if cfg.mode != "baseline" else None
            if warning and self.dist.is_main:
                log.warning(warning)
            # --freeze auto: per-stage gradient norms summed on the device, read per interval
            self.meter = meter_for(self.model, self.device, self.schedule)
            self.on_epoch = on_epoch
            self.history: list[dict] = []
            self.start_epoch = 0
            self.resume_feed: dict | None = None  # the feed's state in the checkpoint
            if cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).exists():
                self._load_checkpoint(Path(cfg.checkpoint))
                # The schedule that runs from here: the checkpoint's frozen stages stay frozen,
                # the rest follow this run's schedule (its epoch count may differ); the prefast
                # feed plans its boundaries from this very schedule.
                at = self.start_epoch * self.raw.batches_per_epoch
                self.schedule = self.schedule.resumed(self.model.num_frozen, at)
            self.feed: Feed = self.raw
            self.feed_setup_s = 0.0  # counted in wall_s: it is part of what prefast costs
            if cfg.mode == "prefast":
                from prefast.caching.materialize import PrefastFeed

                t = time.perf_counter()
                self.feed = PrefastFeed(
                    cfg,
                    self.raw,
                    self.model,
                    self.schedule,
                    self.device,
                    self._autocast,
                    costs,
                    self.dist,
                    amp=self.amp,
                    resume=self.resume_feed,
                    replay=load_plan(cfg.plan_from) if cfg.plan_from else plan,
                )
                self.feed_setup_s = time.perf_counter() - t
        except BaseException:
            self.raw.close()
            raise

    # -- one iteration -------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA: the step, evaluation and the prefix run that fills a cache."""
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _apply_schedule(self, it: int) -> int:
        """Freeze newly frozen stages and set every trainable stage's rate."""
        if self.cfg.mode != "baseline" or self.schedule.prefix:
            newly = self.model.freeze_prefix(self.schedule.frozen_prefix(it))
            if newly:
                drop_from_optimizer(self.opt, newly)
        for group in self.opt.param_groups:
            group["lr"] = self.schedule.lr(group["stage"], it)
        return self.model.num_frozen

    def _step(self, batch: Batch, it: int) -> torch.Tensor:
        """One optimizer step; returns the loss, detached, on the device (no host sync)."""
        self._apply_schedule(it)
        x = batch.x
        if self.channels_last and x.dim() == 4:  # match the model's layout
            x = x.contiguous(memory_format=torch.channels_last)
        # Frozen stages past batch.start run here too: their parameters need no
        # gradient and they stay in eval mode, so autograd records nothing for them.
        with self._autocast():
            out = self.replicas.module()(x, start=batch.start)  # DDP under torchrun
            loss = batch_loss(out.float(), batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.meter is not None:
            self.meter.add()  # device ops only: read at the interval's end, outside the step
        self.opt.step()
        return loss.detach()

    # -- epochs ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)  # summed on the device
        total = 0
        with self._autocast(), contextlib.closing(self.feed.test_batches()) as batches:
            for batch in batches:
                pred = self.model(batch.x, start=batch.start).argmax(1)
                correct += (pred == batch.y).sum()
                total += len(batch.ids)
        self.model.train()
        mine = int(to_host(correct))  # the evaluation's one read of the device
        hits, seen = distributed.all_sum(self.dist, mine, total)  # every test row once
        return hits / max(1, seen)

    def run_epoch(self, epoch: int, progress: bool = False) -> dict:
        from prefast.training.progress import epoch_bar

        bpe = self.raw.batches_per_epoch
        t0 = time.perf_counter()
        # Freeze first, so the feed hashes and caches the prefix's final weights.
        self.feed.begin_epoch(epoch, self._apply_schedule(epoch * bpe))
        # Summed on the device: adding a step's loss never waits for the step to finish
        # (float64 where the device has it).
        wide = torch.float32 if self.device.type == "mps" else torch.float64
        losses = torch.zeros((), dtype=wide, device=self.device)
        steps, samples = 0, 0
        with (
            epoch_bar(epoch, self.cfg.epochs, bpe, enabled=progress) as advance,
            contextlib.closing(self.feed.train_batches(epoch)) as batches,
        ):
            for batch in batches:
                losses += self._step(batch, epoch * bpe + steps)
                steps, samples = steps + 1, samples + len(batch.ids)
                if self.meter is not None:  # --freeze auto decides between steps
                    self.meter.after_step(epoch * bpe + steps, self.dist, bpe)
                advance()
        loss_sum = float(to_host(losses))  # the epoch's one read of the device
        # Summed over ranks before the feed finishes its caches: a NaN on any rank stops
        # every rank here, and no view of this epoch is ever marked complete.
        loss_all, steps_all = distributed.all_sum(self.dist, loss_sum, steps)
        if not math.isfinite(loss_all):
            cause = self.feed.input_fault() or self.schedule.divergence_cause()
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch + 1}: the mean training loss is {loss_all}."
                f" Likely cause: {cause}. No cache holding non-finite values was kept."
            )
        self.feed.end_epoch(epoch)
        self.replicas.sync_buffers()
        t_eval = time.perf_counter()
        test_acc = self.evaluate()
        t_end = time.perf_counter()
        return {
            "epoch": epoch,
            "train_loss": loss_all / max(1, steps_all),  # over every rank's steps
            "test_acc": test_acc,
            "time_s": t_end - t0,
            # Where the epoch went; cache I/O is included in train_s/eval_s.
            "train_s": t_eval - t0,
            "eval_s": t_end - t_eval,
            "steps": steps,
            "samples": samples,
            "frozen_stages": self.model.num_frozen,
            "num_stages": self.model.num_stages,
            # cache_tier: what the epoch's training batches were read from (None: raw data)
            **distributed.slowest_data_wait(self.dist, self.feed.take_epoch_stats()),
            **self._check_replicas(),
        }

    def _check_replicas(self) -> dict:
        """--check-replicas: every rank's weights and buffers must be identical."""
        if not (self.dist.enabled and self.cfg.check_replicas):
            return {}
        digests = distributed.gather(self.dist, distributed.state_digest(self.model))
        if len(set(digests)) != 1:
            raise distributed.DistributedError(f"replicas diverged: weight digests {digests}")
        return {"replicas_in_sync": True, "weights_digest": digests[0]}

    def run(self, progress: bool = False) -> dict:
        t_start = time.perf_counter()
        self.model.train()
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                record = self.run_epoch(epoch, progress)
                self.history.append(record)
                if self.on_epoch:
                    self.on_epoch(record)
                if self.cfg.checkpoint:  # every rank's feed state, rank 0 alone writes
                    feeds = distributed.gather(self.dist, self.feed.state())
                    if self.dist.is_main:
                        self._save_checkpoint(Path(self.cfg.checkpoint), epoch + 1, feeds)
        except RuntimeError as exc:
            if distributed.is_collective_failure(exc):  # not a local error: say so plainly
                raise distributed.lost(self.dist, exc) from exc
            raise
        finally:
            self.feed.close()
            self.replicas.close()
        return run_record(
            self.cfg,
            self.model,
            "custom" if self.custom_model else self.model.name,
            self.raw,
            self.history,
            self.schedule,
            self.dist,
            self.feed.report(),
            wall_s=time.perf_counter() - t_start + self.feed_setup_s,
            feed_setup_s=self.feed_setup_s,
        )

    # -- checkpoints (prefast/training/checkpoint.py) ---------------------------------------
    def _save_checkpoint(self, path: Path, next_epoch: int, feeds: list[dict]) -> None:
        checkpoint.save(
            path,
            {
                "next_epoch": next_epoch,
                "num_frozen": self.model.num_frozen,
                "model": checkpoint.host_state(self.model.state_dict()),
                "optimizer": checkpoint.host_state(self.opt.state_dict()),
                "history": self.history,
                "config": self.cfg.to_json(),
                "world": self.dist.world,
                "feeds": feeds,  # every rank's, by rank
                # --freeze auto: the rule's decisions and the interval in progress
                **({"freeze_rule": self.meter.state()} if self.meter is not None else {}),
            },
        )

    def _load_checkpoint(self, path: Path) -> None:
        ck = checkpoint.load(path, self.cfg, self.dist)
        if self.meter is not None:
            self.meter.load_state(ck.freeze_rule or {})
        self.model.load_state_dict(ck.model)
        drop_from_optimizer(self.opt, self.model.freeze_prefix(ck.num_frozen))
        self.opt.load_state_dict(ck.optimizer)
        self.history, self.start_epoch, self.resume_feed = ck.history, ck.next_epoch, ck.feed
        log.info("resumed from %s at epoch %d", path, self.start_epoch + 1)


def train(
    cfg: TrainConfig,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    *,
    model: nn.Module | None = None,
    train_data: Dataset | None = None,
    test_data: Dataset | None = None,
    data_id: str | None = None,
    plan: list[dict] | None = None,
) -> dict:
    """Train and return the run record (the ``--json-out`` document).

    Parameters
    ----------
    cfg
        The run configuration. ``cfg.model``/``depth``/``growth_rate``/``width``
        are ignored when ``model`` is given, ``cfg.dataset`` when the data is.
    progress
        A progress bar per epoch on a terminal; into a pipe or a file, one plain line
        per epoch on stderr.
    on_epoch
        Called with each epoch's record (the ``epochs`` entries of the result).
    model
        A :class:`~prefast.StagedModel`, an ``nn.Sequential`` (each child a stage, the
        last the head) or a torchvision or timm model docs/models.md lists. Trained in
        place; then each parameter's ``requires_grad`` and module's mode are as passed.
    train_data, test_data
        Any map-style ``torch.utils.data.Dataset`` yielding ``(tensor, int)``;
        its transform is the augmentation. Read through a DataLoader with
        ``cfg.workers`` processes, in the same (seed, epoch) order as every mode.
    data_id
        Names the data in cache keys instead of a digest of it.
    plan
        Boundaries to replay in prefast mode (``[{"epoch", "stage", "tier", "dtype"}]``,
        as a record's ``final["plan"]``); ``cfg.plan_from`` reads them from a file.
    """
    restore = remember_state(model) if model is not None else lambda: None
    report = epoch_lines(cfg.epochs, on_epoch) if progress and not bar_shown() else on_epoch
    try:
        trainer = Trainer(
            cfg, model, train_data, test_data, on_epoch=report, data_id=data_id, plan=plan
        )
        return trainer.run(progress=progress)
    finally:
        restore()
