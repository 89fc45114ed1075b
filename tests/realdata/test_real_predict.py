"""Acceptance: the three real CCMCT 7215 x 5412 fields, as tiled pyramidal TIFFs, through `uts predict`.

Slow (a run is trained on the synthetic dataset first). The figures (time, peak memory, detections
per field) are printed; run with ``-s`` to see them. Peak memory is measured in a child process.
"""
import csv
import json
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import assert_qupath_detections
import tifffile

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

FIELDS = "ccmct-tiles-yolo26/data/MIDOGpp/test/images"


def _pyramid(src: Path, dst: Path, mpp: float = 0.25) -> tuple[int, int]:
    rgb = iio.imread(src)
    res = 1e4 / mpp
    levels = [rgb, rgb[::2, ::2], rgb[::4, ::4]]
    with tifffile.TiffWriter(dst, bigtiff=True, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), photometric="rgb", compression="zlib",
                 resolution=(res, res), resolutionunit="CENTIMETER", metadata={"axes": "YXS"})
        for k, lv in enumerate(levels[1:], start=1):
            tw.write(np.ascontiguousarray(lv), subfiletype=1, tile=(256, 256), photometric="rgb",
                     compression="zlib", resolution=(res / 2 ** k, res / 2 ** k), resolutionunit="CENTIMETER")
    return rgb.shape[:2]


@pytest.mark.slow
@pytest.mark.heavy
def test_ccmct_fields_as_pyramidal_tiffs(realdata, tmp_path_factory):
    import _common
    from bench_predict import train_synthetic_run

    work = tmp_path_factory.mktemp("ccmct-predict")
    run = train_synthetic_run(work, patch=128, n_blocks=1)
    sources = sorted((realdata / FIELDS).glob("*.jpg"))
    assert len(sources) == 3
    figures = []
    for src in sources:
        tif = work / (src.stem + ".tif")
        h, w = _pyramid(src, tif)
        out = work / "out"
        child = _common.run_child([sys.executable, "-m", "uts_cli", "-q", "predict", str(tif), "--run", str(run),
                                   "-o", str(out), "--json", "--device", "cpu", "--workers", "2"])
        doc = child.json_tail()
        assert doc["ok"] and doc["n_done"] == 1
        s = doc["slides"][0]["summary"]
        assert s["pixel_size_source"] == "file" and s["pixel_size_um"] == pytest.approx(0.25)
        assert (s["image_height"], s["image_width"]) == (h, w) == (5412, 7215)
        folder = out / tif.stem
        with open(folder / "detections.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == s["count"]
        for r in rows:
            assert 0 <= float(r["x"]) <= w - 1 and 0 <= float(r["y"]) <= h - 1
            assert float(r["x_um"]) == pytest.approx(float(r["x"]) * 0.25, abs=0.01)
        gj = json.loads((folder / "detections.geojson").read_text())
        assert_qupath_detections(gj)
        assert len(gj["features"]) == s["count"]
        for feat in gj["features"]:
            x, y = feat["geometry"]["coordinates"]
            assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Point"
            assert 0 <= x <= w - 1 and 0 <= y <= h - 1
            assert feat["properties"]["objectType"] == "detection"
            assert feat["properties"]["classification"]["name"] == "Mitotic figure"
        mp = json.loads((folder / "detections.json").read_text())
        assert mp["type"] == "Multiple points" and len(mp["points"]) == s["count"]
        assert iio.imread(folder / "thumbnail.png").ndim == 3
        assert 0.2 < s["background_skipped"] < 0.95   # tiles from the slide's top edge: mostly glass
        figures.append({"field": src.stem, "seconds": s["seconds"], "wall_s": round(child.wall_s, 1),
                        "peak_rss_mb": round(child.maxrss_mb), "peak_tree_pss_mb": round(child.tree_pss_mb),
                        "detections": s["count"], "background_skipped": s["background_skipped"],
                        "tiles_run": s["tiles_run"], "tiles_total": s["tiles_total"]})
        assert child.maxrss_mb < 2048
    print("\nCCMCT predict figures:\n" + "\n".join(json.dumps(f) for f in figures))
