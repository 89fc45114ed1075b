"""The allowed values of every choice the tool offers, in one place (stdlib only).

Library modules validate against these tuples and the CLI builds its option enums from them
(``uts_cli.cli._options.choice_enum``), so a new value is added here once and is then accepted,
documented in ``--help`` and checked everywhere.
"""
from __future__ import annotations

# Model ------------------------------------------------------------------------------------
ARCHS = ("resnet18", "resnet50")
AGGREGATIONS = ("max", "mean", "lse")             # lse: log-mean-exp, between the two
MODES = ("instance", "embedding")                 # pool the CAM / pool the features
INPUT_NORMS = ("unit", "imagenet")                # pixels/255 (the original) / ImageNet mean-std
NORM_LAYERS = ("batch", "group")                  # BatchNorm (the original) / GroupNorm, 32 groups
NORM_GROUPS = 32                                  # GroupNorm's groups (Wu & He's default)
RESNET_WIDTH = 64                                 # --width: first-stage channels of torchvision's ResNets
WIDTH_STEP = 8                                    # --width: a multiple of this
# CAM to pixels: cell n centred on pixel stride*n (where its receptive field is centred) /
# bilinear with align_corners=True over the whole patch (the original; up to ~1 stride off).
CAM_UPSAMPLINGS = ("exact", "method")
WEIGHTS_KEYWORDS = ("imagenet", "none")           # anything else given to --weights is a file

# Training ---------------------------------------------------------------------------------
LOCATIONS = ("none", "l2", "lb")
IMAGE_LOSSES = ("bce", "gce")                     # binary cross-entropy / generalized CE (noise-robust)
AMP_MODES = ("auto", "off", "bf16", "fp16")
PIXEL_THRESHOLD_MODES = ("image", "localization")
SELECT_MODES = ("localization", "image")          # what chooses best.pt: region loc. F1 / image F1
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "warmup-cosine")
DEVICE_KEYWORDS = ("auto", "cpu", "cuda")         # plus cuda:N
CHECKPOINT_NAMES = ("last", "best")

# Distillation -----------------------------------------------------------------------------
FILTERS = ("TP", "FP", "FP_TP", "PEAK")

# Evaluation -------------------------------------------------------------------------------
MATCHING_MODES = ("one-to-one", "legacy")
TRUTH_MODES = ("auto", "annotations", "clean")

# Demo -------------------------------------------------------------------------------------
DEMO_PROFILES = ("default", "full")

# Data -------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")
COMPRESSIONS = ("gzip", "lzf", "none")
DATASET_NAMES = ("TUPAC16", "MIDOG21", "MITOS14", "CCMCT", "folder", "synthetic")

# Point kinds stored with every annotated point (uint8 in the store).
KIND_MITOSIS = 0
KIND_HARD_NEGATIVE = 1
POINT_KINDS = {KIND_MITOSIS: "mitosis", KIND_HARD_NEGATIVE: "hard_negative"}


def width_problem(width, norm: str) -> tuple[str, str] | None:
    """``(message, hint)`` when no network can be built with this ``--width`` and ``--norm``, else None."""
    if isinstance(width, bool) or int(width) != width or width < WIDTH_STEP or width % WIDTH_STEP:
        return (f"network width must be a multiple of {WIDTH_STEP}, at least {WIDTH_STEP} (got {width})",
                f"use e.g. --width 32, or {RESNET_WIDTH} (torchvision's ResNet)")
    if norm == "group" and width % NORM_GROUPS:
        return (f"--norm group needs a width divisible by {NORM_GROUPS} (got {width})",
                f"use --width 32 or {RESNET_WIDTH}")
    return None


def is_device(value: str) -> bool:
    """True for ``auto``, ``cpu``, ``cuda`` and ``cuda:N`` (case and spaces already normalised)."""
    return value in DEVICE_KEYWORDS or (value.startswith("cuda:") and value[5:].isdigit())
