"""Frozen configuration records for each command, serialisable to JSON (stdlib only).

A config holds everything needed to repeat a command; stores and runs embed theirs, which is how
``prepare``/``normalize`` detect that a partial output was made with other settings, and how
``distill``/``eval`` inherit a teacher's settings.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uts_cli import choices
from uts_cli.errors import InputDataError, UsageError


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-safe dict of a config dataclass (paths become strings)."""

    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str
    root: Path | None = None            # None: ./local_data/datasets/<dataset>
    output: Path | None = None          # None: ./local_data/stores/<dataset>-p<patch>.h5
    patch_size: int = 500
    compression: str = "lzf"
    splits_file: Path | None = None
    min_tissue: float | None = None     # None: 0 for fields, 0.2 for whole slides
    overwrite: bool = False
    dataset_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NormalizeConfig:
    store: Path
    output: Path | None = None          # None: <store stem>-norm.h5 beside the input
    reference: Path | None = None       # an image file; None: choose a field from the store
    reference_image_id: str | None = None
    # Another normalized store whose fitted normalization (reference, steps, Io, alpha, beta) is
    # applied as it is: new fields in the colours a model trained on.
    like: Path | None = None
    hist_match: bool = True
    macenko: bool = True
    io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    batch_size: int = 16
    device: str = "auto"
    compression: str | None = None      # None: same as the input store
    overwrite: bool = False


# Version of the saved run config (config.json "schema_version"). 1: runs written before the
# field existed (a "config" section without the fit internals, plus a "train" section).
SCHEMA_VERSION = 2

# Fields that steer where and how a run executes, not what it learns: a resumed run may change
# them without a warning.
RUN_CONTROL_FIELDS = ("store", "name", "runs_dir", "device", "resume", "overwrite", "epochs", "channels_last")
_PATH_FIELDS = ("store", "runs_dir")


def check_schema_version(data: dict[str, Any], source: Any = "the run config") -> None:
    """Raise InputDataError when a saved config was written by a newer uts than this one.

    Args:
        data: a run's ``config.json`` (no ``schema_version``: version 1).
        source: what to name in the message (e.g. the file's path).
    """
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise InputDataError(
            f"{source} has schema version {version!r}; this uts reads up to {SCHEMA_VERSION} "
            f"(the run was written by uts {data.get('uts_version', '?')})",
            hint="upgrade uts (pip install -U uts) to read runs made by a newer version")


