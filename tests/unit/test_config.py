"""TeachConfig: one record for teach and the fit loop, its validation, and loading saved configs."""
import dataclasses
import json
from pathlib import Path

import pytest

from uts_cli import choices
from uts_cli.config import SCHEMA_VERSION, DistillConfig, TeachConfig, to_dict
from uts_cli.errors import InputDataError, UsageError

# The shape written by the version before schema_version existed (a tiny seeded teach run):
# a "config" section without the fit internals, and those in a separate "train" section.
OLD_CONFIG_JSON = {
    "best_epoch": 2, "command": "teach",
    "config": {"aggregation": "max", "alpha_location": 0.01, "amp": "auto", "arch": "resnet18", "augment": True,
               "balance": True, "batch_size": 4, "device": "cpu", "epochs": 2, "input_norm": "unit",
               "location": "lb", "lr": 0.001, "margin": 40.0, "mode": "instance", "n_blocks": 3, "name": "t",
               "only_one_mitosis": True, "overwrite": False, "pixel_threshold": "localization", "resume": False,
               "runs_dir": "/tmp/rbase/runs", "seed": 3, "steps_per_epoch": 3, "store": "/tmp/rbase/store.h5",
               "strong_augmentation": False, "temperature": 10.0, "tlb": 50.0, "weights": "none", "workers": 0},
    "device": {"device": "cpu", "requested": "cpu"}, "input_size": 64,
    "model": {"aggregation": "max", "arch": "resnet18", "input_norm": "unit", "mode": "instance", "n_blocks": 3},
    "pixel_size_um": 0.25, "pixel_threshold": 0.95, "pixel_threshold_mode": "localization",
    "stain": {"method": "none", "state": None},
    "store": {"n_patches": 24, "n_train": 15, "n_val": 4, "path": "/tmp/rbase/store.h5", "uuid": "2e605ea3"},
    "threshold": 0.6034393906593323,
    "train": {"alpha_ce": 1.0, "alpha_location": 0.01, "amp": "auto", "augment": True, "balance": True,
              "batch_size": 4, "channels_last": None, "epochs": 2, "location": "lb", "lr": 0.001, "margin": 40.0,
              "max_points": 8, "report_every": 10, "seed": 3, "steps_per_epoch": 3, "strong_augmentation": False,
              "temperature": 10.0, "tlb": 50.0, "use_truth": False, "val_batch_size": None, "weight_decay": 0.0,
              "workers": 0},
}
# A checkpoint's "params" of the same version (the former TrainParams): no store, no name.
OLD_CHECKPOINT_PARAMS = dict(OLD_CONFIG_JSON["train"], max_points=6)


def test_old_config_json_loads():
    cfg = TeachConfig.from_dict(json.loads(json.dumps(OLD_CONFIG_JSON)))
    assert cfg.store == Path("/tmp/rbase/store.h5") and cfg.runs_dir == Path("/tmp/rbase/runs")
    assert (cfg.name, cfg.location, cfg.lr, cfg.seed, cfg.pixel_threshold) == ("t", "lb", 0.001, 3, "localization")
    assert cfg.max_points == 8 and cfg.report_every == 10 and cfg.use_truth is False
    # the section alone loads too; the fit internals then take their defaults
    assert TeachConfig.from_dict(OLD_CONFIG_JSON["config"]) == cfg


def test_old_checkpoint_params_load_with_store_and_name_given():
    cfg = TeachConfig.from_dict(OLD_CHECKPOINT_PARAMS, store="s.h5", name="t")
    assert cfg.store == Path("s.h5") and cfg.max_points == 6 and cfg.batch_size == 4
    with pytest.raises(InputDataError, match="no store or name"):
        TeachConfig.from_dict(OLD_CHECKPOINT_PARAMS)


def test_round_trip_and_unknown_keys():
    cfg = TeachConfig(store=Path("a.h5"), name="x", location="l2", use_truth=True, val_batch_size=7)
    saved = {"schema_version": SCHEMA_VERSION, "config": to_dict(cfg)}
    assert TeachConfig.from_dict(json.loads(json.dumps(saved))) == cfg
    assert TeachConfig.from_dict({**to_dict(cfg), "removed_option": 1}) == cfg


