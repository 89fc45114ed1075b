"""The fit loop behind ``uts teach`` and the student of ``uts distill``.

One call of :func:`fit` trains a :class:`~uts_cli.model.cam.CamNet` on store patches, validates
after every epoch, and keeps the run directory up to date:

* ``history.csv``: one row per finished epoch (see ``uts_cli.io.rundir.HISTORY_FIELDS``);
* ``checkpoints/last.pt``: after every epoch, and on interruption at the end of the current step;
* ``checkpoints/best.pt``: when the selection score (``params.select``: the validation split's
  region-level localization F1 by default, or its image-level F1) is at least the best so far
  (ties go to the later epoch: equal F1 after more training is no worse, and small validation
  sets tie often);
* ``metrics.json``: status (complete / interrupted), best epoch and the final row.

Resuming (``resume=True``) restores the model, optimiser, scaler and random states from
``last.pt`` and continues where it stopped, mid-epoch included: an epoch's batch order is a
function of ``(seed, epoch)``, so the batches already trained are skipped and the running sums of
the epoch come from the checkpoint. History rows after the checkpoint are dropped, so the file has
neither gaps nor duplicates.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from uts_cli import distributed
from uts_cli.config import SCHEMA_VERSION, TeachConfig, to_dict
from uts_cli.data import batch_to_device, make_eval_loader, make_train_loader
from uts_cli.devices import AmpPolicy, configure_cpu_threads, resolve_amp
from uts_cli.errors import InputDataError, Interrupted
from uts_cli.io.rundir import RunDir
from uts_cli.io.store import PatchStore
from uts_cli.metrics import best_f1_threshold
from uts_cli.model.augment import AugmentConfig, augment_batch
from uts_cli.model.cam import CamNet
from uts_cli.model.checkpoint import build_checkpoint, changed_options, check_resumable, restore_states
from uts_cli.model.losses import image_loss_each, location_loss, trim_positives_mask
from uts_cli.model.optim import WeightEma, lr_factor, make_optimizer, reestimate_bn
from uts_cli.model.validate import region_sweep
from uts_cli.model.predict import iter_predictions
from uts_cli.reporting import NullReporter, Reporter

MONITOR = "val_f1"  # the image-level monitor (select image); see monitor_of


def monitor_of(params: TeachConfig) -> str:
    """The history column that chooses ``best.pt``."""
    return "val_loc_f1" if params.select == "localization" else "val_f1"


@dataclass
class StepInfo:
    """What an ``on_step`` callback sees after each finished training step."""

    epoch: int
    step: int            # 1-based within the epoch
    steps_in_epoch: int
    global_step: int


@dataclass
class FitResult:
    """Summary of a finished (or already complete) run."""

    status: str
    epochs_done: int
    best_epoch: int
    best_val_f1: float | None
    best_threshold: float
    history: list[dict]
    samples_per_s: float | None
    last_checkpoint: str
    best_checkpoint: str
    best_pixel_threshold: float | None = None
    pixel_threshold_at_edge: bool = False


class _LossReadout:
    """Loss values for the progress display without stalling a GPU.

    On CUDA the value is copied to pinned host memory asynchronously and read at the next call,
    by which time the copy has long finished; on CPU it is read at once.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffer = torch.zeros((), pin_memory=self.cuda)
        self.event = None

    def push(self, value: torch.Tensor) -> float | None:
        if not self.cuda:
            return float(value)
        previous = None
        if self.event is not None and self.event.query():
            previous = float(self.buffer)
        self.buffer.copy_(value.detach(), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return previous


# --------------------------------------------------------------------------------------------
# State kept across epochs and checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class _State:
    epoch: int = 0              # finished epochs
    step_in_epoch: int = 0      # finished steps of the current (unfinished) epoch
    global_step: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    best_threshold: float = 0.5
    best_pixel_threshold: float | None = None
    best_at_edge: bool = False
    sums: dict = field(default_factory=lambda: _zero_sums())


def _zero_sums() -> dict:
    return {"loss": 0.0, "ce": 0.0, "location": 0.0, "samples": 0, "seconds": 0.0}


class _StopRequested(Exception):
    pass


@contextlib.contextmanager
def _sigint_to_flag(enabled: bool, escalate: bool = True):
    """While active, Ctrl-C and SIGTERM only set ``flag["set"]``; a second Ctrl-C interrupts at once.

    SIGTERM is how schedulers (Slurm preemption, ``scancel``) and torchrun ask a process to
    stop, so it is treated like a first Ctrl-C. With ``escalate`` False (distributed runs) a
    repeated signal changes nothing: torchrun forwards the terminal's Ctrl-C a second time, and
    a rank that stopped on its own would leave its partners waiting in a collective.
    """
    flag = {"set": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["set"] and escalate and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["set"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Trainer:
    """The mutable parts of one fit call; :func:`fit` is its public face."""

    def __init__(self, model: CamNet, store: PatchStore, train_indices, val_indices,
                 params: TeachConfig, run: RunDir, device: torch.device, reporter: Reporter,
                 labels, stop, on_step):
        self.model, self.store, self.params, self.run = model, store, params, run
        self.device, self.reporter, self.stop, self.on_step = device, reporter, stop, on_step
        self.policy: AmpPolicy = resolve_amp(params.amp, device)
        self.channels_last = device.type == "cuda" if params.channels_last is None else params.channels_last
        self.train_indices = np.asarray(train_indices, dtype=np.int64)
        self.val_indices = np.asarray(val_indices, dtype=np.int64)
        self.labels = labels
        self.aug_cfg = AugmentConfig(elastic=params.strong_augmentation)
        self.state = _State()
        self.flag = {"set": False}
        self.dist = distributed.current()
        self.loss_weight = 1.0  # set per step in distributed runs (see train_epoch)

        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        # self.net is what trains (the DDP wrapper when distributed); self.model is the plain
        # network that is validated and saved.
        self.net = distributed.wrap_model(model, device, sync_bn=params.sync_bn)
        self.vote = distributed.StopVote(device)
        # fused on CUDA: one kernel for the whole update instead of about ten multi-tensor ones
        # (the launches, not the arithmetic, are what a small model's step waits on).
        self.optimizer = make_optimizer(model, params, fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.policy.needs_scaler)
        self.aug_gen = torch.Generator(device=device)
        self.aug_gen.manual_seed(distributed.rank_seed(params.seed, self.dist.rank))
        epoch_len = None if params.steps_per_epoch is None else params.steps_per_epoch * params.batch_size
        self.loader = make_train_loader(store, self.train_indices, params.batch_size, params.seed,
                                        params.workers, device, balance=params.balance,
                                        epoch_len=epoch_len, labels=labels,
                                        max_points=params.max_points, use_truth=params.use_truth,
                                        rank=self.dist.rank, world_size=self.dist.world_size)
        self.sampler = self.loader.batch_sampler
        self.steps_per_epoch = max(1, len(self.sampler))
        self.total_steps = params.epochs * self.steps_per_epoch
        # Created after the model is on its device, so the average lives there too.
        self.ema = WeightEma(model, params.ema_decay) if params.ema_decay > 0 else None
        self.bn_loader = None
        if params.bn_reestimate > 0:
            # A fixed random subset of the training patches in their natural class mix, unaugmented.
            rng = np.random.default_rng([params.seed, 7])
            n = min(len(self.train_indices), params.bn_reestimate * params.batch_size)
            subset = np.sort(rng.choice(self.train_indices, size=n, replace=False))
            self.bn_loader = make_eval_loader(store, subset, params.batch_size, 0, device, labels=labels)
        self.val_loader = None
        # Validation runs on rank 0 (the others wait for its result).
        if len(self.val_indices) and self.dist.is_main:
            self.val_loader = make_eval_loader(store, self.val_indices,
                                               params.val_batch_size or params.batch_size,
                                               params.workers, device, labels=labels)
            if params.workers > 0:
                # Fork the (persistent) validation workers now, while the process is small: forked
                # later, copy-on-write page faults slowed the next training steps by ~0.4 s.
                iter(self.val_loader)

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, threshold: float, val_f1: float | None, val: dict | None = None) -> dict:
        s = self.state
        counters = {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
                    "sums": dict(s.sums), "best": s.best_f1, "best_epoch": s.best_epoch,
                    "best_threshold": s.best_threshold, "best_pixel_threshold": s.best_pixel_threshold,
                    "best_at_edge": s.best_at_edge}
        val = val or {}
        extra = {"pixel_threshold": val.get("val_loc_threshold"), "val_loc_f1": val.get("val_loc_f1"),
                 "pixel_threshold_at_edge": bool(val.get("at_edge", False))}
        model = self.model
        if self.ema is not None:
            # "model" is what eval/distill/predict load: the averaged weights. The raw ones resume training.
            model = self.ema.module
            extra.update(train_model=self.model.state_dict(), ema_updates=self.ema.updates)
        return build_checkpoint(model=model, optimizer=self.optimizer, scaler=self.scaler,
                                aug_gen=self.aug_gen, counters=counters, threshold=threshold, val_f1=val_f1,
                                params=self.params, store_uuid=self.store.uuid, device=self.device, extra=extra)

    def restore(self) -> None:
        ck = self.run.load_checkpoint("last", map_location="cpu")
        check_resumable(ck, run_path=self.run.path, store=self.store, model=self.model)
        c = restore_states(ck, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                           aug_gen=self.aug_gen, device=self.device)
        if "train_model" in ck:
            self.model.load_state_dict(ck["train_model"])
            if self.ema is not None:
                self.ema.load_state_dict({"model": ck["model"], "updates": ck.get("ema_updates", 0)})
        bpt = c.get("best_pixel_threshold")
        self.state = _State(epoch=int(c["epoch"]), step_in_epoch=int(c["step_in_epoch"]),
                            global_step=int(c["global_step"]), best_f1=float(c["best"]),
                            best_epoch=int(c["best_epoch"]), best_threshold=float(c["best_threshold"]),
                            best_pixel_threshold=None if bpt is None else float(bpt),
                            best_at_edge=bool(c.get("best_at_edge") or False),
                            sums={**_zero_sums(), **(c["sums"] or {})})
        if self.dist.rank > 0:
            # The checkpoint holds rank 0's augmentation stream; the others draw their own.
            self.aug_gen.manual_seed(distributed.rank_seed(self.params.seed, self.dist.rank, self.state.global_step))
        changed = changed_options(ck.get("params", {}), self.params)
        if changed:
            self.reporter.warn(f"resuming with changed training options: {', '.join(changed)}")
        if self.dist.is_main:
            self.run.truncate_history(self.state.epoch)

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One optimisation step; ``self.loss_weight`` scales the loss back-propagated (not the one returned)."""
        p = self.params
        b = batch_to_device(batch, self.device)
        points, mask, labels = b.points, b.mask, b.labels
        # Scale first, then augment the float batch in place: fewer full-batch passes.
        x = self.model.prepare_input(b.images, channels_last=self.channels_last)
        if p.augment:
            x, points, mask, labels = augment_batch(x, points, mask, labels, self.aug_gen,
                                                    self.aug_cfg, fill=self.model.fill_value())
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)  # the per-sample select may change it
        with self.policy.autocast():
            logits, cam = self.net(x)
        ce_each = image_loss_each(logits, labels, p.image_loss, p.gce_q)
        if p.trim_positives > 0 and self.state.global_step >= self.steps_per_epoch:
            # After one epoch of plain training, so the losses rank what was learnt, not the init.
            keep = trim_positives_mask(ce_each, labels, p.trim_positives)
            ce = (ce_each * keep).sum() / keep.sum().clamp_min(1.0)
            mask = mask & keep.bool().unsqueeze(1)  # a suspect label's point is suspect too
        else:
            ce = ce_each.mean()
        loss = p.alpha_ce * ce
        loc = torch.zeros((), device=self.device)
        if p.location != "none":
            loc, _ = location_loss(cam, points, mask, labels, tuple(x.shape[-2:]), p.location,
                                   p.temperature, p.margin, p.tlb, self.model.upsample_stride)
            loss = loss + p.alpha_location * loc
        self.optimizer.zero_grad(set_to_none=True)
        weight = self.loss_weight
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        self.set_lr(self.state.global_step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach(), ce.detach(), loc.detach(), len(labels)

    def wants_stop(self) -> bool:
        return self.flag["set"] or (self.stop is not None and bool(self.stop()))

    def set_lr(self, step: int) -> None:
        factor = lr_factor(step, self.total_steps, self.params, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.params.lr * factor

    def check_stop(self) -> None:
        if self.wants_stop():
            raise _StopRequested

    # -- one epoch -----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> None:
        s = self.state
        self.sampler.set_epoch(epoch, skip_batches=s.step_in_epoch)
        n_steps = s.step_in_epoch + len(self.sampler)
        self.model.train()
        self.reporter.start(f"epoch {epoch}/{self.params.epochs}", n_steps)
        if s.step_in_epoch:
            self.reporter.advance(s.step_in_epoch)
        # Sums stay on the device until the epoch ends: reading them back every step would stall a GPU.
        acc = torch.zeros(3, device=self.device, dtype=torch.float64)
        readout = _LossReadout(self.device)
        samples = 0
        t0 = time.perf_counter()
        # DDP averages gradients over ranks; weighting each rank's mean loss by its share of the
        # global batch makes the step that of one process on the whole batch (slices may differ by one).
        world = self.dist.world_size
        global_sizes = self.sampler.global_batch_sizes() if world > 1 else []
        agreed = not self.dist.enabled  # False until the ranks have left the loop together

        def flush() -> None:
            nonlocal acc, samples
            vals = acc.tolist()
            if agreed and self.dist.enabled:
                # Every rank reaches this together, so the epoch's sums are the whole job's.
                *vals, samples = distributed.all_reduce_sum([*vals, samples], self.device)
                samples = int(samples)
            s.sums["loss"] += vals[0]
            s.sums["ce"] += vals[1]
            s.sums["location"] += vals[2]
            s.sums["samples"] += samples
            s.sums["seconds"] += time.perf_counter() - t0
            acc.zero_()
            samples = 0

        try:
            for batch in self.loader:
                if world > 1:
                    done = s.step_in_epoch - (n_steps - len(global_sizes))
                    self.loss_weight = len(batch.labels) * world / global_sizes[done]
                loss, ce, loc, n = self.train_step(batch)
                acc += torch.stack([loss, ce, loc]).double() * n
                samples += n
                s.step_in_epoch += 1
                s.global_step += 1
                metrics = {}
                if s.step_in_epoch % self.params.report_every == 0 or s.step_in_epoch == n_steps:
                    shown = readout.push(loss)
                    if shown is not None:
                        metrics = {"loss": shown}
                self.reporter.advance(1, **metrics)
                if self.on_step is not None:
                    self.on_step(StepInfo(epoch, s.step_in_epoch, n_steps, s.global_step))
                if not self.dist.enabled:
                    self.check_stop()
                elif self.vote.vote(self.wants_stop()):
                    agreed = True
                    raise _StopRequested
            if self.dist.enabled:
                agreed = True
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            flush()
            self.reporter.finish()

    def validate(self) -> dict:
        """Image-level and region-level localization scores of the validation split, from one pass."""
        if self.val_loader is None:
            return {"val_loss": None, "val_f1": None, "val_precision": None, "val_recall": None,
                    "threshold": 0.5, "val_loc_f1": None, "val_loc_precision": None, "val_loc_recall": None,
                    "val_loc_threshold": None, "at_edge": False}
        net = self.ema.module if self.ema is not None else self.model
        if self.bn_loader is not None:
            reestimate_bn(net, (net.prepare_input(batch_to_device(b, self.device).images,
                                                  channels_last=self.channels_last) for b in self.bn_loader))
        probs, labels = [], []

        def maps():
            for pred in iter_predictions(net, self.val_loader, self.device, amp=self.params.amp, want_cam=True,
                                         cam_dtype=np.float32):
                probs.append(pred.probs)
                labels.append(pred.labels)
                yield pred.indices, pred.cams
                self.check_stop()

        sweep = region_sweep(self.store, maps(), radius_px=self.params.radius_px, indices=self.val_indices)
        prob = np.concatenate(probs).astype(np.float64)
        lab = np.concatenate(labels) > 0.5
        clipped = np.clip(prob, 1e-7, 1 - 1e-7)
        val_loss = float(-np.mean(np.where(lab, np.log(clipped), np.log1p(-clipped))))
        choice = best_f1_threshold(prob, lab.astype(np.uint8))
        loc = sweep.best
        return {"val_loss": val_loss, "val_f1": choice.f1, "val_precision": choice.precision,
                "val_recall": choice.recall, "threshold": choice.threshold,
                "val_loc_f1": loc.f1, "val_loc_precision": loc.precision, "val_loc_recall": loc.recall,
                "val_loc_threshold": sweep.threshold, "at_edge": sweep.at_edge}

    def validate_everywhere(self) -> dict:
        """:meth:`validate` on rank 0, its result on every rank (a stop there stops them all)."""
        if not self.dist.enabled:
            return self.validate()
        val = None
        if self.dist.is_main:
            try:
                val = self.validate()
            except _StopRequested:
                val = None
        val = distributed.broadcast_object(val)
        if val is None:
            raise _StopRequested
        return val

    def run_epoch(self, epoch: int) -> dict:
        t_start = time.perf_counter()
        seconds_before = self.state.sums["seconds"]
        self.train_epoch(epoch)
        val = self.validate_everywhere()
        s = self.state
        n = max(1, s.sums["samples"])
        row = {
            "epoch": epoch, "train_loss": s.sums["loss"] / n, "loss_ce": s.sums["ce"] / n,
            "loss_location": s.sums["location"] / n if self.params.location != "none" else None,
            **{k: v for k, v in val.items() if k != "at_edge"}, "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - t_start + seconds_before, 3),
            "train_seconds": round(s.sums["seconds"], 3),
            "samples_per_s": round(s.sums["samples"] / max(s.sums["seconds"], 1e-9), 2),
            "n_train_samples": int(s.sums["samples"]),
        }
        s.epoch, s.step_in_epoch, s.sums = epoch, 0, _zero_sums()
        f1 = val[monitor_of(self.params)]
        improved = f1 is None or f1 >= s.best_f1
        if improved:
            s.best_f1 = -1.0 if f1 is None else float(f1)
            s.best_epoch, s.best_threshold = epoch, float(val["threshold"])
            s.best_pixel_threshold = val["val_loc_threshold"]
            s.best_at_edge = bool(val["at_edge"])

        def record() -> None:
            self.run.append_history(row)
            ck = self.checkpoint(val["threshold"], val["val_f1"], val)
            # last.pt commits the epoch, so it goes last: a kill between the two saves then resumes from
            # the previous epoch and redoes this one, instead of leaving best.pt an epoch behind.
            if improved:
                self.run.save_checkpoint("best", ck)
            self.run.save_checkpoint("last", ck)

        distributed.on_main(record)  # rank 0 writes; its errors stop every rank
        self.reporter.log(_epoch_line(row, improved))
        return row

    def metrics(self, status: str) -> dict:
        history = self.run.read_history()
        s = self.state
        return {"status": status, "monitor": monitor_of(self.params), "best_epoch": s.best_epoch,
                "best": None if s.best_epoch == 0 or s.best_f1 < 0 else s.best_f1,
                "best_threshold": s.best_threshold, "best_pixel_threshold": s.best_pixel_threshold,
                "pixel_threshold_at_edge": s.best_at_edge, "epochs_done": s.epoch,
                "final": history[-1] if history else None}


def _epoch_line(row: dict, improved: bool) -> str:
    def fmt(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    return (f"epoch {row['epoch']}: loss {fmt(row['train_loss'])}, val F1 {fmt(row['val_f1'])} "
            f"(P {fmt(row['val_precision'], '.3f')}, R {fmt(row['val_recall'], '.3f')}, "
            f"threshold {fmt(row['threshold'], '.3f')}), localization F1 {fmt(row.get('val_loc_f1'))} "
            f"(pixel threshold {fmt(row.get('val_loc_threshold'), '.2f')}), {row['samples_per_s']:.1f} samples/s"
            + (", best so far" if improved else ""))


def fit(model: CamNet, store: PatchStore, train_indices: Sequence[int], val_indices: Sequence[int],
        params: TeachConfig, run: RunDir, *, device: torch.device, reporter: Reporter | None = None,
        labels: np.ndarray | None = None, resume: bool = False,
        stop: Callable[[], bool] | None = None, on_step: Callable[[StepInfo], None] | None = None,
        handle_sigint: bool = True, run_config: dict | None = None) -> FitResult:
    """Train ``model`` and record everything in ``run``.

    Args:
        model: the network (initial weights already loaded; replaced from ``last.pt`` on resume).
        store: the patch store.
        train_indices: store indices to train on (already filtered, e.g. ``only_one_mitosis``).
        val_indices: store indices to validate on each epoch (empty: no validation; then every
            epoch counts as best and the threshold is 0.5).
        params: the run's options (only the training ones matter here; ``validate`` is called).
        run: a created (or, to resume, opened) :class:`RunDir`.
        device: the resolved device.
        reporter: progress sink (default :class:`NullReporter`).
        labels: optional ``(len(store),)`` labels replacing the store's (pseudo-labels).
        resume: continue from ``run``'s ``last.pt``.
        stop: polled after every step; returning True stops like Ctrl-C.
        on_step: called after every finished training step.
        handle_sigint: in the main thread, the first Ctrl-C finishes the current step before
            stopping (a second one stops at once).
        run_config: extra content for ``config.json`` on a fresh run (the caller's full config);
            ``schema_version``, ``config`` (``params``), ``model`` and ``store`` are added when absent.

    Returns:
        A :class:`FitResult`.

    Raises:
        Interrupted: Ctrl-C or ``stop``; ``last.pt`` and ``metrics.json`` (status interrupted)
            were written first.
        InputDataError: empty training set or one class missing, resume on another store, or a
            missing/damaged ``last.pt``.
        UsageError: invalid ``params`` or model options that differ from the resumed run.
    """
    params.validate()
    reporter = reporter or NullReporter()
    train_indices = np.asarray(train_indices, dtype=np.int64)
    _check_train_set(store, train_indices, labels)
    if device.type == "cpu":
        configure_cpu_threads()
    else:
        torch.backends.cudnn.benchmark = True  # fixed patch size: autotuned kernels pay off
    trainer = _Trainer(model, store, train_indices, val_indices, params, run, device, reporter,
                       labels, stop, on_step)
    if resume:
        trainer.restore()
        reporter.log(f"resuming {run.path} after epoch {trainer.state.epoch}"
                     + (f", step {trainer.state.step_in_epoch}" if trainer.state.step_in_epoch else ""))
    else:
        config = dict(run_config or {})
        config.setdefault("schema_version", SCHEMA_VERSION)
        config.setdefault("config", to_dict(params))
        config.setdefault("model", model.config())
        config.setdefault("store", {"path": str(store.path), "uuid": store.uuid, "n_patches": len(store),
                                    "n_train": int(len(train_indices)), "n_val": int(len(val_indices))})
        if trainer.dist.enabled:
            config.setdefault("distributed", {"world_size": trainer.dist.world_size,
                                              "backend": trainer.dist.backend})
        distributed.on_main(lambda: run.write_config(config))

    dist_ctx = trainer.dist
    with _sigint_to_flag(handle_sigint, escalate=not dist_ctx.enabled) as flag:
        trainer.flag = flag
        try:
            for epoch in range(trainer.state.epoch + 1, params.epochs + 1):
                trainer.run_epoch(epoch)
                if trainer.vote.settle(trainer.wants_stop()):
                    raise _StopRequested
        except (KeyboardInterrupt, _StopRequested):
            distributed.on_main(lambda: _save_interrupted(trainer))
            s = trainer.state
            where = f"epoch {s.epoch + 1}, step {s.step_in_epoch}" if s.step_in_epoch else f"epoch {s.epoch}"
            exc = Interrupted(f"training interrupted after {where}; saved {run.checkpoint_path('last')}",
                              hint="rerun the same command with --resume to continue")
            exc.mirrored = not dist_ctx.is_main  # type: ignore[attr-defined]  # rank 0 reports it
            raise exc from None
        except Exception as exc:
            # Caught here, before the signal handlers are restored: torchrun's SIGTERM to the
            # survivors must not cut the message short.
            lost = exc if isinstance(exc, distributed.PeerLost) else None
            if lost is None and dist_ctx.enabled and distributed.is_peer_failure(exc):
                lost = distributed.peer_lost(exc, resume_hint=f"rerun the same command with --resume to "
                                                              f"continue from {run.checkpoint_path('last')}")
            if lost is None:
                raise
            if dist_ctx.is_main:
                with contextlib.suppress(Exception):  # best effort: the partners are gone
                    run.write_metrics(trainer.metrics("failed"))
            raise lost from None

    distributed.on_main(lambda: run.write_metrics(trainer.metrics("complete")))
    history = distributed.on_main(run.read_history)
    s = trainer.state
    return FitResult(status="complete", epochs_done=s.epoch, best_epoch=s.best_epoch,
                     best_val_f1=None if s.best_f1 < 0 else s.best_f1, best_threshold=s.best_threshold,
                     history=history, samples_per_s=history[-1]["samples_per_s"] if history else None,
                     last_checkpoint=str(run.checkpoint_path("last")),
                     best_checkpoint=str(run.checkpoint_path("best")),
                     best_pixel_threshold=s.best_pixel_threshold, pixel_threshold_at_edge=s.best_at_edge)


def _save_interrupted(trainer: _Trainer) -> None:
    ck = trainer.checkpoint(trainer.state.best_threshold, None)
    trainer.run.save_checkpoint("last", ck)
    trainer.run.write_metrics(trainer.metrics("interrupted"))


def _check_train_set(store: PatchStore, indices: np.ndarray, labels: np.ndarray | None) -> None:
    if len(indices) == 0:
        raise InputDataError(f"no training patches in {store.path}",
                             hint="check the store's splits, or the distillation filter that kept none")
    lab = (store.label if labels is None else np.asarray(labels))[indices] > 0.5
    n_pos = int(lab.sum())
    if n_pos == 0 or n_pos == len(lab):
        which = "positive" if n_pos == 0 else "negative"
        raise InputDataError(f"the training set has no {which} patches ({len(lab)} patches, {n_pos} positive)",
                             hint="image-level training needs both classes; check the store or the filter")