@dataclass(frozen=True)
class TeachConfig:
    """Everything ``uts teach`` (and the student of ``uts distill``) trains with; defaults are the method's.

    The same record drives the fit loop (``uts_cli.model.fit.fit``), is saved in the run's
    ``config.json`` and in each checkpoint, and loads back with :meth:`from_dict`.

    Attributes:
        store: patch store to train on.
        name: run name (folder ``runs_dir / name``).
        runs_dir: folder that holds the run folders.
        arch, n_blocks, aggregation, mode, input_norm: the CAM network (see ``uts_cli.choices``).
        norm: the backbone's normalisation layers, ``batch`` (BatchNorm, the method) or ``group``
            (GroupNorm with 32 groups: no batch statistics, so the same in training and inference).
        width: channels of the backbone's stem and first stage (64: torchvision's ResNet); each
            later stage doubles them. Only 64 can start from the ImageNet weights.
        cam_upsample: CAM cells to pixels, ``exact`` (cell n on pixel stride * n, the centre of
            its receptive field) or ``method`` (align_corners=True over the patch, the original).
        weights: backbone init, ``imagenet``, ``none`` or a file.
        epochs: total epochs of the run (a resumed run continues up to this).
        lr: (peak) learning rate.
        batch_size: training batch size.
        location: location constraint, ``none``, ``l2`` or ``lb``.
        image_loss: the image-level loss, ``bce`` (the method) or ``gce`` (generalized
            cross-entropy, which lets the samples the network contradicts most pull less).
        gce_q: q of ``gce``, in (0, 1]: towards 0 it is BCE, at 1 the mean absolute error.
        alpha_location: weight of the location loss.
        temperature: T in ``sigmoid(T * CAM)`` for the soft centroid.
        margin: distance (pixels) the ``lb`` barrier allows for free.
        tlb: t of the extended log-barrier.
        strong_augmentation: add the elastic warp to the spatial augmentation.
        augment: spatial augmentation (flips, rotations, transpose) on/off.
        balance: class-balanced sampling.
        only_one_mitosis: train only on patches with at most one annotated mitosis.
        steps_per_epoch: cap on training steps per epoch (None = one balanced pass).
        pixel_threshold: ``localization`` (the pixel threshold with the best region-level
            localization F1 on val, at the best epoch) or ``image`` (the image-level threshold, as
            the original).
        select: what chooses ``best.pt``: ``localization`` (val region-level localization F1,
            one-to-one within ``radius_px``) or ``image`` (val image-level F1, as the original).
        radius_px: matching radius of the validation's localization scoring, pixels.
        optimizer: ``adam`` (the method) or ``adamw`` (decoupled weight decay).
        lr_schedule: ``constant`` (the method) or ``warmup-cosine`` (linear warm-up over
            ``warmup_epochs``, then cosine decay to 0 at the last step).
        warmup_epochs: warm-up length in epochs (may be fractional).
        ema_decay: decay of an exponential moving average of the weights, used for validation,
            saved as the checkpoints' model and so used by eval/distill/predict (0 = off).
        bn_reestimate: batches of unaugmented training patches (natural class mix) over which the
            BatchNorm statistics are recomputed before each validation (0 = off).
        trim_positives: after the first epoch, this share of each batch's positives, those with
            the highest image-level loss, is left out of both losses (small-loss selection against
            noisy labels; 0 = off).
        amp: ``auto``, ``off``, ``bf16`` or ``fp16``.
        seed: seeds sampling, augmentation and the initial weights.
        workers: DataLoader worker processes.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume / overwrite: continue the run / replace it.
        use_truth: research option: train the location loss on the clean truth of a synthetic
            store instead of the annotations (an upper bound for what label noise costs).
        sync_bn: under torchrun, BatchNorm statistics over the global batch (SyncBatchNorm);
            no effect in a single process.
        val_batch_size: inference batch size for validation (None = ``batch_size``).
        weight_decay: weight decay of the optimizer (0 in the method).
        alpha_ce: weight of the image-level loss.
        channels_last: NHWC memory format on every device (True, the default since 2026-12-03:
            1.4-1.5x the training samples a second on an x86 CPU); False: NCHW; None: on CUDA
            only, what runs saved before then used (their config says null).
        max_points: annotated points kept per patch.
        report_every: steps between loss values sent to the progress display (each syncs a GPU).
    """

    store: Path
    name: str
    runs_dir: Path = Path("runs")
    arch: str = "resnet18"
    n_blocks: int = 3
    aggregation: str = "max"
    mode: str = "instance"
    weights: str = "imagenet"           # imagenet | none | PATH
    input_norm: str = "unit"            # unit (pixels/255, the original) | imagenet
    cam_upsample: str = "exact"         # exact | method (the original's align_corners=True)
    norm: str = "batch"                 # batch (the original) | group
    width: int = choices.RESNET_WIDTH   # 64: torchvision's ResNet; 32: about a quarter of the compute
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 32
    location: str = "none"
    image_loss: str = "bce"             # bce (the method) | gce
    gce_q: float = 0.7
    alpha_location: float = 0.01
    temperature: float = 10.0
    margin: float = 40.0
    tlb: float = 50.0
    strong_augmentation: bool = False
    augment: bool = True
    balance: bool = True
    only_one_mitosis: bool = True
    steps_per_epoch: int | None = None
    pixel_threshold: str = "localization"   # localization (chosen on val) | image (the original)
    select: str = "localization"        # localization | image (the original)
    radius_px: float = 30.0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_epochs: float = 1.0
    ema_decay: float = 0.0
    bn_reestimate: int = 0
    trim_positives: float = 0.0
    amp: str = "auto"
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    use_truth: bool = False
    sync_bn: bool = False
    channels_last: bool | None = True
    # Internal to the fit loop; no flag sets them.
    val_batch_size: int | None = None
    alpha_ce: float = 1.0
    max_points: int = 8
    report_every: int = 10

    def validate(self) -> None:
        """Raise UsageError (with a hint naming the option) on values no training can use."""
        def one_of(value, allowed, option):
            return value in allowed, f"unknown {option} {value!r}", f"use one of {', '.join(allowed)}"

        width_problem = choices.width_problem(self.width, self.norm)
        checks = [
            one_of(self.arch, choices.ARCHS, "--arch"),
            one_of(self.aggregation, choices.AGGREGATIONS, "--aggregation"),
            one_of(self.mode, choices.MODES, "--mode"),
            one_of(self.input_norm, choices.INPUT_NORMS, "--input-norm"),
            one_of(self.cam_upsample, choices.CAM_UPSAMPLINGS, "--cam-upsample"),
            one_of(self.location, choices.LOCATIONS, "--location"),
            one_of(self.norm, choices.NORM_LAYERS, "--norm"),
            one_of(self.image_loss, choices.IMAGE_LOSSES, "--image-loss"),
            (width_problem is None, *(width_problem or ("", ""))),
            (self.width == choices.RESNET_WIDTH or self.weights != "imagenet", f"--width {self.width} cannot "
             f"start from the ImageNet weights (they fit width {choices.RESNET_WIDTH})",
             f"add --weights none, or use --width {choices.RESNET_WIDTH}"),
            (0 < self.gce_q <= 1, "gce_q must be in (0, 1]", "use e.g. --gce-q 0.7"),
            # The ImageNet file holds BatchNorm statistics a GroupNorm network has no place for.
            (self.norm == "batch" or self.weights != "imagenet", "--norm group cannot start from the "
             "ImageNet weights (they were trained with BatchNorm)", "add --weights none, or use --norm batch"),
            (self.norm == "batch" or not (self.bn_reestimate or self.sync_bn),
             "--bn-reestimate and --sync-bn act on BatchNorm; a --norm group network has none",
             "drop them, or use --norm batch"),
            one_of(self.pixel_threshold, choices.PIXEL_THRESHOLD_MODES, "--pixel-threshold"),
            one_of(self.amp, choices.AMP_MODES, "--amp"),
            one_of(self.select, choices.SELECT_MODES, "--select"),
            one_of(self.optimizer, choices.OPTIMIZERS, "--optimizer"),
            one_of(self.lr_schedule, choices.LR_SCHEDULES, "--lr-schedule"),
            (self.radius_px > 0, "radius_px must be > 0", "use a positive --radius-px, e.g. 30"),
            (self.weight_decay >= 0, "weight decay must be >= 0", "use --weight-decay 0 or more"),
            (self.warmup_epochs >= 0, "warm-up must be >= 0 epochs", "use --warmup-epochs 0 or more"),
            (0 <= self.ema_decay < 1, "EMA decay must be in [0, 1)", "use e.g. --ema-decay 0.99, or 0 for off"),
            (self.bn_reestimate >= 0, "bn_reestimate must be >= 0", "use --bn-reestimate 0 (off) or a number of batches"),
            (0 <= self.trim_positives < 1, "trim_positives must be in [0, 1)",
             "use e.g. --trim-positives 0.25, or 0 for off"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other",
             "give one of them"),
            # Otherwise the flag would be accepted and change nothing: only the location loss reads points.
            (not self.use_truth or self.location != "none", "--use-truth needs a location loss",
             "add --location l2 or --location lb, or drop --use-truth"),
            (1 <= self.n_blocks <= 4, "n_blocks must be between 1 and 4", "use --n-blocks 1 to 4"),
            (self.epochs >= 1, "epochs must be >= 1", "use --epochs 1 or more"),
            (self.lr > 0, "learning rate must be > 0", "use a positive --lr, e.g. 1e-4"),
            (self.batch_size >= 1, "batch size must be >= 1", "use --batch-size 1 or more"),
            (self.val_batch_size is None or self.val_batch_size >= 1, "validation batch size must be >= 1",
             "leave val_batch_size unset to use the training batch size"),
            (self.temperature > 0 and self.tlb > 0, "temperature and tlb must be > 0",
             "use positive --temperature and --tlb"),
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps per epoch must be >= 1",
             "use --steps-per-epoch 1 or more, or leave it out for one balanced pass"),
            (self.workers >= 0, "workers must be >= 0", "use --workers 0 or more"),
            (self.max_points >= 1, "max_points must be >= 1", "keep at least one point per patch"),
            (self.report_every >= 1, "report_every must be >= 1", "report at least every step"),
        ]
        for ok, message, hint in checks:
            if not ok:
                raise UsageError(message, hint=hint)

    def training_options(self) -> dict[str, Any]:
        """The fields that change what a run learns (all but ``RUN_CONTROL_FIELDS``), JSON-safe."""
        return {k: v for k, v in to_dict(self).items() if k not in RUN_CONTROL_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **given: Any) -> "TeachConfig":
        """Load a saved config: a run's whole ``config.json``, its ``config`` section, or a checkpoint's ``params``.

        Unknown keys are ignored (a config from an older version may hold fields since removed),
        missing ones take their defaults, paths become ``Path``. ``config.json`` of the first
        version kept the fit internals in a separate ``train`` section; it is merged in.

        Args:
            data: the saved dict.
            **given: fields that take precedence over ``data`` (e.g. ``store``/``name`` for a
                checkpoint's ``params``, which holds neither before schema version 2).

        Raises:
            InputDataError: the config is from a newer uts (``schema_version`` above this one's),
                or ``store``/``name`` are missing and not given.
        """
        check_schema_version(data)
        flat: dict[str, Any] = {}
        if isinstance(data.get("config"), dict):   # a whole config.json
            flat.update(data.get("train") or {})
            flat.update(data["config"])
        else:
            flat.update(data)
        # Configs saved before cam_upsample existed were trained with the original mapping.
        flat.setdefault("cam_upsample", "method")
        # ... and those saved before channels_last was a field, in NCHW on a CPU.
        flat.setdefault("channels_last", None)
        flat.update(given)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in flat.items() if k in names}
        missing = [k for k in ("store", "name") if kwargs.get(k) is None]
        if missing:
            raise InputDataError(f"the saved config has no {' or '.join(missing)}",
                                 hint="pass them explicitly (TeachConfig.from_dict(data, store=..., name=...))")
        for k in _PATH_FIELDS:
            if kwargs.get(k) is not None:
                kwargs[k] = Path(kwargs[k])
        return cls(**kwargs)


