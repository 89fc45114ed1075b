"""``uts teach``: train the weakly supervised teacher."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uts_cli import choices
from uts_cli.cli._options import DeviceOpt, choice_enum, JsonOpt, OverwriteOpt, SeedOpt, StoreArg, WorkersOpt
from uts_cli.cli._output import CliReporter, cli_errors, emit_json, print_table
from uts_cli.config import TeachConfig

EXAMPLES = """Examples (after the `uts normalize` examples; tiny settings that finish in seconds):

  uts teach local_data/stores/synthetic-p128-norm.h5 --name teacher1 --weights none --epochs 1 --steps-per-epoch 10 --batch-size 16

  uts teach folder-norm.h5 --name t2 --weights none --epochs 1 --steps-per-epoch 2 --lr 1e-3 --location lb

  uts teach local_data/stores/synthetic-p128-norm.h5 --name teacher1 --weights none --epochs 2 --steps-per-epoch 10 --batch-size 16 --resume

On several GPUs (see the README's Scale section):

  torchrun --nproc-per-node 4 -m uts_cli teach store.h5 --name t4 --batch-size 128
"""


Arch = choice_enum("Arch", choices.ARCHS)
Aggregation = choice_enum("Aggregation", choices.AGGREGATIONS)
Mode = choice_enum("Mode", choices.MODES)
Location = choice_enum("Location", choices.LOCATIONS)
InputNorm = choice_enum("InputNorm", choices.INPUT_NORMS)
CamUpsample = choice_enum("CamUpsample", choices.CAM_UPSAMPLINGS)
Norm = choice_enum("Norm", choices.NORM_LAYERS)
ImageLoss = choice_enum("ImageLoss", choices.IMAGE_LOSSES)
PixelThreshold = choice_enum("PixelThreshold", choices.PIXEL_THRESHOLD_MODES)
Amp = choice_enum("Amp", choices.AMP_MODES)
Select = choice_enum("Select", choices.SELECT_MODES)
Optimizer = choice_enum("Optimizer", choices.OPTIMIZERS)
LrSchedule = choice_enum("LrSchedule", choices.LR_SCHEDULES)
_D = TeachConfig.__dataclass_fields__  # defaults shown by --help come from the one config


RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Folder that holds the run folders.", file_okay=False)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint (starts it if it has none yet).")]


@cli_errors("teach")
def teach_cmd(
    store: StoreArg,
    name: Annotated[str, typer.Option("--name", "-n", help="Run name (folder RUNS_DIR/NAME).")],
    runs_dir: RunsDirOpt = Path("runs"),
    arch: Annotated[Arch, typer.Option(help="Backbone.")] = Arch.resnet18,
    n_blocks: Annotated[int, typer.Option("--n-blocks", min=1, max=4, help="Residual stages kept.")] = 3,
    aggregation: Annotated[Aggregation, typer.Option(help="CAM pooling to the image logit (lse: log-mean-exp, between max and mean).")] = Aggregation.max,
    mode: Annotated[Mode, typer.Option(help="Pool the CAM (instance) or the features (embedding).")] = Mode.instance,
    weights: Annotated[str, typer.Option(
        "--weights", help="Backbone init: imagenet (from the local torch cache), none, or a file.")] = "imagenet",
    input_norm: Annotated[InputNorm, typer.Option(
        "--input-norm", help="unit: pixels/255 (the original); imagenet: mean/std.")] = InputNorm.unit,
    cam_upsample: Annotated[CamUpsample, typer.Option(
        "--cam-upsample", help="CAM cells to pixels: exact (each cell on its receptive field's centre) or "
        "method (align_corners over the patch, the original; off by up to one stride).")] = CamUpsample.exact,
    norm: Annotated[Norm, typer.Option(
        "--norm", help="Normalisation layers: batch (BatchNorm, the method) or group (GroupNorm, 32 groups; "
                       "starts from --weights none or a GroupNorm run's weights).")] = Norm(_D["norm"].default),
    width: Annotated[int, typer.Option(
        "--width", min=8, help="Channels of the backbone's first stage, doubled by each later one (64: torchvision's "
                               "ResNet, the only width the ImageNet weights fit; 32: about a quarter of the compute).")
    ] = _D["width"].default,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs.")] = 10,
    lr: Annotated[float, typer.Option(
        "--lr", min=0.0, help="Learning rate (the peak with --lr-schedule warmup-cosine).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Batch size; under torchrun the global batch, split over the processes.")] = 32,
    steps_per_epoch: Annotated[Optional[int], typer.Option(
        "--steps-per-epoch", min=1, help="Cap on steps per epoch (default: one balanced pass).")] = None,
    location: Annotated[Location, typer.Option(help="Location constraint on positive patches.")] = Location.none,
    image_loss: Annotated[ImageLoss, typer.Option(
        "--image-loss", help="Image-level loss: bce (the method) or gce (generalized cross-entropy, robust "
                             "to noisy labels).")] = ImageLoss(_D["image_loss"].default),
    gce_q: Annotated[float, typer.Option(
        "--gce-q", min=0.01, max=1.0, help="q of --image-loss gce (towards 0: BCE; 1: mean absolute error).")
    ] = _D["gce_q"].default,
    alpha_location: Annotated[float, typer.Option("--alpha-location", help="Weight of the location loss.")] = 0.01,
    temperature: Annotated[float, typer.Option(help="T in sigmoid(T * CAM) for the soft centroid.")] = 10.0,
    margin: Annotated[float, typer.Option(help="lb: distance allowed for free, pixels.")] = 40.0,
    tlb: Annotated[float, typer.Option(help="lb: barrier parameter t.")] = 50.0,
    augment: Annotated[bool, typer.Option(
        "--augment/--no-augment", help="Random flips/rotation/transpose of each training patch and its points.")
    ] = True,
    strong_augmentation: Annotated[bool, typer.Option(
        "--strong-augmentation", help="Add elastic deformation to flips/rotation/transpose.")] = False,
    balance: Annotated[bool, typer.Option(help="Class-balanced sampling.")] = True,
    only_one_mitosis: Annotated[bool, typer.Option(
        "--only-one-mitosis/--all-patches", help="Train only on patches with at most one mitosis.")] = True,
    pixel_threshold: Annotated[PixelThreshold, typer.Option(
        "--pixel-threshold", help="CAM threshold: the best region-level localization F1 on val, or the "
                                  "image-level threshold (the original).")
    ] = PixelThreshold(_D["pixel_threshold"].default),
    select: Annotated[Select, typer.Option(
        "--select", help="What chooses the best checkpoint: val region-level localization F1 (one-to-one "
                         "within --radius-px), or val image-level F1 (the original).")
    ] = Select(_D["select"].default),
    radius_px: Annotated[float, typer.Option(
        "--radius-px", min=0.0, help="Matching radius of the validation's localization scoring, pixels.")
    ] = _D["radius_px"].default,
    optimizer: Annotated[Optimizer, typer.Option(
        "--optimizer", help="adam (the method) or adamw (decoupled weight decay).")
    ] = Optimizer(_D["optimizer"].default),
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="Weight decay.")
                            ] = _D["weight_decay"].default,
    lr_schedule: Annotated[LrSchedule, typer.Option(
        "--lr-schedule", help="constant, or warmup-cosine (linear warm-up, cosine decay to 0).")
    ] = LrSchedule(_D["lr_schedule"].default),
    warmup_epochs: Annotated[float, typer.Option(
        "--warmup-epochs", min=0.0, help="Warm-up length of warmup-cosine, epochs.")] = _D["warmup_epochs"].default,
    ema_decay: Annotated[float, typer.Option(
        "--ema-decay", min=0.0, max=0.9999, help="EMA of the weights used for validation and saved for "
                                                 "inference (0: off; e.g. 0.99).")] = _D["ema_decay"].default,
    bn_reestimate: Annotated[int, typer.Option(
        "--bn-reestimate", min=0, help="Batches of unaugmented training patches that re-estimate the "
                                       "BatchNorm statistics before each validation (0: off).")
    ] = _D["bn_reestimate"].default,
    trim_positives: Annotated[float, typer.Option(
        "--trim-positives", min=0.0, max=0.99, help="After the first epoch, leave out of the loss this share "
                                                  "of each batch's positives with the highest loss, as likely "
                                                  "noisy labels (0: off; e.g. 0.25).")
    ] = _D["trim_positives"].default,
    amp: Annotated[Amp, typer.Option(help="Mixed precision (auto: on for CUDA).")] = Amp.auto,
    use_truth: Annotated[bool, typer.Option(
        "--use-truth", help="Research: the location loss reads the store's clean truth points instead of the "
                            "annotations (synthetic stores only; labels stay the annotations'). An oracle "
                            "for measuring what noisy points cost.")] = False,
    sync_bn: Annotated[bool, typer.Option(
        "--sync-bn", help="Under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm).")
    ] = False,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last/--no-channels-last", help="NHWC memory format, on CPU too (1.4-1.5x faster training on "
                                                   "an x86 CPU). --no-channels-last trains a CPU run in NCHW, as "
                                                   "uts did before 2026-12-03 (to repeat an older run exactly).")
    ] = True,
    seed: SeedOpt = 0,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Train the teacher: a CAM network that learns from image-level labels only."""
    from uts_cli.api.teach import teach

    cfg = TeachConfig(store=store, name=name, runs_dir=runs_dir, arch=arch.value, n_blocks=n_blocks,
                      aggregation=aggregation.value, mode=mode.value, weights=weights, input_norm=input_norm.value,
                      cam_upsample=cam_upsample.value, norm=norm.value, width=width, image_loss=image_loss.value, gce_q=gce_q,
                      epochs=epochs, lr=lr, batch_size=batch_size, location=location.value,
                      alpha_location=alpha_location, temperature=temperature, margin=margin, tlb=tlb,
                      augment=augment, strong_augmentation=strong_augmentation, balance=balance, only_one_mitosis=only_one_mitosis,
                      steps_per_epoch=steps_per_epoch, pixel_threshold=pixel_threshold.value, amp=amp.value,
                      use_truth=use_truth, sync_bn=sync_bn, channels_last=channels_last, seed=seed, workers=workers, device=device,
                      resume=resume, overwrite=overwrite, select=select.value, radius_px=radius_px,
                      optimizer=optimizer.value, weight_decay=weight_decay, lr_schedule=lr_schedule.value,
                      warmup_epochs=warmup_epochs, ema_decay=ema_decay, bn_reestimate=bn_reestimate,
                      trim_positives=trim_positives)
    result = teach(cfg, CliReporter())
    render_run(result, "teach", json_output)


def render_run(result, command: str, json_output: bool, extra_rows: list | None = None) -> None:
    from dataclasses import asdict

    from uts_cli.distributed import env_context

    if not env_context().is_main:  # under torchrun, rank 0 prints the one result
        return
    if json_output:
        emit_json({"ok": True, "command": command, **asdict(result)})
        return
    f1 = "n/a" if result.best_val_f1 is None else f"{result.best_val_f1:.3f}"
    rows = [("run", result.run), ("epochs", f"{result.epochs_done} (best {result.best_epoch})"),
            ("best val F1 (" + ("localization, region level" if result.select == "localization" else "image level")
             + ")", f1), ("image threshold", f"{result.threshold:.3f}"),
            ("pixel threshold", f"{result.pixel_threshold:.3f}" + (" (edge of the sweep)"
                                                                   if result.pixel_threshold_at_edge else "")),
            ("train / val patches", f"{result.n_train} / {result.n_val}"), ("device", result.device),
            ("throughput", f"{result.samples_per_s or 0:.1f} samples/s"), ("time", f"{result.seconds:.1f} s")]
    print_table(f"{command}: {result.run}", (extra_rows or []) + rows)