def test_newer_schema_is_refused_with_a_hint():
    with pytest.raises(InputDataError) as err:
        TeachConfig.from_dict({"schema_version": SCHEMA_VERSION + 1, "config": OLD_CONFIG_JSON["config"]})
    assert "upgrade uts" in err.value.hint


@pytest.mark.parametrize("change, message", [
    ({"location": "l1"}, "unknown --location"),
    ({"pixel_threshold": "best"}, "unknown --pixel-threshold"),
    ({"arch": "vgg"}, "unknown --arch"),
    ({"amp": "fp8"}, "unknown --amp"),
    ({"resume": True, "overwrite": True}, "exclude each other"),
    ({"epochs": 0}, "epochs must be"),
    ({"lr": 0.0}, "learning rate"),
    ({"n_blocks": 5}, "n_blocks"),
    ({"steps_per_epoch": 0}, "steps per epoch"),
    ({"max_points": 0}, "max_points"),
    ({"norm": "layer"}, "unknown --norm"),
    ({"image_loss": "mae"}, "unknown --image-loss"),
    ({"gce_q": 0.0}, "gce_q"),
    ({"norm": "group"}, "ImageNet weights"),
    ({"width": 32}, "ImageNet"),
    ({"width": 20, "weights": "none"}, "multiple of 8"),
    ({"width": 48, "weights": "none", "norm": "group"}, "divisible by 32"),
    ({"norm": "group", "weights": "none", "bn_reestimate": 4}, "act on BatchNorm"),
])
def test_validate_names_the_option(change, message):
    cfg = TeachConfig(store=Path("a.h5"), name="x", **change)
    with pytest.raises(UsageError, match=message) as err:
        cfg.validate()
    assert err.value.hint
    TeachConfig(store=Path("a.h5"), name="x").validate()


def test_distill_overrides_are_teach_fields():
    DistillConfig(teacher=Path("t"), name="s", overrides={"epochs": 3, "augment": False}).check_overrides()
    with pytest.raises(UsageError, match="unknown student option.*bogus"):
        DistillConfig(teacher=Path("t"), name="s", overrides={"bogus": 1}).check_overrides()


def test_resume_warning_ignores_where_the_run_executes():
    from uts_cli.model.checkpoint import changed_options

    cfg = TeachConfig(store=Path("a.h5"), name="x", epochs=5, workers=0)
    moved = dataclasses.replace(cfg, store=Path("b.h5"), device="cuda", resume=True, epochs=9)
    assert changed_options(to_dict(cfg), moved) == []
    assert changed_options(to_dict(cfg), dataclasses.replace(cfg, lr=1e-2)) == ["lr"]
    # a checkpoint of the first schema holds no model options: those do not count
    assert changed_options(OLD_CHECKPOINT_PARAMS, dataclasses.replace(cfg, **{
        k: OLD_CHECKPOINT_PARAMS[k] for k in ("lr", "batch_size", "location", "seed", "steps_per_epoch")},
        max_points=6)) == []


def test_cli_enums_are_generated_from_choices():
    from uts_cli.cli import distill, evaluate, prepare, teach

    pairs = [(teach.Arch, choices.ARCHS), (teach.Location, choices.LOCATIONS), (teach.Amp, choices.AMP_MODES),
             (teach.PixelThreshold, choices.PIXEL_THRESHOLD_MODES), (distill.Filter, choices.FILTERS),
             (evaluate.Matching, choices.MATCHING_MODES), (evaluate.Split, choices.SPLITS),
             (evaluate.Checkpoint, choices.CHECKPOINT_NAMES), (prepare.Dataset, choices.DATASET_NAMES),
             (prepare.Compression, choices.COMPRESSIONS), (teach.Norm, choices.NORM_LAYERS),
             (teach.ImageLoss, choices.IMAGE_LOSSES)]
    for enum, values in pairs:
        assert tuple(m.value for m in enum) == values
        assert all(isinstance(m, str) for m in enum)
    assert evaluate.Matching.one_to_one.value == "one-to-one"
