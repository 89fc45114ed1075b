"""``uts predict``: detections, exports and a mitotic count for new fields and whole slides."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from uts_cli import choices
from uts_cli.cli._options import DeviceOpt, JsonOpt, OverwriteOpt, WorkersOpt, choice_enum
from uts_cli.cli._output import CliReporter, _report_error, cli_errors, emit_json, out_console

EXAMPLES = """Examples (after the `uts distill` examples; on your own slides: uts predict slides/*.svs --run student1):

  uts predict 'local_data/datasets/synthetic/images/case01/*.tif' --run student1 -o preds

  uts predict local_data/datasets/synthetic/images/case02/f01.tif --run student1 -o preds --heatmap --json

  uts predict local_data/datasets/synthetic/images/case02/f02.tif --run runs/student1 -o preds-grid --overlap 0 --format csv
"""


Checkpoint = choice_enum("Checkpoint", choices.CHECKPOINT_NAMES)


@cli_errors("predict")
def predict_cmd(
    inputs: Annotated[list[str], typer.Argument(
        help="Image files (TIFF/SVS/OME-TIFF, PNG, JPEG), folders or globs (quote globs in scripts).")],
    run: Annotated[str, typer.Option("--run", help="Run folder, or a run name in RUNS_DIR.")],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", file_okay=False, help="Output folder (default: RUN/predictions).")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Folder that holds the run folders.")] = Path("runs"),
    checkpoint: Annotated[Checkpoint, typer.Option(help="Which checkpoint of the run.")] = Checkpoint.best,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", min=0.0, max=1.0, help="Pixel threshold on the CAM probability (default: the run's).")] = None,
    mpp: Annotated[Optional[float], typer.Option(
        "--mpp", min=0.0, help="Input pixel size in µm/pixel (default: from the file's metadata).")] = None,
    assume_run_mpp: Annotated[bool, typer.Option(
        "--assume-run-mpp", help="Without a recorded pixel size, assume the run's instead of failing.")] = False,
    overlap: Annotated[Optional[int], typer.Option(
        "--overlap", min=0, help="Tile overlap in pixels (default about 16 µm; 0 = the store grid of prepare).")] = None,
    no_stain_norm: Annotated[bool, typer.Option(
        "--no-stain-norm", help="Do not apply the run's stain normalization.")] = False,
    formats: Annotated[str, typer.Option(
        "--format", help="Comma-separated exports: csv, geojson, midog.")] = "csv,geojson,midog",
    heatmap: Annotated[bool, typer.Option("--heatmap", help="Also write heatmap.png (CAM overlay).")] = False,
    tta: Annotated[bool, typer.Option("--tta", help="Average the CAM over flips (4x slower).")] = False,
    hotspot_area: Annotated[float, typer.Option(
        "--hotspot-area", min=0.0, help="Hotspot window area in mm² (default: ten 0.237 mm² HPFs).")] = 2.37,
    all_tiles: Annotated[bool, typer.Option(
        "--all-tiles", help="Run every tile, also those the tissue mask calls background.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Tiles per batch.")] = 16,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    devices: Annotated[Optional[str], typer.Option(
        "--devices", help="One process per listed device on this machine, sharing the slides: GPU numbers "
                          "(0,1,2,3) or cpu,cpu. Not under torchrun.")] = None,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Detect mitoses in fields and whole slides; write CSV, QuPath GeoJSON, MIDOG JSON and a count."""
    from uts_cli import distributed
    from uts_cli.api.predict import expand_inputs, predict, result_to_dict
    from uts_cli.io.rundir import resolve_run
    from uts_cli.config import PredictConfig
    from uts_cli.errors import InputDataError

    fmt = tuple(dict.fromkeys(f.strip().lower() for f in formats.split(",") if f.strip()))
    cfg = PredictConfig(inputs=tuple(expand_inputs(inputs)), run=resolve_run(run, runs_dir), output=output,
                        checkpoint=checkpoint.value, threshold=threshold, mpp=mpp, assume_run_mpp=assume_run_mpp,
                        overlap=overlap, stain_norm=not no_stain_norm, formats=fmt, heatmap=heatmap, tta=tta,
                        hotspot_area_mm2=hotspot_area, skip_background=not all_tiles, batch_size=batch_size,
                        workers=workers, device=device, overwrite=overwrite,
                        devices=tuple(d.strip() for d in devices.split(",")) if devices is not None else ())
    # Under torchrun every rank holds the process group until rank 0 has printed: torchrun stops
    # the other processes as soon as one of them exits non-zero (exit 3 when a slide failed).
    under_torchrun = not cfg.devices and distributed.env_context().enabled
    hold = distributed.session(cfg.device) if under_torchrun else contextlib.nullcontext()
    with hold:
        result = predict(cfg, CliReporter())
        failed = [s for s in result.slides if s.status == "failed"]
        if distributed.current().is_main:  # one result, also from several processes
            if json_output:
                emit_json({"ok": not failed, "command": "predict", **result_to_dict(result)})
            else:
                render_predict(result)
                if failed:
                    # Each failure was reported as it happened; this is the overall verdict.
                    names = ", ".join(s.name for s in failed[:5]) + (" ..." if len(failed) > 5 else "")
                    _report_error("predict", InputDataError(
                        f"{len(failed)} of {len(result.slides)} inputs failed: {names}",
                        hint="see the messages above; the other inputs are done"), False)
        distributed.barrier()
    if failed:
        raise typer.Exit(InputDataError.exit_code)


def _fmt(v, digits=2) -> str:
    if v is None or v == "":
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_predict(result) -> None:
    from rich.table import Table

    table = Table(title=f"predict with {result.run} (threshold {result.threshold:.3f}, tiles {result.tile_size} px, "
                        f"overlap {result.overlap} px)", title_justify="left")
    for col in ("slide", "status", "mitoses", "tissue mm²", "per mm²", "hotspot", "hotspot at (x, y) px",
                "background skipped"):
        table.add_column(col, justify="left" if col in ("slide", "status") else "right")
    for s in result.slides:
        d = s.summary
        hs = d.get("hotspot") or {}
        where = f"{hs['x0']:.0f}, {hs['y0']:.0f}" if hs else "-"
        hcount = f"{hs['count']} in {hs['area_mm2']:.2f} mm²" if hs else "-"
        skipped = d.get("background_skipped")
        table.add_row(s.name, s.status if s.status != "failed" else f"failed: {s.error['message'][:60]}",
                      _fmt(s.count), _fmt(d.get("tissue_area_mm2")), _fmt(d.get("density_per_mm2")), hcount, where,
                      f"{100 * skipped:.0f}%" if isinstance(skipped, (int, float)) else "-")
    console = out_console()
    console.print(table)
    procs = f", {result.world_size} processes" if result.world_size > 1 else ""
    console.print(f"outputs: {result.output}  summary: {result.output}/summary.csv  ({result.seconds:.1f}s{procs})")
