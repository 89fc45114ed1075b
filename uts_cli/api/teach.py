"""``teach``: train the weakly supervised teacher (image-level labels only) into a run folder.

The same ``train_run`` trains the student of ``distill`` on a filtered index set.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uts_cli.config import SCHEMA_VERSION, TeachConfig, check_schema_version, to_dict
from uts_cli.errors import InputDataError, UsageError, library_errors
from uts_cli.io.rundir import RunLogReporter, check_run_name, collect_env, resolve_run
from uts_cli.io.store import PatchStore
from uts_cli.reporting import NullReporter, Reporter



@dataclass
class TeachResult:
    run: Path
    status: str
    epochs_done: int
    best_epoch: int
    best_val_f1: float | None      # best value of the selection score (see ``select``)
    threshold: float
    pixel_threshold: float
    pixel_threshold_val_f1: float | None
    pixel_threshold_at_edge: bool
    select: str
    n_train: int
    n_val: int
    device: str
    samples_per_s: float | None
    seconds: float
    history: list[dict] = field(default_factory=list)


def median_pixel_size(store: PatchStore) -> float | None:
    sizes = store.image_pixel_size[np.isfinite(store.image_pixel_size)]
    return float(np.median(sizes)) if len(sizes) else None


def train_run(cfg: TeachConfig, reporter: Reporter | None = None, *, train_indices: np.ndarray | None = None,
              val_indices: np.ndarray | None = None, labels: np.ndarray | None = None,
              extra_config: dict | None = None, command: str = "teach", prepared: bool = False) -> TeachResult:
    """Train one CAM network into ``cfg.runs_dir / cfg.name`` and record what later commands need.

    Under torchrun every process calls this; they train one DistributedDataParallel model
    (``cfg.batch_size`` is the global batch) and rank 0 alone writes the run folder. Every rank
    returns the same result.

    Args:
        cfg: model, optimisation and run options.
        reporter: progress sink.
        train_indices / val_indices: store indices to use (default: the store's train split, with
            the at-most-one-mitosis filter when ``cfg.only_one_mitosis``, and its val split).
        labels: per-store-patch labels replacing the annotations (pseudo-labels).
        extra_config: more sections for ``config.json`` (distill records its teacher here).
        command: the command name recorded in ``config.json``.
        prepared: the caller created the run folder already (distill writes its files there
            first); a fresh run then trains into it instead of creating it.

    Returns:
        Summary of the run.

    Raises:
        UsageError: bad options, or the run exists without ``resume``/``overwrite``.
        InputDataError: bad store, nothing to train on, or a damaged run to resume.
        ResourceError: the device is unavailable or weights cannot be had offline.
    """
    from uts_cli import distributed

    with distributed.session(cfg.device) as (ctx, device):
        with distributed.peer_guard():
            return _train_run(cfg, reporter, ctx, device, train_indices=train_indices, val_indices=val_indices,
                              labels=labels, extra_config=extra_config, command=command, prepared=prepared)


def _train_run(cfg: TeachConfig, reporter: Reporter | None, ctx, device, *, train_indices, val_indices, labels,
               extra_config, command, prepared) -> TeachResult:
    import torch

    from uts_cli import __version__, distributed
    from uts_cli.data import only_one_mitosis
    from uts_cli.devices import device_summary
    from uts_cli.io.rundir import RunDir
    from uts_cli.model.cam import CamNet, load_backbone_weights
    from uts_cli.model.fit import fit
    from uts_cli.model.predict import load_run_model
    from uts_cli.model.validate import SWEEP
    from uts_cli.plots import plot_history

    # Only rank 0 reports: the others would repeat the same lines.
    reporter = distributed.rank_reporter(reporter or NullReporter())
    t0 = time.monotonic()
    # Recorded absolute, so `eval` and `distill` find the store from any working directory.
    cfg = dataclasses.replace(cfg, store=Path(cfg.store).resolve())
    check_run_name(cfg.name)
    cfg.validate()
    store = PatchStore(cfg.store)
    if cfg.use_truth and not store.has_truth:
        raise UsageError(f"--use-truth needs a store with a clean truth; {store.path} has none",
                         hint="use a synthetic store (uts prepare synthetic), or drop --use-truth")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)

    if train_indices is None:
        train_indices = store.indices("train")
        if cfg.only_one_mitosis:
            train_indices = only_one_mitosis(store, train_indices)
    if val_indices is None:
        val_indices = store.indices("val")
    if len(train_indices) == 0:
        raise InputDataError(f"no training patches in {store.path}",
                             hint="check the store's splits (uts prepare --splits) or use another store")

    if cfg.sync_bn and not ctx.enabled:
        reporter.warn("--sync-bn has no effect in a single process (it matters under torchrun)")
    if cfg.sync_bn and ctx.enabled and device.type != "cuda":
        # Checked before the run folder exists, so a retry without the flag needs no --overwrite.
        raise UsageError("--sync-bn needs GPUs (torch's SyncBatchNorm does not run on CPU)",
                         hint="drop --sync-bn, or run on CUDA devices")
    run = RunDir(resolve_run(cfg.name, cfg.runs_dir))
    env = {**collect_env(device), **({"world_size": ctx.world_size} if ctx.enabled else {})}
    resuming = cfg.resume and run.has_checkpoint("last")
    model = CamNet(arch=cfg.arch, n_blocks=cfg.n_blocks, aggregation=cfg.aggregation, mode=cfg.mode,
                   input_norm=cfg.input_norm, upsample=cfg.cam_upsample, norm=cfg.norm,
                   width=cfg.width)
    if not resuming:
        # Before the run folder is made: a bad --weights file leaves nothing a retry must --overwrite.
        load_backbone_weights(model, cfg.weights)
    if cfg.resume and not resuming:
        # Killed before its first checkpoint (or before its folder existed): nothing to resume,
        # so start from the beginning.
        reporter.log(f"no checkpoint to resume in {run.path}; starting the run from the beginning")

        def restart() -> None:
            run.restart()
            run.write_env(env)

        distributed.on_main(restart)
    elif resuming:
        # Every rank reads the checkpoint to resume, so the run must be on a filesystem all nodes see.
        run.open_existing()
        check_schema_version(run.read_config(), run.config_path)
    else:
        def create() -> None:
            if not prepared:
                run.create(overwrite=cfg.overwrite)
            # Every run records what it ran on and keeps a plain-text log of what it reported.
            run.write_env(env)

        distributed.on_main(create)
    if resuming and ctx.is_main:
        run.add_resumed_env(env)
    if ctx.is_main:
        reporter = RunLogReporter(reporter, run)
    where = f", {ctx.world_size} processes ({ctx.backend})" if ctx.enabled else ""
    reporter.log(f"{command} {'resumed' if resuming else 'started'}: run {run.path}, store {cfg.store}, "
                 f"device {device}{where}")
    run_config = {
        "command": command,
        "uts_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "config": to_dict(cfg),
        "input_size": store.patch_size,
        "pixel_size_um": median_pixel_size(store),
        "stain": {"method": store.stain, "state": store.stain_state},
        "device": {"requested": cfg.device, **device_summary(device)},
        **(extra_config or {}),
    }
    fit_result = fit(model.to(device), store, train_indices, val_indices, cfg, run, device=device,
                     reporter=reporter, labels=labels, resume=resuming, run_config=run_config)

    def finish() -> tuple[float, float, float | None, bool]:
        # The best checkpoint holds both thresholds chosen on val at its epoch: the image-level one
        # and the pixel threshold of the best region-level localization F1.
        _, info = load_run_model(run, "best", "cpu")
        threshold = float(info["threshold"])
        pixel_threshold, pixel_f1, at_edge = threshold, None, False
        if cfg.pixel_threshold == "localization" and len(val_indices) and info["pixel_threshold"] is not None:
            pixel_threshold, pixel_f1 = float(info["pixel_threshold"]), info["val_loc_f1"]
            at_edge = bool(info["pixel_threshold_at_edge"])
            if at_edge:
                reporter.warn(f"the pixel threshold chosen on val ({pixel_threshold:.2f}) is at the edge of the "
                              f"sweep ({SWEEP[0]:.2f} to {SWEEP[-1]:.2f}): localization may be degenerate "
                              "(check history.csv and the run's val F1); recorded in config.json")
        config = run.read_config()
        config.update({"threshold": threshold, "pixel_threshold": pixel_threshold,
                       "pixel_threshold_mode": cfg.pixel_threshold, "pixel_threshold_val_f1": pixel_f1,
                       "pixel_threshold_at_edge": at_edge,
                       "pixel_threshold_sweep": [float(SWEEP[0]), float(SWEEP[-1])],
                       "select": cfg.select, "best_epoch": fit_result.best_epoch})
        run.write_config(config)
        metrics = run.read_metrics()
        metrics.update({"threshold": threshold, "pixel_threshold": pixel_threshold,
                        "pixel_threshold_at_edge": at_edge})
        run.write_metrics(metrics)
        try:
            plot_history(run.history_path, run.path / "history.png",
                         monitor="val_loc_f1" if cfg.select == "localization" else "val_f1")
        except Exception as exc:  # a missing plot must not fail a finished training
            reporter.warn(f"could not draw the training curve: {exc}")
        return threshold, pixel_threshold, pixel_f1, at_edge

    # Rank 0 reads the thresholds and writes them down; the others wait for them.
    threshold, pixel_threshold, pixel_f1, at_edge = distributed.on_main(finish)
    return TeachResult(
        run=run.path, status=fit_result.status, epochs_done=fit_result.epochs_done,
        best_epoch=fit_result.best_epoch, best_val_f1=fit_result.best_val_f1, threshold=threshold,
        pixel_threshold=pixel_threshold, pixel_threshold_val_f1=pixel_f1, pixel_threshold_at_edge=at_edge,
        select=cfg.select, n_train=int(len(train_indices)),
        n_val=int(len(val_indices)), device=str(device), samples_per_s=fit_result.samples_per_s,
        seconds=round(time.monotonic() - t0, 2), history=fit_result.history)


@library_errors
def teach(cfg: TeachConfig, reporter: Reporter | None = None) -> TeachResult:
    """Train the teacher on the store's training split with image-level labels only."""
    return train_run(cfg, reporter)
