"""``uts demo``: prepare -> normalize -> teach -> distill -> eval on the synthetic dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uts_cli import choices

from uts_cli.cli._options import DeviceOpt, JsonOpt, SeedOpt, WorkersOpt, choice_enum
from uts_cli.cli._output import CliReporter, cli_errors, emit_json, out_console

EXAMPLES = """Example (a few minutes on a CPU; the defaults take longer and score better):

  uts demo --n-cases 24 --epochs 2 --steps-per-epoch 10 --batch-size 16 --json

Full run: uts demo (the README's figures: uts demo --profile full; on a GPU add --device cuda).
"""

Profile = choice_enum("Profile", choices.DEMO_PROFILES)


@cli_errors("demo")
def demo_cmd(
    workdir: Annotated[Path, typer.Option("--workdir", help="Folder for the dataset, stores and runs.",
                                          file_okay=False)] = Path("uts-demo"),
    seed: SeedOpt = 0,
    profile: Annotated[Profile, typer.Option(
        "--profile", help="default: under 10 minutes on 2 CPU cores (192 cases, 8 x 200 steps); full: twice "
                          "the cases (384) and the steps (8 x 400), for figures (see the README for times).")] = Profile.default,
    n_cases: Annotated[Optional[int], typer.Option(
        "--n-cases", min=6, help="Cases of the rendered dataset, 4 fields each, a sixth each for val and "
                                 "test (default: the profile's, 192 or 384).")] = None,
    patch_size: Annotated[Optional[int], typer.Option(
        "--patch-size", min=32, help="Patch side in pixels (default: the profile's, 128).")] = None,
    width: Annotated[Optional[int], typer.Option(
        "--width", min=8, help="Channels of the network's first stage (default: the profile's, 32; "
                               "see uts teach --width).")] = None,
    epochs: Annotated[Optional[int], typer.Option(
        min=1, help="Epochs for teacher and student (default: the profile's).")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option(
        "--steps-per-epoch", min=1, help="Steps per epoch (default: the profile's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=1, help="Batch size (default: the profile's).")] = None,
    lr: Annotated[float, typer.Option(
        "--lr", min=0.0, help="Peak learning rate of teacher and student (AdamW, warm-up + cosine).")] = 1e-3,
    workers: WorkersOpt = 1,
    device: DeviceOpt = "auto",
    heldout_cases: Annotated[Optional[int], typer.Option(
        "--heldout-cases", min=0, help="Score on a separate rendered test set of this many cases (4 fields "
                                       "each; default: the profile's, 20 or 40); 0: the dataset's own test cases.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Run the whole method on the built-in synthetic dataset and compare teacher and student."""
    from uts_cli.api.demo import demo, profile_config

    cfg = profile_config(profile.value, workdir=workdir, seed=seed, n_cases=n_cases, patch_size=patch_size,
                         width=width, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr,
                         device=device, workers=workers, heldout_cases=heldout_cases)
    result = demo(cfg, CliReporter())
    if json_output:
        from dataclasses import asdict

        emit_json({"ok": True, "command": "demo", **asdict(result)})
        return
    from rich.table import Table

    ts = result.test_set
    where = (f"held-out test set ({ts['cases']} cases, {ts['fields']} fields, {ts['mitoses']} mitoses)"
             if ts.get("held_out") else f"test split ({ts.get('fields', '?')} fields)")
    table = Table(title=f"UTS demo (seed {seed}, profile {cfg.profile}): {where}, clean truth, region level, "
                        "one-to-one, 30 px", title_justify="left")
    for col in ("model", "precision", "recall", "F1", "TP", "FP", "FN", "image F1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for who in ("teacher", "student"):
        r, il = getattr(result, who)["region"], getattr(result, who)["image_level"]
        table.add_row(who, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["tp"]),
                      str(r["fp"]), str(r["fn"]), f"{il['f1']:.3f}")
    console = out_console()
    console.print(table)
    d = result.distill
    console.print(f"distill kept {d['n_train_kept']} of {d['n_train_before']} training patches; removed "
                  f"positives per clean truth: {d['removed_true_lookalikes']} look-alike only, "
                  f"{d['removed_true_mitoses']} with a real mitosis")
    console.print(f"runs in {result.workdir / 'runs'}; total {result.seconds:.0f} s")
