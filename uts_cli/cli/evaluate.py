"""``uts eval``: localization precision / recall / F1 of a run."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uts_cli import choices
from uts_cli.cli._options import DeviceOpt, JsonOpt, WorkersOpt, choice_enum
from uts_cli.cli._output import CliReporter, cli_errors, emit_json, out_console

EXAMPLES = """Examples (after the `uts distill` examples):

  uts eval runs/teacher1

  uts eval student1 --split val --matching legacy --json

  uts eval runs/s2 --store local_data/stores/synthetic-p128.h5 --radius-um 7.5 --overlays
"""


Split = choice_enum("Split", choices.SPLITS)
Matching = choice_enum("Matching", choices.MATCHING_MODES)
Truth = choice_enum("Truth", choices.TRUTH_MODES)
Checkpoint = choice_enum("Checkpoint", choices.CHECKPOINT_NAMES)


@cli_errors("eval")
def eval_cmd(
    run: Annotated[str, typer.Argument(help="Run folder, or a run name in RUNS_DIR.")],
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Folder that holds the run folders.")] = Path("runs"),
    store: Annotated[Optional[Path], typer.Option(
        "--store", help="Store to evaluate on (default: the run's).", exists=True, dir_okay=False)] = None,
    split: Annotated[Split, typer.Option(help="Split to score.")] = Split.test,
    matching: Annotated[Matching, typer.Option(
        help="one-to-one (Hungarian) or legacy (the original's count).")] = Matching.one_to_one,
    radius_px: Annotated[Optional[float], typer.Option("--radius-px", min=0.0,
                                                        help="Match radius in pixels (default 30).")] = None,
    radius_um: Annotated[Optional[float], typer.Option("--radius-um", min=0.0,
                                                        help="Match radius in micrometres (e.g. 7.5).")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", min=0.0, max=1.0, help="Pixel threshold (default: the run's).")] = None,
    truth: Annotated[Truth, typer.Option(
        help="Score against the annotations or the clean truth (auto: clean when the store has it).")] = Truth.auto,
    checkpoint: Annotated[Checkpoint, typer.Option(help="Checkpoint to score.")] = Checkpoint.best,
    bn_adapt: Annotated[bool, typer.Option("--bn-adapt", help="Batch-norm adaptation at inference.")] = False,
    overlays: Annotated[bool, typer.Option("--overlays", help="Write PNG overlays (TP green, FP yellow, FN blue).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for the results.",
                                                   file_okay=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Score a run's detections against the points of a split (patch and region level)."""
    from uts_cli.api.evaluate import evaluate
    from uts_cli.io.rundir import resolve_run
    from uts_cli.config import EvalConfig
    cfg = EvalConfig(run=resolve_run(run, runs_dir), store=store, split=split.value, matching=matching.value,
                     radius_px=radius_px, radius_um=radius_um, threshold=threshold, truth=truth.value,
                     checkpoint=checkpoint.value, bn_adapt=bn_adapt, overlays=overlays, output=output,
                     batch_size=batch_size, device=device, workers=workers)
    result = evaluate(cfg, CliReporter())
    if json_output:
        from dataclasses import asdict

        emit_json({"ok": True, "command": "eval", **asdict(result)})
        return
    render_eval(result)


def render_eval(result) -> None:
    from rich.table import Table

    table = Table(title=f"eval {result.run} on {result.split} ({result.truth} truth, {result.matching}, "
                        f"threshold {result.threshold:.3f})", title_justify="left")
    for col in ("level", "precision", "recall", "F1", "TP", "FP", "FN"):
        table.add_column(col, justify="right" if col != "level" else "left")
    for level, c in (("region", result.region), ("patch", result.patch), ("image", result.image_level)):
        table.add_row(level, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}",
                      str(c["tp"]), str(c["fp"]), str(c["fn"]))
    console = out_console()
    console.print(table)
    console.print(f"matches: {result.output}/matches.csv  metrics: {result.output}/metrics.json")
