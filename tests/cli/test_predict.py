"""`uts predict` end to end on a tiny trained run: formats, pixel sizes, resume, failures, eval parity."""
import csv
import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import assert_qupath_detections
import tifffile
from typer.testing import CliRunner

from conftest import train_tiny_teacher
from uts_cli.cli.app import app

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()
FAST = ["--workers", "0", "--device", "cpu", "--batch-size", "8"]


def _field(store, img):
    """A store field put back together from its patches (the raw pixels `prepare` cut)."""
    h, w = (int(v) for v in store.image_shape[img][:2])
    out = np.full((h, w, 3), 255, np.uint8)
    for k in store.image_patches(img):
        y, x = (int(v) for v in store.origin[k])
        out[y:y + store.patch_size, x:x + store.patch_size] = store.read_rgb(int(k))[: h - y, : w - x]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny store, a run trained on it, a threshold that gives blobs, and its fields as PNGs."""
    from uts_cli.io.store import PatchStore
    from uts_cli.model.predict import load_run_model, predict_patches

    import torch

    root = tmp_path_factory.mktemp("predict")
    store_path, runs, _ = train_tiny_teacher(root, n_images=10, steps_per_epoch=3)
    store = PatchStore(store_path)
    model, _ = load_run_model(runs / "t", "best", "cpu")
    idx = store.indices("test")
    cams = np.concatenate([b.cams.astype(np.float32) for b in predict_patches(
        model, store, idx, torch.device("cpu"), batch_size=8, want_cam=True)])
    # A threshold a few blobs per field pass, whatever the one-epoch model learnt.
    threshold = float(np.quantile(cams, 0.97))
    fields = {}
    for img in range(len(store.image_ids)):
        path = root / "fields" / (store.image_ids[img].replace("/", "__") + ".png")
        path.parent.mkdir(exist_ok=True)
        iio.imwrite(path, _field(store, img))
        fields[store.image_ids[img]] = path
    return {"root": root, "store": store_path, "runs": runs, "run": runs / "t", "threshold": threshold,
            "fields": fields, "split": {store.image_ids[i]: store.image_split[i] for i in range(len(store.image_ids))}}


def _predict(args, tiny, out, *extra):
    return runner.invoke(app, ["predict", *[str(a) for a in args], "--run", str(tiny["run"]), "-o", str(out),
                               "--threshold", f"{tiny['threshold']:.6f}", *FAST, *extra], env=ENV)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _points(folder):
    rows = _csv(folder / "detections.csv")
    return np.array([[float(r["y"]), float(r["x"])] for r in rows]).reshape(-1, 2)




def test_png_field_writes_every_output(tiny, tmp_path):
    src = next(iter(tiny["fields"].values()))
    out = tmp_path / "out"
    r = _predict([src], tiny, out, "--mpp", "0.25", "--json", "--heatmap")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["n_done"] == 1 and doc["overlap"] == 16 and doc["tile_size"] == 64
    slide = doc["slides"][0]
    folder = out / src.stem
    for name in ("detections.csv", "detections.geojson", "detections.json", "thumbnail.png", "heatmap.png",
                 "summary.json"):
        assert (folder / name).is_file(), name
    assert not list(out.glob(".*partial*"))
    rows = _csv(folder / "detections.csv")
    assert list(rows[0].keys())[:3] == ["x", "y", "score"] if rows else True
    assert len(rows) == slide["count"] == slide["summary"]["count"]
    pts = _points(folder)
    assert np.all((pts >= 0) & (pts <= 127))
    gj = json.loads((folder / "detections.geojson").read_text())
    assert_qupath_detections(gj)
    assert len(gj["features"]) == slide["count"]
    mp = json.loads((folder / "detections.json").read_text())
    assert mp["type"] == "Multiple points" and len(mp["points"]) == slide["count"]
    for p in mp["points"]:
        assert 0 <= p["point"][0] <= 128 * 0.25 / 1000 and p["point"][2] == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["pixel_size_source"] == "--mpp" and summary["tissue_area_mm2"] > 0
    assert iio.imread(folder / "thumbnail.png").shape[2] == 3
    table = _csv(out / "summary.csv")
    assert table[0]["slide"] == src.stem and int(table[0]["count"]) == slide["count"]


def test_human_output_is_a_table(tiny, tmp_path):
    src = next(iter(tiny["fields"].values()))
    r = _predict([src], tiny, tmp_path / "o", "--assume-run-mpp")
    assert r.exit_code == 0, r.stderr
    assert "mitoses" in r.stdout and src.stem in r.stdout and "summary.csv" in r.stdout


def test_predict_matches_eval_on_the_store_within_2px(tiny, tmp_path):
    """Overlap 0 is the store grid: predict on the raw fields finds what eval finds on the store."""
    ev = tmp_path / "ev"
    r = runner.invoke(app, ["eval", str(tiny["run"]), "--threshold", f"{tiny['threshold']:.6f}", "-o", str(ev),
                            "--device", "cpu", "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    rows = [m for m in _csv(ev / "matches.csv") if m["status"] in ("TP", "FP")]
    test_ids = [i for i, s in tiny["split"].items() if s == 2]
    out = tmp_path / "pred"
    r = _predict([tiny["fields"][i] for i in test_ids], tiny, out, "--overlap", "0", "--all-tiles",
                 "--assume-run-mpp", "--json")
    assert r.exit_code == 0, r.stderr
    total = 0
    for image_id in test_ids:
        ev_pts = np.array([[float(m["y"]), float(m["x"])] for m in rows if m["image"] == image_id]).reshape(-1, 2)
        pr_pts = _points(out / tiny["fields"][image_id].stem)
        assert len(ev_pts) == len(pr_pts), image_id
        if len(ev_pts):
            d = np.linalg.norm(ev_pts[:, None] - pr_pts[None], axis=2)
            assert d.min(axis=1).max() <= 2.0 and d.min(axis=0).max() <= 2.0
        total += len(ev_pts)
    assert total > 0  # the comparison saw detections


def _ome_pyramid(path, levels, mpp):
    """A tiled pyramidal OME-TIFF (sub-IFDs) with the pixel size in the resolution tags."""
    res = 10_000.0 / mpp
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, tile=(32, 32), photometric="rgb",
                 resolution=(res, res), resolutionunit="CENTIMETER", metadata={"axes": "YXS"})
        for k, lv in enumerate(levels[1:], start=1):
            tw.write(lv, subfiletype=1, tile=(32, 32), photometric="rgb",
                     resolution=(res / 2 ** k, res / 2 ** k), resolutionunit="CENTIMETER")


def test_jpeg_stripped_and_pyramidal_tiff_inputs(tiny, tmp_path):
    src = next(iter(tiny["fields"].values()))
    rgb = iio.imread(src)
    jpg = tmp_path / "in" / "a.jpg"
    jpg.parent.mkdir()
    iio.imwrite(jpg, rgb, quality=95)
    strip = tmp_path / "in" / "b.tif"
    tifffile.imwrite(strip, rgb, photometric="rgb", rowsperstrip=16, resolution=(40_000, 40_000),
                     resolutionunit="CENTIMETER")
    pyr = tmp_path / "in" / "c.ome.tif"
    _ome_pyramid(pyr, [rgb, rgb[::2, ::2].copy()], 0.25)
    out = tmp_path / "out"
    r = _predict([jpg, strip, pyr], tiny, out, "--assume-run-mpp", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    by = {s["name"]: s for s in doc["slides"]}
    assert by["b"]["summary"]["pixel_size_source"] == "file"
    assert by["b"]["summary"]["pixel_size_um"] == pytest.approx(0.25)
    assert by["c"]["summary"]["levels"] == 2 and by["c"]["summary"]["pixel_size_source"] == "file"
    assert by["a"]["summary"]["pixel_size_source"] == "run"
    # Same pixels read whole (PNG) or tile by tile (tiled TIFF): identical detections.
    ref = _predict([src], tiny, tmp_path / "ref", "--mpp", "0.25")
    assert ref.exit_code == 0, ref.stderr
    assert np.array_equal(_points(out / "b"), _points(tmp_path / "ref" / src.stem))
    assert np.array_equal(_points(out / "c"), _points(tmp_path / "ref" / src.stem))


@pytest.mark.slow
def test_workers_and_batch_size_do_not_change_results(tiny, tmp_path):
    src = list(tiny["fields"].values())[:2]
    a = _predict(src, tiny, tmp_path / "a", "--mpp", "0.25")
    b = runner.invoke(app, ["predict", *map(str, src), "--run", str(tiny["run"]), "-o", str(tmp_path / "b"),
                            "--threshold", f"{tiny['threshold']:.6f}", "--mpp", "0.25", "--workers", "2",
                            "--batch-size", "3", "--device", "cpu"], env=ENV)
    assert a.exit_code == 0 and b.exit_code == 0, b.stderr
    for p in src:
        assert (tmp_path / "a" / p.stem / "detections.csv").read_text() == \
            (tmp_path / "b" / p.stem / "detections.csv").read_text()


def test_missing_pixel_size_then_mpp_then_assume_run_mpp(tiny, tmp_path):
    src = next(iter(tiny["fields"].values()))
    r = _predict([src], tiny, tmp_path / "o", "--json")
    assert r.exit_code == 3
    doc = json.loads(r.stdout)
    assert not doc["ok"] and doc["n_failed"] == 1
    err = doc["slides"][0]["error"]
    assert "pixel size" in err["message"] and "--mpp" in err["hint"]
    assert not (tmp_path / "o" / src.stem).exists()
    r = _predict([src], tiny, tmp_path / "o", "--mpp", "0.25")
    assert r.exit_code == 0, r.stderr
    r = _predict([src], tiny, tmp_path / "o2", "--assume-run-mpp")
    assert r.exit_code == 0, r.stderr
    assert _points(tmp_path / "o" / src.stem).tolist() == _points(tmp_path / "o2" / src.stem).tolist()


def test_half_pixel_size_input_is_resampled_from_the_matching_level(tiny, tmp_path):
    """An image scanned at 0.125 um/px: tiles come from its 2x level, points in full-res pixels."""
    src = next(iter(tiny["fields"].values()))
    rgb = iio.imread(src)
    big = np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)
    pyr = tmp_path / "fine.tif"
    _ome_pyramid(pyr, [big, rgb], 0.125)
    out = tmp_path / "out"
    r = _predict([pyr], tiny, out, "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)["slides"][0]["summary"]
    assert s["resample_factor"] == pytest.approx(2.0) and s["read_level"] == 1
    assert (s["image_height"], s["image_width"]) == (256, 256)
    ref = _predict([src], tiny, tmp_path / "ref", "--mpp", "0.25")
    assert ref.exit_code == 0
    want = _points(tmp_path / "ref" / src.stem) * 2 + 0.5
    got = _points(out / "fine")
    assert np.allclose(np.sort(got, axis=0), np.sort(want, axis=0), atol=0.01)
    # A single-level file at the fine pixel size is resized instead: similar points.
    flat = tmp_path / "flat.png"
    iio.imwrite(flat, big)
    r = _predict([flat], tiny, tmp_path / "flat", "--mpp", "0.125", "--json")
    assert r.exit_code == 0, r.stderr
    pts = _points(tmp_path / "flat" / "flat")
    assert np.all((pts >= 0) & (pts <= 255))


def test_rerun_skips_complete_slides_and_overwrite_redoes_them(tiny, tmp_path):
    src = list(tiny["fields"].values())[:2]
    out = tmp_path / "out"
    assert _predict(src, tiny, out, "--mpp", "0.25").exit_code == 0
    stamp = (out / src[0].stem / "summary.json").stat().st_mtime_ns
    r = _predict(src, tiny, out, "--mpp", "0.25", "--json")
    doc = json.loads(r.stdout)
    assert doc["n_skipped"] == 2 and doc["n_done"] == 0
    assert (out / src[0].stem / "summary.json").stat().st_mtime_ns == stamp
    assert len(_csv(out / "summary.csv")) == 2
    # Other settings: still skipped, with a warning naming --overwrite.
    r = _predict(src[:1], tiny, out, "--mpp", "0.25", "--overlap", "0")
    assert "--overwrite" in r.stderr
    r = _predict(src[:1], tiny, out, "--mpp", "0.25", "--overwrite", "--json")
    assert json.loads(r.stdout)["n_done"] == 1
    assert (out / src[0].stem / "summary.json").stat().st_mtime_ns != stamp
    assert not list(out.glob(".*"))


def test_interrupted_slide_never_looks_complete(tiny, tmp_path, monkeypatch):
    import uts_cli.thumbnail as thumbnail

    src = next(iter(tiny["fields"].values()))
    out = tmp_path / "out"

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(thumbnail, "write_png", interrupt)
    r = _predict([src], tiny, out, "--mpp", "0.25")
    assert r.exit_code == 130
    assert not (out / src.stem).exists() and not list(out.glob(".*partial"))
    monkeypatch.undo()
    # What kill -9 leaves behind: a partial folder with some files. It is cleared and redone.
    stale = out / f".{src.stem}.partial"
    stale.mkdir(parents=True)
    (stale / "detections.csv").write_text("x,y,score\n")
    r = _predict([src], tiny, out, "--mpp", "0.25", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["n_done"] == 1
    assert not stale.exists() and (out / src.stem / "summary.json").is_file()


def test_bad_inputs_are_reported_and_the_good_ones_done(tiny, tmp_path, monkeypatch):
    src = next(iter(tiny["fields"].values()))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    iio.imwrite(bad / "gray.png", np.full((64, 64), 200, np.uint8))
    out = tmp_path / "out"
    r = _predict([bad / "corrupt.tif", bad / "gray.png", bad / "missing.png", src], tiny, out, "--mpp", "0.25",
                 "--json")
    assert r.exit_code == 3
    doc = json.loads(r.stdout)
    assert doc["n_done"] == 1 and doc["n_failed"] == 3
    errs = {s["name"]: s["error"] for s in doc["slides"] if s["error"]}
    assert "8-bit RGB" in errs["gray"]["message"] and "convert" in errs["gray"]["hint"]
    assert "not found" in errs["missing"]["message"]
    assert all(e["exit_code"] == 3 for e in errs.values())
    assert (out / src.stem / "summary.json").is_file()
    statuses = {row["slide"]: row["status"] for row in _csv(out / "summary.csv")}
    assert statuses == {"corrupt": "failed", "gray": "failed", "missing": "failed", src.stem: "done"}
    # Human mode: one line per bad input on stderr and a final error line.
    r = _predict([bad / "gray.png"], tiny, tmp_path / "o2", "--mpp", "0.25")
    assert r.exit_code == 3 and "1 of 1 inputs failed" in r.stderr


def test_unsupported_compression_names_the_codec_package(tiny, tmp_path, monkeypatch):
    rgb = iio.imread(next(iter(tiny["fields"].values())))
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", compression="jpeg")
    import types

    monkeypatch.setattr(tifffile.tifffile, "imagecodecs", types.SimpleNamespace())
    monkeypatch.setattr(tifffile.TIFF.DECOMPRESSORS, "_codecs", {})
    r = _predict([path], tiny, tmp_path / "o", "--mpp", "0.25", "--json")
    assert r.exit_code == 3
    err = json.loads(r.stdout)["slides"][0]["error"]
    assert "imagecodecs" in err["message"] and err["hint"] == "pip install imagecodecs"


def test_run_without_checkpoint_and_bad_options(tiny, tmp_path):
    src = next(iter(tiny["fields"].values()))
    broken = tmp_path / "runs" / "nock"
    broken.mkdir(parents=True)
    shutil.copy(tiny["run"] / "config.json", broken / "config.json")
    r = runner.invoke(app, ["predict", str(src), "--run", str(broken), "--mpp", "0.25", *FAST], env=ENV)
    assert r.exit_code == 3 and "checkpoint" in r.stderr.lower()
    r = _predict([src], tiny, tmp_path / "o", "--mpp", "0.25", "--overlap", "64")
    assert r.exit_code == 2 and "--overlap" in r.stderr
    r = _predict([src], tiny, tmp_path / "o", "--mpp", "0.25", "--format", "csv,xml")
    assert r.exit_code == 2 and "xml" in r.stderr
    r = _predict([str(tmp_path / "nothing-*.tif")], tiny, tmp_path / "o")
    assert r.exit_code == 2 and "no image matches" in r.stderr


def test_globs_folders_formats_and_name_clashes(tiny, tmp_path):
    fields = list(tiny["fields"].values())[:2]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(fields[0], a / "same.png")
    shutil.copy(fields[1], b / "same.png")
    out = tmp_path / "out"
    r = _predict([str(tmp_path / "*" / "same.png")], tiny, out, "--mpp", "0.25", "--format", "csv", "--json")
    assert r.exit_code == 0, r.stderr
    names = sorted(s["name"] for s in json.loads(r.stdout)["slides"])
    assert len(names) == 2 and all(n.startswith("same-") for n in names) and names[0] != names[1]
    for n in names:
        assert (out / n / "detections.csv").is_file() and not (out / n / "detections.geojson").exists()
    # Same names on a rerun (deterministic suffix), so both are skipped.
    r = _predict([a, b], tiny, out, "--mpp", "0.25", "--format", "csv", "--json")
    assert json.loads(r.stdout)["n_skipped"] == 2


@pytest.mark.slow
def test_tta_averages_flips(tiny, tmp_path):
    src = next(iter(tiny["fields"].values()))
    r = _predict([src], tiny, tmp_path / "o", "--mpp", "0.25", "--tta", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["slides"][0]["summary"]["settings"]["tta"] is True


@pytest.mark.slow
def test_synthetic_dataset_predict_equals_eval_point_for_point(tmp_path):
    """The built-in synthetic dataset: predict on its raw test TIFFs vs eval on its store (96 px
    patches, so the last tile of each 512 px field is padded)."""
    from uts_cli.api.evaluate import evaluate
    from uts_cli.api.prepare import prepare
    from uts_cli.api.teach import teach
    from uts_cli.config import EvalConfig, PrepareConfig, TeachConfig
    from uts_cli.io.store import PatchStore

    store = tmp_path / "syn.h5"
    prepare(PrepareConfig(dataset="synthetic", root=tmp_path / "syn", output=store, patch_size=96,
                          compression="lzf", dataset_options={"n_cases": 5, "fields_per_case": 2,
                                                              "val_cases": 1, "test_cases": 1}))
    teach(TeachConfig(store=store, name="r", runs_dir=tmp_path / "runs", weights="none", n_blocks=2, epochs=1,
                      steps_per_epoch=6, batch_size=8, lr=1e-3, workers=0, device="cpu"))
    run = tmp_path / "runs" / "r"
    ev = evaluate(EvalConfig(run=run, device="cpu", output=tmp_path / "ev"))
    s = PatchStore(store)
    test_imgs = [i for i in range(len(s.image_ids)) if s.image_split[i] == 2]
    root = tmp_path / "syn"
    paths = [next(c for c in (root / s.image_path[i], root / "images" / s.image_path[i]) if c.is_file())
             for i in test_imgs]
    out = tmp_path / "pred"
    r = runner.invoke(app, ["predict", *map(str, paths), "--run", str(run), "-o", str(out), "--overlap", "0",
                            "--all-tiles", "--json", *FAST], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["threshold"] == pytest.approx(ev.threshold)
    rows = [m for m in _csv(tmp_path / "ev" / "matches.csv") if m["status"] in ("TP", "FP")]
    names = dict(zip((s.image_ids[i] for i in test_imgs), json.loads(r.stdout)["slides"]))
    total = 0
    for image_id, slide in names.items():
        ev_pts = np.array([[float(m["y"]), float(m["x"])] for m in rows if m["image"] == image_id]).reshape(-1, 2)
        pr_pts = _points(Path(slide["output"]))
        assert len(ev_pts) == len(pr_pts), image_id
        if len(ev_pts):
            d = np.linalg.norm(ev_pts[:, None] - pr_pts[None], axis=2)
            assert d.min(axis=1).max() <= 2.0 and d.min(axis=0).max() <= 2.0
        total += len(ev_pts)
    print(f"\nsynthetic test fields: {total} detections compared, eval region {ev.region}")


@pytest.mark.slow
@pytest.mark.heavy
def test_30000px_mostly_background_slide_stays_under_2gb(tmp_path):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import _common
    from bench_predict import train_synthetic_run, write_synthetic_slide

    run = train_synthetic_run(tmp_path, patch=256, n_blocks=1, stain_norm=False)
    slide = tmp_path / "big.tif"
    info = write_synthetic_slide(slide, 30_000, tissue=0.03)
    child = _common.run_child([sys.executable, "-m", "uts_cli", "-q", "predict", str(slide), "--run", str(run),
                               "-o", str(tmp_path / "out"), "--json", "--device", "cpu", "--workers", "2"])
    s = child.json_tail()["slides"][0]["summary"]
    figures = {"write": info, "seconds": s["seconds"], "peak_rss_mb": round(child.maxrss_mb),
               "peak_tree_pss_mb": round(child.tree_pss_mb), "background_skipped": s["background_skipped"],
               "tiles_run": s["tiles_run"], "tiles_total": s["tiles_total"], "peak_band_mb": s["peak_band_mb"],
               "timings": s["timings"]}
    print("\n30k slide:", json.dumps(figures))
    assert (s["image_height"], s["image_width"]) == (30_000, 30_000) and s["levels"] >= 4
    assert s["background_skipped"] > 0.8
    assert child.maxrss_mb < 2048 and child.tree_pss_mb < 2048


@pytest.mark.slow
def test_ctrl_c_and_kill_9_leave_no_complete_looking_slide(tiny, tmp_path):
    """Real signals on a real process: SIGINT exits 130 and cleans up; SIGKILL leaves only the
    hidden partial folder, which the rerun clears before finishing the slide."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    big = tmp_path / "big.png"
    iio.imwrite(big, np.tile(iio.imread(next(iter(tiny["fields"].values()))), (24, 24, 1)))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "uts_cli", "predict", str(big), "--run", str(tiny["run"]), "-o", str(out),
            "--mpp", "0.25", "--workers", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    partial = out / ".big.partial"
    for sig, code in ((signal.SIGINT, 130), (signal.SIGKILL, -9)):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not partial.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(1.0)  # inside the tile loop
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert proc.returncode == code
        assert not (out / "big").exists()
        assert partial.exists() == (sig == signal.SIGKILL)
    done = subprocess.run(argv + ["--json"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "big" / "summary.json").is_file() and not partial.exists()
