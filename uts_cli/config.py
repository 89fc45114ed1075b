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
    hist_match: bool = True
    macenko: bool = True
    io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    batch_size: int = 16
    device: str = "auto"
    compression: str | None = None      # None: same as the input store
    overwrite: bool = False


@dataclass(frozen=True)
class TeachConfig:
    """``uts teach`` (and the student part of ``uts distill``); defaults are the method's."""

    store: Path
    name: str
    runs_dir: Path = Path("runs")
    arch: str = "resnet18"
    n_blocks: int = 3
    aggregation: str = "max"
    mode: str = "instance"
    weights: str = "imagenet"           # imagenet | none | PATH
    input_norm: str = "unit"            # unit (pixels/255, the original) | imagenet
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 32
    location: str = "none"
    alpha_location: float = 0.01
    temperature: float = 10.0
    margin: float = 40.0
    tlb: float = 50.0
    strong_augmentation: bool = False
    augment: bool = True
    balance: bool = True
    only_one_mitosis: bool = True
    steps_per_epoch: int | None = None
    pixel_threshold: str = "image"      # image (the original) | localization (chosen on val)
    amp: str = "auto"
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class DistillConfig:
    """``uts distill``: filter the teacher's disagreements, then train a student."""

    teacher: Path                       # run folder (or name under runs_dir)
    name: str
    runs_dir: Path = Path("runs")
    criterion: str = "TP"
    pseudolabel: bool = False
    radius_px: float = 30.0
    # Student settings; None inherits the teacher's value.
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    workers: int = 2
    resume: bool = False
    overwrite: bool = False


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
    amp: str = "auto"
    overwrite: bool = False
