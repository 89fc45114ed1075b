"""``uts distill``: filter the samples the teacher disagrees with, train the student."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uts_cli.choices import FILTERS, PIXEL_THRESHOLD_MODES
from uts_cli.cli._options import DeviceOpt, JsonOpt, OverwriteOpt, WorkersOpt, choice_enum
from uts_cli.cli._output import CliReporter, cli_errors, emit_json, print_table
from uts_cli.cli.teach import ResumeOpt, RunsDirOpt

EXAMPLES = """Examples (after the `uts teach` examples):

  uts distill --teacher teacher1 --name student1

  uts distill --teacher runs/teacher1 --name s2 --filter FP --pseudolabel --epochs 1

Other filters: --filter TP (default) or FP_TP; student options default to the teacher's.
"""


Filter = choice_enum("Filter", FILTERS)
PixelThreshold = choice_enum("PixelThreshold", PIXEL_THRESHOLD_MODES)


@cli_errors("distill")
def distill_cmd(
    teacher: Annotated[str, typer.Option("--teacher", "-t", help="Teacher run: a name in RUNS_DIR or a path.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Student run name.")],
    runs_dir: RunsDirOpt = Path("runs"),
    criterion: Annotated[Filter, typer.Option(
        "--filter", help="TP: drop positives without a true detection; FP: drop any with a false "
                         "detection; FP_TP: keep only perfect positives; PEAK: like TP, but also keep a positive "
                         "whose CAM peak lies within the radius of its annotated mitosis.")] = Filter.TP,
    pseudolabel: Annotated[bool, typer.Option(
        "--pseudolabel", help="Replace labels by the teacher's decisions instead of removing samples.")] = False,
    keep_negatives: Annotated[bool, typer.Option(
        "--keep-negatives", help="Judge the positives only: never remove (or relabel) a patch without an "
                                 "annotated mitosis, even when the teacher calls it positive.")] = False,
    radius_px: Annotated[float, typer.Option("--radius-px", min=0.0, help="Matching radius in pixels.")] = 30.0,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Student epochs (default: the teacher's).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Student learning rate (default: the teacher's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Default: the teacher's.")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option("--steps-per-epoch", min=1,
                                                            help="Default: the teacher's.")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Default: the teacher's.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Default: the teacher's.")] = None,
    augment: Annotated[Optional[bool], typer.Option(
        "--augment/--no-augment", help="Spatial augmentation of the student (default: the teacher's).",
        show_default=False)] = None,
    pixel_threshold: Annotated[Optional[PixelThreshold], typer.Option(
        "--pixel-threshold", help="image or localization (default: the teacher's).", show_default=False)] = None,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Remove hard or mislabelled samples with the teacher, then train the student on the rest."""
    from uts_cli.api.distill import distill
    from uts_cli.config import DistillConfig

    overrides = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
                 "weights": weights, "seed": seed, "pixel_threshold": pixel_threshold and pixel_threshold.value, "augment": augment}
    cfg = DistillConfig(teacher=Path(teacher), name=name, runs_dir=runs_dir, criterion=criterion.value,
                        pseudolabel=pseudolabel, keep_negatives=keep_negatives, radius_px=radius_px, overrides=overrides, device=device,
                        workers=workers, resume=resume, overwrite=overwrite)
    result = distill(cfg, CliReporter())
    from uts_cli.distributed import env_context

    if not env_context().is_main:  # under torchrun, rank 0 prints the one result
        return
    if json_output:
        from dataclasses import asdict

        emit_json({"ok": True, "command": "distill", **asdict(result)})
        return
    s = result.student
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.removed_by_reason.items())) or "none"
    rows = [("student run", result.run), ("teacher", result.teacher),
            ("filter", result.criterion + (" (pseudo-labels)" if result.pseudolabel else "")),
            ("train patches kept", f"{result.n_train_kept} of {result.n_train_before}"),
            ("val patches kept", f"{result.n_val_kept} of {result.n_val_before}"),
            ("flagged by reason", reasons), ("review", f"{result.removed_csv}, {result.removed_geojson}/"),
            ("teacher scores", "reused (--resume)" if result.reused_scores else "computed")]
    if result.removed_true_lookalikes is not None:
        rows.append(("removed positives (clean truth)",
                     f"{result.removed_true_lookalikes} look-alike only, {result.removed_true_mitoses} real"))
    f1 = s.get("best_val_f1")
    rows += [("student val F1", "n/a" if f1 is None else f"{f1:.3f}"),
             ("student thresholds", f"image {s['threshold']:.3f}, pixel {s['pixel_threshold']:.3f}"),
             ("time", f"{result.seconds:.1f} s")]
    print_table(f"distill: {result.run}", rows)
