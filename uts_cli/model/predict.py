"""Patch-level inference: image probabilities and (optionally) CAM probability maps.

Used by validation during training, by distillation and by evaluation. Results come out one
batch at a time (:class:`PredictionBatch`), so a caller can stitch CAMs into whole fields and drop
them; nothing store-sized is ever accumulated here except by :func:`predict_scores`, which keeps
only one float per patch.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from uts_cli.data import batch_to_device, make_eval_loader
from uts_cli.devices import resolve_amp
from uts_cli.errors import InputDataError, UsageError, first_line
from uts_cli.io.rundir import RunDir
from uts_cli.io.store import PatchStore
from uts_cli.model.cam import CamNet, batch_norm_layers


class PredictionBatch(NamedTuple):
    """Predictions for one batch of patches (numpy, on the host)."""

    indices: np.ndarray        # int64 (b,) store indices, in the order asked
    probs: np.ndarray          # float32 (b,) image-level probability sigmoid(logit)
    labels: np.ndarray         # float32 (b,) the labels the loader carried (store or override)
    cams: np.ndarray | None    # (b, P, P) sigmoid of the upsampled CAM logits, or None


@contextlib.contextmanager
def bn_adaptation(model: nn.Module):
    """BatchNorm layers normalise with each batch's own statistics, without touching the weights.

    Inside the block every BatchNorm is in training mode with ``track_running_stats`` off, so
    running means/variances (and their counters) stay exactly as trained; both are restored after.
    """
    bns = batch_norm_layers(model)
    if not bns:
        raise UsageError("--bn-adapt adapts BatchNorm statistics; this network has none (--norm group)",
                         hint="drop --bn-adapt")
    saved = []
    for m in bns:
        saved.append((m, m.training, m.track_running_stats))
        m.train(True)
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m, training, track in saved:
            m.train(training)
            m.track_running_stats = track


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def iter_predictions(model: CamNet, loader, device: torch.device, amp: str | bool = "auto",
                     want_cam: bool = False, bn_adapt: bool = False,
                     cam_dtype=np.float16) -> Iterator[PredictionBatch]:
    """Run ``model`` over a loader of :class:`~uts_cli.data.PatchBatch` and yield per batch.

    Args:
        model: the network, already on ``device``.
        loader: an iterable of ``PatchBatch`` (e.g. :func:`uts_cli.data.make_eval_loader`).
        device: the device.
        amp: mixed precision (see :func:`uts_cli.devices.resolve_amp`).
        want_cam: also return CAM probability maps at patch resolution.
        bn_adapt: batch-norm adaptation (see :func:`bn_adaptation`); results then depend on the
            batch composition.
        cam_dtype: numpy dtype of the returned maps (float16 halves host memory).

    Yields:
        :class:`PredictionBatch`.
    """
    policy = resolve_amp(amp, device)
    adapt = bn_adaptation(model) if bn_adapt else contextlib.nullcontext()
    with _eval_mode(model), adapt:
        for batch in loader:
            b = batch_to_device(batch, device)
            # NHWC input on every device: oneDNN and cuDNN both run it faster (1.6x on 2 CPU cores).
            x = model.prepare_input(b.images, channels_last=True)
            with policy.autocast():
                logits, cam = model(x)
            probs = torch.sigmoid(logits.float()).cpu().numpy()
            cams = None
            if want_cam:
                size = tuple(b.images.shape[1:3])
                up = torch.sigmoid(model.upsample(cam.float(), size))[:, 0]
                cams = up.to(torch.float16 if cam_dtype == np.float16 else torch.float32).cpu().numpy()
            yield PredictionBatch(batch.indices.numpy(), probs, batch.labels.numpy(), cams)


def predict_patches(model: CamNet, store: PatchStore, indices: Sequence[int], device: torch.device,
                    batch_size: int = 32, amp: str | bool = "auto", want_cam: bool = False,
                    bn_adapt: bool = False, workers: int = 0, labels: np.ndarray | None = None,
                    cam_dtype=np.float16) -> Iterator[PredictionBatch]:
    """Predict patches ``indices`` of a store, batch by batch, in the order given.

    Args:
        model: the network, already on ``device``.
        store: the patch store.
        indices: store indices to predict.
        device: the device.
        batch_size: patches per batch.
        amp: mixed precision mode.
        want_cam: also yield CAM probability maps ``(b, P, P)``.
        bn_adapt: batch-norm adaptation at inference.
        workers: DataLoader worker processes.
        labels: optional per-store-patch labels to carry along instead of the store's.
        cam_dtype: ``np.float16`` or ``np.float32``.

    Yields:
        :class:`PredictionBatch` ``(indices, probs, labels, cams)``.
    """
    loader = make_eval_loader(store, indices, batch_size, workers, device, labels=labels)
    yield from iter_predictions(model, loader, device, amp=amp, want_cam=want_cam, bn_adapt=bn_adapt,
                                cam_dtype=cam_dtype)


def predict_scores(model: CamNet, store: PatchStore, indices: Sequence[int], device: torch.device,
                   batch_size: int = 32, amp: str | bool = "auto", bn_adapt: bool = False,
                   workers: int = 0) -> np.ndarray:
    """Image-level probabilities ``(N,)`` float32 for ``indices``, in the order given."""
    parts = [p.probs for p in predict_patches(model, store, indices, device, batch_size, amp,
                                              bn_adapt=bn_adapt, workers=workers)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def load_run_model(run: RunDir | str | os.PathLike, which: str = "best",
                   device: torch.device | str = "cpu") -> tuple[CamNet, dict]:
    """Rebuild the trained network of a run from one of its checkpoints.

    Args:
        run: the run directory (or its path).
        which: ``"best"`` or ``"last"``.
        device: where to put the model.

    Returns:
        ``(model in eval mode, info)`` with info keys ``epoch``, ``threshold`` (the image-level
        threshold chosen on validation at that epoch), ``val_f1``, ``model_config``, ``store_uuid``,
        ``pixel_threshold`` / ``val_loc_f1`` / ``pixel_threshold_at_edge`` (validation's best
        region-level localization threshold at that epoch; None in runs made before it existed).

    Raises:
        InputDataError: the run or checkpoint is missing, unreadable, or does not fit the model.
    """
    rd = run if isinstance(run, RunDir) else RunDir(run)
    state = rd.load_checkpoint(which)
    config = state.get("model_config")
    if not isinstance(config, dict):
        raise InputDataError(f"checkpoint {rd.checkpoint_path(which)} has no model configuration",
                             hint="retrain the run with this version of uts")
    model = CamNet.from_config(config)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise InputDataError(f"checkpoint {rd.checkpoint_path(which)} does not fit its model: {first_line(exc)}",
                             hint="the file is damaged; retrain the run") from None
    model.to(device).eval()
    info = {"epoch": int(state.get("epoch", 0)), "threshold": float(state.get("threshold", 0.5)),
            "val_f1": state.get("val_f1"), "model_config": config,
            "store_uuid": state.get("store_uuid", ""),
            # Validation's region-level localization choice at that epoch (absent in older runs).
            "pixel_threshold": state.get("pixel_threshold"), "val_loc_f1": state.get("val_loc_f1"),
            "pixel_threshold_at_edge": bool(state.get("pixel_threshold_at_edge", False))}
    return model, info
