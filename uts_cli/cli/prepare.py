"""``uts prepare``: tile a raw dataset into an HDF5 patch store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uts_cli import choices
from uts_cli.cli._options import JsonOpt, OverwriteOpt, choice_enum
from uts_cli.cli._output import CliReporter, cli_errors, emit_json, print_table


Dataset = choice_enum("Dataset", choices.DATASET_NAMES)
Compression = choice_enum("Compression", choices.COMPRESSIONS)


EXAMPLES = """Examples (they run as written, in this order, on the built-in synthetic data):

  uts prepare synthetic --patch-size 128

  uts prepare folder --root local_data/datasets/synthetic --patch-size 128 --splits local_data/datasets/synthetic/splits.csv -o folder-p128.h5

Real datasets: uts prepare TUPAC16 --root /data/TUPAC16 (see the README for each layout).
"""


@cli_errors("prepare")
def prepare_cmd(
    dataset: Annotated[Dataset, typer.Argument(case_sensitive=False, help="Dataset layout to read.")],
    root: Annotated[Optional[Path], typer.Option(
        "--root", help="Raw dataset folder (default ./local_data/datasets/NAME).", file_okay=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Store to write (default ./local_data/stores/NAME-pSIZE.h5).", dir_okay=False)] = None,
    patch_size: Annotated[int, typer.Option("--patch-size", min=16, help="Patch side in pixels.")] = 500,
    compression: Annotated[Compression, typer.Option(
        help="Compression of the patch pixels (lzf: fast; gzip: ~20% smaller, 3x slower to write).")] = Compression.lzf,
    splits: Annotated[Optional[Path], typer.Option(
        "--splits", help="CSV 'case,split' overriding the default train/val/test split.",
        exists=True, dir_okay=False)] = None,
    min_tissue: Annotated[Optional[float], typer.Option(
        "--min-tissue", min=0.0, max=1.0,
        help="Skip patches with a smaller tissue fraction (default 0 for fields, 0.2 for whole slides).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="synthetic only: generator seed (default 0).", show_default=False)] = None,
    n_cases: Annotated[Optional[int], typer.Option(
        "--n-cases", min=3, help="synthetic only: cases (patients) of 4 fields each (default 12).",
        show_default=False)] = None,
    val_cases: Annotated[Optional[int], typer.Option(
        "--val-cases", min=1, help="synthetic only: cases in the val split (default 2).", show_default=False)] = None,
    test_cases: Annotated[Optional[int], typer.Option(
        "--test-cases", min=1, help="synthetic only: cases in the test split (default 2).", show_default=False)] = None,
    stain_spread: Annotated[Optional[float], typer.Option(
        "--stain-spread", min=0.0,
        help="synthetic only: multiplier on the case-to-case stain variation; 0 gives every case the same "
             "stain (default 1).", show_default=False)] = None,
    nucleus_density: Annotated[Optional[float], typer.Option(
        "--nucleus-density", min=0.25, max=4.0,
        help="synthetic only: relative number of normal (non-mitotic) nuclei per area (default 1).",
        show_default=False)] = None,
    lookalikes_per_field: Annotated[Optional[float], typer.Option(
        "--lookalikes-per-field", min=0.0,
        help="synthetic only: mean number of mitosis look-alikes per field (default 3).",
        show_default=False)] = None,
    min_confidence: Annotated[Optional[float], typer.Option(
        "--min-confidence", help="MITOS14 only: mitoses below this annotator confidence become hard "
                                 "negatives (default 0).", show_default=False)] = None,
    include_unlabelled: Annotated[bool, typer.Option(
        "--include-unlabelled", help="MIDOG21 only: also tile the images that carry no labels (as test).")] = False,
    annotations: Annotated[Optional[Path], typer.Option(
        "--annotations", help="folder, MIDOG21, CCMCT only: annotation file (folder CSV, MIDOG21 JSON or "
                              "CCMCT JSON; default: inside ROOT).",
        exists=True, dir_okay=False)] = None,
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", help="TUPAC16 only: folder holding mitoses_ground_truth/ (e.g. the alternative labels; "
                         "default ROOT).",
        exists=True, file_okay=False)] = None,
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Tile high-power fields (or whole slides) and their centroid labels into a patch store."""
    from uts_cli.api.prepare import prepare
    from uts_cli.config import PrepareConfig

    # Only what was given goes to the library, which refuses options the dataset does not take.
    given = {"seed": seed, "n_cases": n_cases, "val_cases": val_cases, "test_cases": test_cases,
             "stain_spread": stain_spread, "nucleus_density": nucleus_density,
             "lookalikes_per_field": lookalikes_per_field,
             "min_confidence": min_confidence, "include_unlabelled": include_unlabelled or None,
             "annotations": None if annotations is None else str(annotations),
             "labels": None if labels is None else str(labels)}
    options = {k: v for k, v in given.items() if v is not None}
    cfg = PrepareConfig(dataset=dataset.value, root=root, output=output, patch_size=patch_size,
                        compression=compression.value, splits_file=splits, min_tissue=min_tissue,
                        overwrite=overwrite, dataset_options=options)
    result = prepare(cfg, CliReporter())
    if json_output:
        from dataclasses import asdict

        emit_json({"ok": True, "command": "prepare", **asdict(result)})
        return
    print_table(f"Prepared {result.dataset} -> {result.store}", [
        ("images", result.n_images),
        ("patches", f"{result.n_patches} (train {result.splits['train']}, val {result.splits['val']}, "
                    f"test {result.splits['test']})"),
        ("positive patches", result.n_positive),
        ("mitosis points", result.n_points),
        ("hard-negative points", result.n_hard_negatives),
        ("background tiles skipped", result.n_skipped_background),
        ("resumed images", result.resumed_images),
        ("time", f"{result.seconds:.1f} s"),
    ])

