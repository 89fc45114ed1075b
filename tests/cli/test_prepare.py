"""`uts prepare` end to end on small dataset layouts, and its bad-input paths."""
import json

import h5py
import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from uts_cli.cli.app import app
from uts_cli.io.store import PatchStore, partial_path

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()


def _field(rng, h, w):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (230, 160, 200)
    img += rng.integers(0, 20, size=img.shape, dtype=np.uint8)
    return img


def make_tupac(root, rng, cases=("01", "30", "31"), size=(1000, 1000), n_points=5):
    """TUPAC16 layout; returns {image_id: (K, 2) 0-based points}."""
    truth = {}
    for k, case in enumerate(cases):
        part = root / "mitoses_train_image_data" / f"mitoses_train_image_data_part_{k % 3 + 1}" / case
        part.mkdir(parents=True)
        tifffile.imwrite(part / "01.tif", _field(rng, *size))
        gt = root / "mitoses_ground_truth" / case
        gt.mkdir(parents=True)
        # include points on tile borders and the last pixel row/column
        pts = np.concatenate([rng.integers(1, min(size) + 1, size=(n_points, 2)),
                              [[size[0] // 2, size[1] // 2], [size[0], size[1]], [1, 1]]])
        (gt / "01.csv").write_text("".join(f"{r},{c}\n" for r, c in pts))
        truth[f"{case}/01"] = pts.astype(np.float32) - 1
    return truth


def _points_by_image(path):
    s = PatchStore(path)
    return s, {s.image_ids[i]: s.image_points(i) for i in range(s.n_images)}


def _assert_same_points(found, expected):
    assert set(found) == set(expected)
    for key, pts in expected.items():
        a = np.array(sorted(map(tuple, found[key])))
        b = np.array(sorted(map(tuple, pts)))
        assert a.shape == b.shape, key
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_tupac16_every_centroid_once_in_the_right_place(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "TUPAC16"
    truth = make_tupac(root, rng)
    out = tmp_path / "t.h5"
    r = runner.invoke(app, ["prepare", "TUPAC16", "--root", str(root), "-o", str(out), "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["n_patches"] == 3 * 4 and doc["n_points"] == 3 * 8
    s, found = _points_by_image(out)
    _assert_same_points(found, truth)
    # each point is inside its own patch and the patch pixels equal the source field
    img = tifffile.imread(root / "mitoses_train_image_data/mitoses_train_image_data_part_1/01/01.tif")
    for k in s.image_patches(0):
        y, x = s.origin[k]
        np.testing.assert_array_equal(s.read_rgb(int(k)), img[y:y + 500, x:x + 500])
    assert s.split[s.image_patches(list(s.image_ids).index("30/01"))].tolist() == [1] * 4  # val case
    assert s.split[s.image_patches(list(s.image_ids).index("31/01"))].tolist() == [2] * 4  # test case


def test_partial_last_tile_is_padded_white(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "TUPAC16"
    make_tupac(root, rng, cases=("02",), size=(600, 700), n_points=2)
    out = tmp_path / "t.h5"
    r = runner.invoke(app, ["prepare", "TUPAC16", "--root", str(root), "-o", str(out), "--patch-size", "500"],
                      env=ENV)
    assert r.exit_code == 0, r.stderr
    s = PatchStore(out)
    assert len(s) == 4
    last = s.read_rgb(3)
    assert (last[100:] == 255).all() and (last[:, 200:] == 255).all()


def test_midog21_layout(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "MIDOG21"
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for n in (1, 41, 46, 151):
        tifffile.imwrite(root / "images" / f"{n:03d}.tiff", _field(rng, 300, 400))
        images.append({"id": n, "file_name": f"{n:03d}.tiff", "width": 400, "height": 300})
        if n <= 150:
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": 1, "bbox": [100, 50, 150, 100]})
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": 2, "bbox": [300, 200, 350, 250]})
    (root / "MIDOG.json").write_text(json.dumps({
        "images": images, "annotations": anns,
        "categories": [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "not mitotic figure"}]}))
    out = tmp_path / "m.h5"
    r = runner.invoke(app, ["prepare", "midog21", "--root", str(root), "-o", str(out), "--patch-size", "128",
                            "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n_images"] == 3 and doc["n_points"] == 3 and doc["n_hard_negatives"] == 3
    assert doc["splits"] == {"train": 12, "val": 12, "test": 12}
    s, found = _points_by_image(out)
    for pts in found.values():
        np.testing.assert_allclose(pts, [[75, 125]])


def test_mitos14_layout(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "MITOS14"
    for slide in ("A01", "A03", "A04"):
        frames = root / slide / "frames" / "x40"
        frames.mkdir(parents=True)
        tifffile.imwrite(frames / f"{slide}_00Aa.tiff", _field(rng, 256, 300))
        (root / slide / "mitosis").mkdir()
        (root / slide / "mitosis" / f"{slide}_00Aa_mitosis.csv").write_text("120,40,1\n10,250,0.5\n")
        (root / slide / "mitosis" / f"{slide}_00Aa_not_mitosis.csv").write_text("200,200,0.9\n")
    out = tmp_path / "x.h5"
    r = runner.invoke(app, ["prepare", "MITOS14", "--root", str(root), "-o", str(out), "--patch-size", "128",
                            "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["n_points"] == 6 and doc["n_hard_negatives"] == 3
    s, found = _points_by_image(out)
    for pts in found.values():  # x = column, y = row in MITOS14 files
        np.testing.assert_allclose(sorted(map(tuple, pts)), [(40, 120), (250, 10)])


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_root_is_input_error(tmp_path, case):
    root = tmp_path / "TUPAC16"
    if case == "empty":
        root.mkdir()
    r = runner.invoke(app, ["prepare", "TUPAC16", "--root", str(root), "-o", str(tmp_path / "o.h5")], env=ENV)
    assert r.exit_code in (2, 3)  # Typer refuses a missing --root dir itself only if asked to
    assert "Error" in r.stderr or "does not exist" in r.stderr
    assert not (tmp_path / "o.h5").exists()


def _bad_image(tmp_path, kind):
    rng = np.random.default_rng(4)
    root = tmp_path / "TUPAC16"
    make_tupac(root, rng, cases=("01", "02"), size=(256, 256), n_points=1)
    target = root / "mitoses_train_image_data/mitoses_train_image_data_part_2/02/01.tif"
    if kind == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 3])
    elif kind == "garbage":
        target.write_bytes(b"this is not a tiff" * 100)
    elif kind == "grayscale":
        tifffile.imwrite(target, np.zeros((256, 256), np.uint8))
    elif kind == "rgba":
        tifffile.imwrite(target, np.zeros((256, 256, 4), np.uint8))
    elif kind == "16bit":
        tifffile.imwrite(target, np.zeros((256, 256, 3), np.uint16))
    elif kind == "csv":
        (root / "mitoses_ground_truth/02/01.csv").write_text("12,abc\n")
    elif kind == "outside":
        (root / "mitoses_ground_truth/02/01.csv").write_text("900,10\n")
    return root


@pytest.mark.parametrize("kind", ["truncated", "garbage", "grayscale", "rgba", "16bit", "csv", "outside"])
def test_bad_input_gives_exit_3_and_no_store(tmp_path, kind):
    root = _bad_image(tmp_path, kind)
    out = tmp_path / "o.h5"
    r = runner.invoke(app, ["prepare", "TUPAC16", "--root", str(root), "-o", str(out), "--patch-size", "128"],
                      env=ENV)
    assert r.exit_code == 3, (kind, r.stdout, r.stderr)
    assert "Error:" in r.stderr and "Hint:" in r.stderr
    assert "02" in r.stderr  # says where
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "TUPAC16"
    make_tupac(root, rng, cases=("01",), size=(256, 256), n_points=1)
    out = tmp_path / "o.h5"
    args = ["prepare", "TUPAC16", "--root", str(root), "-o", str(out), "--patch-size", "128"]
    assert runner.invoke(app, args, env=ENV).exit_code == 0
    r = runner.invoke(app, args, env=ENV)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert runner.invoke(app, args + ["--overwrite"], env=ENV).exit_code == 0


def test_interrupted_prepare_resumes_to_identical_store(tmp_path, monkeypatch):
    from uts_cli.api import prepare as prep

    rng = np.random.default_rng(6)
    root = tmp_path / "TUPAC16"
    make_tupac(root, rng, cases=("01", "02", "03", "04"), size=(300, 300), n_points=3)
    ref = tmp_path / "ref.h5"
    args = ["prepare", "TUPAC16", "--root", str(root), "--patch-size", "128"]
    assert runner.invoke(app, args + ["-o", str(ref)], env=ENV).exit_code == 0

    out = tmp_path / "o.h5"
    real_commit = prep.store.commit_image
    calls = {"n": 0}

    def failing_commit(f, i, sha):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_commit(f, i, sha)

    monkeypatch.setattr(prep.store, "commit_image", failing_commit)
    r = runner.invoke(app, args + ["-o", str(out)], env=ENV)
    assert r.exit_code == 130
    assert not out.exists() and partial_path(out).exists()
    monkeypatch.setattr(prep.store, "commit_image", real_commit)
    r = runner.invoke(app, args + ["-o", str(out), "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["resumed_images"] == 2
    assert not partial_path(out).exists()
    with h5py.File(ref) as a, h5py.File(out) as b:
        for name in ("patches/rgb", "patches/origin", "patches/label", "patches/image_idx", "points/yx",
                     "points/patch_idx", "images/id", "images/sha256", "images/patch_start"):
            np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)


def test_corrupt_partial_is_discarded_and_rebuilt(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "TUPAC16"
    make_tupac(root, rng, cases=("01",), size=(256, 256), n_points=1)
    out = tmp_path / "o.h5"
    partial_path(out).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # what a kill -9 can leave
    r = runner.invoke(app, ["prepare", "TUPAC16", "--root", str(root), "-o", str(out), "--patch-size", "128"],
                      env=ENV)
    assert r.exit_code == 0, r.stderr
    assert len(PatchStore(out)) == 4
    assert "discarding the unfinished" in r.stderr and "unreadable" in r.stderr


def test_ccmct_whole_slide_region_reads_with_tissue_filter(tmp_path):
    """A tiled, pyramidal (SubIFD) zlib TIFF named .svs: tiles of glass are skipped, tiles with an
    annotation are kept even on glass, and kept patches equal the slide's pixels."""
    rng = np.random.default_rng(8)
    root = tmp_path / "CCMCT"
    (root / "WSI").mkdir(parents=True)
    slide = np.full((1024, 1536, 3), 245, np.uint8)                    # glass
    slide[512:] = _field(rng, 512, 1536)                                 # tissue in the lower half
    slide[512:, :, 1] = 110                                              # saturated pink: clearly tissue
    name = "be10fa37ad6e88e1f406"  # a test slide of the original split
    with tifffile.TiffWriter(root / "WSI" / f"{name}.svs") as tw:
        tw.write(slide, photometric="rgb", tile=(256, 256), compression="zlib", subifds=1)
        tw.write(slide[::4, ::4], photometric="rgb", tile=(64, 64), compression="zlib", subfiletype=1)
    anns = [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [600, 700, 650, 750]},   # on tissue
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [100, 100, 150, 150]}]   # on glass
    (root / "MITOS_WSI_CCMCT_MEL.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": f"{name}.svs", "width": 1536, "height": 1024}],
        "categories": [{"id": 2, "name": "Mitotic figure"}, {"id": 7, "name": "Mitotic figure lookalike"}],
        "annotations": anns}))
    out = tmp_path / "w.h5"
    r = runner.invoke(app, ["prepare", "CCMCT", "--root", str(root), "-o", str(out), "--patch-size", "256",
                            "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    # 4 x 6 grid; the 12 lower tiles are tissue, the upper 12 glass except the one with a look-alike
    assert doc["n_patches"] == 13 and doc["n_skipped_background"] == 11
    assert doc["n_points"] == 1 and doc["n_hard_negatives"] == 1
    s = PatchStore(out)
    for k in range(len(s)):
        y, x = s.origin[k]
        np.testing.assert_array_equal(s.read_rgb(k), slide[y:y + 256, x:x + 256])
    np.testing.assert_allclose(s.image_points(0), [[725, 625]])
    np.testing.assert_allclose(s.image_points(0, kind=1), [[125, 125]])


@pytest.mark.parametrize("extra, takers", [
    (["--seed", "3"], "synthetic"),
    (["--stain-spread", "2"], "synthetic"),
    (["--nucleus-density", "2"], "synthetic"),
    (["--lookalikes-per-field", "5"], "synthetic"),
    (["--min-confidence", "0.5"], "MITOS14"),
    (["--include-unlabelled"], "MIDOG21"),
    (["--annotations", "{ann}"], "folder, MIDOG21, CCMCT"),
])
def test_options_of_other_datasets_are_refused_not_ignored(tmp_path, extra, takers):
    rng = np.random.default_rng(8)
    root = tmp_path / "TUPAC16"
    make_tupac(root, rng, cases=("01",), size=(256, 256), n_points=1)
    ann = tmp_path / "a.csv"
    ann.write_text("image,x,y\n")
    out = tmp_path / "o.h5"
    extra = [a.format(ann=ann) for a in extra]
    r = runner.invoke(app, ["prepare", "TUPAC16", "--root", str(root), "-o", str(out), "--patch-size", "128",
                            *extra], env=ENV)
    assert r.exit_code == 2, r.stderr
    assert f"{extra[0]} does not apply to dataset TUPAC16" in r.stderr and takers in r.stderr
    assert not out.exists() and not partial_path(out).exists()


def test_labels_option_is_refused_for_mitos14(tmp_path):
    r = runner.invoke(app, ["prepare", "MITOS14", "--root", str(tmp_path), "--labels", str(tmp_path)], env=ENV)
    assert r.exit_code == 2 and "--labels does not apply to dataset MITOS14" in r.stderr
    assert "TUPAC16" in r.stderr


def test_full_disk_in_prepare_names_the_partial_store(tmp_path, monkeypatch):
    import errno
    import os

    import uts_cli.api.prepare as prep

    store_path = tmp_path / "o.h5"
    real = prep.store.append_rows

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prep.store, "append_rows", full)
    make_tupac(tmp_path / "TUPAC16", np.random.default_rng(9), cases=("01",), size=(256, 256), n_points=1)
    r = runner.invoke(app, ["prepare", "TUPAC16", "--root", str(tmp_path / "TUPAC16"), "-o", str(store_path),
                            "--patch-size", "128"], env=ENV)
    monkeypatch.setattr(prep.store, "append_rows", real)
    assert r.exit_code == 4, r.stderr
    assert "o.h5.partial" in r.stderr and "free space" in r.stderr
    assert not store_path.exists()


@pytest.fixture
def small_synthetic(monkeypatch):
    """`uts prepare synthetic` renders 1 field of 128 px per case (the CLI has no size options)."""
    from dataclasses import replace

    from uts_cli.datasets import synthetic

    real = synthetic.generate

    def small(root, spec=None, reporter=None):
        return real(root, replace(spec, fields_per_case=1, field_size=128), reporter)

    monkeypatch.setattr(synthetic, "generate", small)


def test_prepare_synthetic_with_look_options(tmp_path, small_synthetic):
    root, out = tmp_path / "syn", tmp_path / "s.h5"
    base = ["prepare", "synthetic", "--root", str(root), "--patch-size", "128", "--n-cases", "3",
            "--val-cases", "1", "--test-cases", "1"]
    look = ["--nucleus-density", "2", "--stain-spread", "0.5", "--lookalikes-per-field", "5"]
    r = runner.invoke(app, [*base, *look, "-o", str(out), "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_images"] == 3
    spec = json.loads((root / "dataset.json").read_text())["spec"]
    assert (spec["nucleus_density"], spec["stain_spread"], spec["lookalikes_per_field"]) == (2.0, 0.5, 5.0)
    assert PatchStore(out).n_images == 3
    # The same folder asked for another look is refused, not silently reused.
    r = runner.invoke(app, [*base, "--nucleus-density", "3", "-o", str(tmp_path / "t.h5")], env=ENV)
    assert r.exit_code == 2 and "nucleus_density=2.0 (asked 3.0)" in r.stderr


@pytest.mark.parametrize("extra", [["--nucleus-density", "10"], ["--nucleus-density", "0.1"],
                                   ["--stain-spread", "-1"], ["--stain-spread", "nan"],
                                   ["--nucleus-density", "nan"], ["--lookalikes-per-field", "-2"]])
def test_prepare_synthetic_refuses_bad_look_values(tmp_path, small_synthetic, extra):
    root, out = tmp_path / "syn", tmp_path / "s.h5"
    r = runner.invoke(app, ["prepare", "synthetic", "--root", str(root), "-o", str(out), *extra], env=ENV)
    assert r.exit_code == 2, r.stderr
    assert extra[0] in r.stderr or extra[0][2:].replace("-", "_") in r.stderr
    assert not root.exists() and not out.exists()