@dataclass(frozen=True)
class DistillConfig:
    """``uts distill``: filter the teacher's disagreements, then train a student."""

    teacher: Path                       # run folder (or name under runs_dir)
    name: str
    runs_dir: Path = Path("runs")
    criterion: str = "TP"
    pseudolabel: bool = False
    keep_negatives: bool = False        # filter the positives only (negatives are never removed)
    radius_px: float = 30.0
    # Student settings (TeachConfig field names); None inherits the teacher's value.
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    workers: int = 2
    resume: bool = False
    overwrite: bool = False

    def check_overrides(self) -> None:
        """Raise UsageError when an override names no student option."""
        unknown = set(self.overrides) - {f.name for f in dataclasses.fields(TeachConfig)}
        if unknown:
            raise UsageError(f"unknown student option(s): {', '.join(sorted(unknown))}",
                             hint="see uts distill --help")


@dataclass(frozen=True)
class EvalConfig:
    """``uts eval``: localization precision / recall / F1 of a run."""

    run: Path
    store: Path | None = None           # None: the store the run was trained on
    split: str = "test"
    matching: str = "one-to-one"
    radius_px: float | None = None      # None with radius_um None: 30 px
    radius_um: float | None = None
    threshold: float | None = None      # None: the run's pixel threshold
    truth: str = "auto"                 # auto | annotations | clean
    checkpoint: str = "best"
    bn_adapt: bool = False
    overlays: bool = False
    output: Path | None = None          # None: RUN/eval-<split>
    batch_size: int = 32
    device: str = "auto"
    workers: int = 0


@dataclass(frozen=True)
class PredictConfig:
    """``uts predict``: detections, exports and a clinical summary for new fields and slides."""

    inputs: tuple[Path, ...]            # image files (globs and folders already expanded)
    run: Path
    output: Path | None = None          # None: RUN/predictions
    checkpoint: str = "best"
    threshold: float | None = None      # None: the run's pixel threshold
    mpp: float | None = None            # micrometres per input pixel; None: from the file
    assume_run_mpp: bool = False        # unknown pixel size: take the run's instead of failing
    overlap: int | None = None          # pixels between tiles; None: default_overlap(); 0: store grid
    stain_norm: bool = True
    formats: tuple[str, ...] = ("csv", "geojson", "midog")
    heatmap: bool = False
    tta: bool = False
    hotspot_area_mm2: float = 2.37
    skip_background: bool = True
    min_area: int = 1
    batch_size: int = 16
    workers: int = 2
    device: str = "auto"
    devices: tuple[str, ...] = ()       # one process per entry on this machine (GPU numbers or "cpu")
    amp: str = "auto"
    overwrite: bool = False
