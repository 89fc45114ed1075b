"""The training checkpoint: what ``last.pt`` / ``best.pt`` hold, and how a run resumes from one.

A checkpoint is a dict (``format`` ``"uts-checkpoint"``, ``version`` ``CHECKPOINT_VERSION``) with the
model, optimiser and scaler states, the fit loop's counters, every random state that the rest of
an epoch depends on, and the run's options (``params``: the ``TeachConfig`` as a dict; runs of
the first schema hold only the fit options there). ``uts_cli.io.rundir.RunDir`` writes and reads it
atomically; this module builds and applies its content.
"""
from __future__ import annotations

import torch

from uts_cli.config import RUN_CONTROL_FIELDS, TeachConfig, to_dict
from uts_cli.errors import InputDataError, UsageError

CHECKPOINT_FORMAT = "uts-checkpoint"
CHECKPOINT_VERSION = 1
# The fit loop's counters saved with every checkpoint (names as in the checkpoint dict).
COUNTERS = ("epoch", "step_in_epoch", "global_step", "sums", "best", "best_epoch", "best_threshold",
            "best_pixel_threshold", "best_at_edge")


def build_checkpoint(*, model, optimizer, scaler, aug_gen: torch.Generator, counters: dict,
                     threshold: float, val_f1: float | None, params: TeachConfig, store_uuid: str,
                     device: torch.device, extra: dict | None = None) -> dict:
    """The checkpoint dict of the current training state.

    Args:
        model / optimizer / scaler: the training objects (their ``state_dict`` is saved).
        aug_gen: the augmentation generator (its state is saved).
        counters: values for ``COUNTERS``.
        threshold: image-level threshold chosen on val at this epoch.
        val_f1: validation F1 at this epoch (None: no validation, or an interrupted epoch).
        params: the run's options.
        store_uuid: the store trained on; a resume on another store is refused.
        device: the training device (CUDA random states are saved on CUDA).
        extra: more entries (validation's pixel threshold and localization F1; with a weight EMA,
            ``model`` is the average and ``train_model`` the raw weights).
    """
    rng_cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model": model.state_dict(), "model_config": model.config(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        **{k: counters.get(k) for k in COUNTERS},
        "threshold": float(threshold), "val_f1": val_f1,
        "params": to_dict(params), "store_uuid": store_uuid,
        "rng_torch": torch.get_rng_state(), "rng_cuda": list(rng_cuda),
        "rng_aug": aug_gen.get_state(),
        **(extra or {}),
    }


def check_resumable(ck: dict, *, run_path, store, model) -> None:
    """Refuse a resume on another store or with other model options than the checkpoint's."""
    if ck.get("store_uuid") != store.uuid:
        raise InputDataError(
            f"run {run_path} was trained on store {ck.get('store_uuid')}, not {store.uuid} "
            f"({store.path})", hint="resume with the store the run was started on, or start a new run")
    if ck.get("model_config") != model.config():
        raise UsageError(f"the model options differ from the run's: {ck.get('model_config')}",
                         hint="resume with the same --arch/--n-blocks/--aggregation/--mode/--input-norm")


def restore_states(ck: dict, *, model, optimizer, scaler, aug_gen: torch.Generator, device: torch.device) -> dict:
    """Load the model, optimiser, scaler and random states of ``ck``; returns its ``COUNTERS``."""
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    if ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng_torch"])
    if device.type == "cuda" and ck.get("rng_cuda"):
        torch.cuda.set_rng_state_all(ck["rng_cuda"])
    aug_gen.set_state(ck["rng_aug"])
    return {k: ck.get(k) for k in COUNTERS}


def changed_options(saved: dict, params: TeachConfig) -> list[str]:
    """Training options of ``params`` that differ from a checkpoint's ``params`` (absent ones do not count).

    Where and how long the run executes (``RUN_CONTROL_FIELDS``) may change on resume.
    """
    new = params.training_options()
    old = {k: v for k, v in saved.items() if k not in RUN_CONTROL_FIELDS}
    return sorted(k for k in new if old.get(k, new[k]) != new[k])
