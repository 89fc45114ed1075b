"""``uts normalize``: histogram matching + Macenko stain normalization of a patch store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from uts_cli.cli._options import DeviceOpt, JsonOpt, OverwriteOpt, StoreArg
from uts_cli.cli._output import CliReporter, cli_errors, emit_json, print_table
from uts_cli.cli.prepare import Compression

EXAMPLES = """Examples (after the `uts prepare` examples):

  uts normalize local_data/stores/synthetic-p128.h5

  uts normalize folder-p128.h5 --reference local_data/datasets/synthetic/images/case01/f01.tif -o folder-norm.h5

  uts normalize folder-p128.h5 --no-hist-match --device cpu -o folder-macenko.h5

  uts normalize folder-p128.h5 --like local_data/stores/synthetic-p128-norm.h5 -o folder-like-synthetic.h5
"""


@cli_errors("normalize")
def normalize_cmd(
    store: StoreArg,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Store to write (default STORE-norm.h5 beside the input).", dir_okay=False)] = None,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="Reference H&E image (a whole high-power field).",
        exists=True, dir_okay=False, readable=True)] = None,
    reference_id: Annotated[Optional[str], typer.Option(
        "--reference-id", help="Use this image of the store (e.g. '67/01') as reference.")] = None,
    like: Annotated[Optional[Path], typer.Option(
        "--like", help="Apply the normalization of this normalized store (its reference, steps and "
                       "Macenko options) instead of fitting one: new fields in a model's training colours.",
        exists=True, dir_okay=False, readable=True)] = None,
    hist_match: Annotated[bool, typer.Option(help="Histogram matching to the reference.")] = True,
    macenko: Annotated[bool, typer.Option(help="Macenko normalization after histogram matching.")] = True,
    io: Annotated[float, typer.Option("--io", help="Macenko background intensity Io.")] = 240.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Macenko angle percentile alpha.")] = 1.0,
    beta: Annotated[float, typer.Option("--beta", help="Macenko optical-density threshold beta.")] = 0.15,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Patches per batch.")] = 16,
    compression: Annotated[Optional[Compression], typer.Option(
        "--compression", help="Compression of the output pixels (default: the input store's).",
        show_default=False)] = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Stain-normalize a patch store into a new store (the input is left unchanged)."""
    from uts_cli.api.normalize import normalize
    from uts_cli.config import NormalizeConfig
    cfg = NormalizeConfig(store=store, output=output, reference=reference, reference_image_id=reference_id,
                          like=like, hist_match=hist_match, macenko=macenko, io=io, alpha=alpha, beta=beta,
                          batch_size=batch_size, device=device, overwrite=overwrite,
                          compression=None if compression is None else compression.value)
    result = normalize(cfg, CliReporter())
    if json_output:
        from dataclasses import asdict

        emit_json({"ok": True, "command": "normalize", **asdict(result)})
        return
    print_table(f"Normalized -> {result.store}", [
        ("patches", result.n_patches),
        ("flagged (background, left unchanged)", result.n_flagged),
        ("reference", result.reference if like is None else f"{result.reference} (that of {like})"),
        ("device", result.device),
        ("resumed patches", result.resumed_patches),
        ("time", f"{result.seconds:.1f} s ({result.patches_per_second:.1f} patches/s)"),
    ])
