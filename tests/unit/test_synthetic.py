"""The built-in synthetic dataset: files, determinism, label noise, atomicity, discovery."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.color import rgb2hed

from uts_cli.datasets import _render, synthetic
from uts_cli.choices import KIND_HARD_NEGATIVE, KIND_MITOSIS
from uts_cli.datasets.synthetic import SyntheticSpec, discover, generate
from uts_cli.errors import UsageError

# Tiny but with enough objects that the noise fractions bite: 3 cases x 3 fields of 256 px.
TINY = SyntheticSpec(n_cases=3, fields_per_case=3, field_size=256, mitoses_per_field=2.5,
                     lookalikes_per_field=3.0, label_noise_fp=0.5, label_noise_fn=0.3,
                     val_cases=1, test_cases=1, seed=5)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "synthetic", TINY)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def keyed(rows, label=None) -> set[tuple[str, str, str]]:
    return {(r["image"], r["x"], r["y"]) for r in rows if label is None or r["label"] == label}


def test_files_and_counts_match_manifest(tiny_root):
    manifest = json.loads((tiny_root / "dataset.json").read_text())
    assert manifest["complete"] is True
    assert manifest["spec"] == asdict(TINY)
    assert manifest["pixel_size_um"] == 0.25
    images = tiny_root / "images"
    tifs = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.tif"))
    assert tifs == [f"case0{c}/f0{f}.tif" for c in (1, 2, 3) for f in (1, 2, 3)]
    counts = manifest["counts"]
    truth = read_rows(tiny_root / "truth.csv")
    ann = read_rows(tiny_root / "annotations.csv")
    assert counts["fields"] == len(tifs) == 9
    assert counts["mitoses"] == len(keyed(truth, "mitosis")) > 0
    assert counts["lookalikes"] == len(keyed(truth, "hard_negative")) > 0
    assert counts["annotated"] == len(ann)
    assert {r["label"] for r in ann} == {"mitosis"}
    assert sum(counts["splits"][s]["mitoses"] for s in ("train", "val", "test")) == counts["mitoses"]
    assert list(read_rows(tiny_root / "annotations.csv")[0]) == ["image", "x", "y", "label"]
    splits = read_rows(tiny_root / "splits.csv")
    assert sorted(r["split"] for r in splits) == ["test", "train", "val"]
    assert not list(tiny_root.parent.glob(".synthetic.partial-*"))
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_root.stat().st_mode & 0o777 == 0o777 & ~umask


def test_images_are_rgb_uint8_with_resolution(tiny_root):
    path = next((tiny_root / "images").rglob("*.tif"))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        img = page.asarray()
        assert page.resolution == pytest.approx((40000.0, 40000.0))
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8


def test_val_test_annotations_are_the_truth_and_train_is_noisy(tiny_root):
    splits = {r["case"]: r["split"] for r in read_rows(tiny_root / "splits.csv")}
    truth = read_rows(tiny_root / "truth.csv")
    ann = read_rows(tiny_root / "annotations.csv")

    def of(rows, split):
        return [r for r in rows if splits[r["image"].split("/")[0]] == split]

    for split in ("val", "test"):
        assert keyed(of(ann, split)) == keyed(of(truth, split), "mitosis")
        assert len(of(truth, split)) > 0
    train_ann = keyed(of(ann, "train"))
    train_mit = keyed(of(truth, "train"), "mitosis")
    train_look = keyed(of(truth, "train"), "hard_negative")
    fp = train_ann & train_look
    missed = train_mit - train_ann
    assert train_ann <= train_mit | train_look
    assert len(fp) == round(TINY.label_noise_fp * len(train_look)) > 0
    assert len(missed) == round(TINY.label_noise_fn * len(train_mit)) > 0
    manifest = json.loads((tiny_root / "dataset.json").read_text())
    assert manifest["counts"]["splits"]["train"]["annotated_lookalikes"] == len(fp)
    assert manifest["counts"]["splits"]["train"]["missed_mitoses"] == len(missed)


def test_points_inside_apart_and_on_haematoxylin(tiny_root):
    rows = read_rows(tiny_root / "truth_objects.csv")
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    yy, xx = np.mgrid[:256, :256]
    for image, objs in by_image.items():
        h = rgb2hed(tifffile.imread(tiny_root / "images" / image))[..., 0]
        yx = np.array([(float(o["y"]), float(o["x"])) for o in objs])
        assert ((yx >= 0) & (yx <= 255)).all()
        d = np.hypot(*(yx[:, None] - yx[None]).transpose(2, 0, 1)) + np.eye(len(yx)) * 1e3
        assert d.min() >= 40
        dist = np.hypot(yy[None] - yx[:, 0, None, None], xx[None] - yx[:, 1, None, None])
        # Reference: the darkest ordinary nuclei, away from mitoses and look-alikes.
        ordinary = np.percentile(h[dist.min(axis=0) > 30], 99.5)
        median = np.median(h)
        for o, r in zip(objs, dist):
            # Anaphase/telophase centroids lie between the chromosome sets, so look around.
            peak = h[r <= 14].max()
            assert peak > (1.2 if o["label"] == "mitosis" else 1.0) * ordinary, (image, o)
            if o["subtype"] in ("prophase", "prometaphase", "metaphase", "pyknotic"):
                assert h[r <= 3].mean() > 5 * median, (image, o)


def test_renderer_mitoses_are_dark():
    """Checks the renderer directly: chromatin is far darker than background tissue."""
    rng = np.random.default_rng(0)
    rgb, objs = _render.render_field(rng, 256, _render.case_stain(rng), 3, 0, edge=False)
    grey = rgb.mean(axis=2)
    for o in objs:
        y, x = int(round(o.y)), int(round(o.x))
        assert grey[max(y - 14, 0):y + 15, max(x - 14, 0):x + 15].min() < 0.5 * np.median(grey)


def test_near_white_area_exists(tiny_root):
    fractions = []
    for path in sorted((tiny_root / "images").rglob("*.tif")):
        rgb = tifffile.imread(path)
        fractions.append(float((rgb.min(axis=2) > 215).mean()))
    assert max(fractions) > 0.3  # a tissue-edge field with bare glass
    assert min(fractions) < 0.3


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny_root, tmp_path):
    small = replace(TINY, fields_per_case=1)
    a = generate(tmp_path / "a", small)
    b = generate(tmp_path / "b", small)
    c = generate(tmp_path / "c", replace(small, seed=6))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) >= 3 + 5
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "images/case01/f01.tif").read_bytes() != (c / "images/case01/f01.tif").read_bytes()
    assert (a / "truth.csv").read_bytes() != (c / "truth.csv").read_bytes()
    # Fields do not depend on how many fields or cases the spec asks for.
    assert (a / "images/case01/f01.tif").read_bytes() == (tiny_root / "images/case01/f01.tif").read_bytes()


def test_rendering_in_worker_processes_writes_the_same_dataset(tiny_root, tmp_path):
    # Each field draws from its own seeded generator, so any number of workers gives the same bytes.
    parallel = generate(tmp_path / "p", TINY, workers=2)
    files = sorted(p.relative_to(tiny_root) for p in tiny_root.rglob("*") if p.is_file())
    assert sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file()) == files
    for rel in files:
        assert (parallel / rel).read_bytes() == (tiny_root / rel).read_bytes(), rel


def test_render_workers_default_to_the_cpus_for_large_datasets(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert synthetic._render_workers(TINY, None) == 1          # 9 fields: not worth a worker's start-up
    big = replace(TINY, n_cases=12, fields_per_case=4)
    assert synthetic._render_workers(big, None) == 3
    assert synthetic._render_workers(big, 1) == 1 and synthetic._render_workers(TINY, 2) == 2


def test_generation_is_atomic(tmp_path, monkeypatch):
    calls = []
    real = _render.render_field

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(_render, "render_field", flaky)
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(root, TINY)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_dataset_is_reused_or_refused(tiny_root, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("should not render")

    monkeypatch.setattr(_render, "render_field", boom)
    assert generate(tiny_root, TINY) == tiny_root
    with pytest.raises(UsageError) as exc:
        generate(tiny_root, replace(TINY, seed=9))
    assert "--root" in exc.value.hint


def test_existing_non_dataset_folder_is_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError):
        generate(tmp_path / "ds", TINY)
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"


def test_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "ds").mkdir()
    root = generate(tmp_path / "ds", replace(TINY, fields_per_case=1))
    assert (root / "dataset.json").is_file()
    assert len(list((root / "images").rglob("*.tif"))) == 3


def test_spec_validation():
    spec = SyntheticSpec(seed=np.int64(3), mitoses_per_field=3)
    assert type(spec.seed) is int and spec.mitoses_per_field == 3.0
    assert json.dumps(asdict(spec))
    with pytest.raises(UsageError):
        SyntheticSpec(n_cases=2, val_cases=1, test_cases=1)
    with pytest.raises(UsageError):
        SyntheticSpec(label_noise_fp=1.5)
    with pytest.raises(UsageError):
        SyntheticSpec(field_size=64)
    with pytest.raises(UsageError):
        SyntheticSpec(mitoses_per_field=-1)


def test_discover_lists_images_with_truth(tiny_root):
    listing = discover(tiny_root)
    assert listing.name == "synthetic"
    assert len(listing.images) == 9
    splits = {r["case"]: r["split"] for r in read_rows(tiny_root / "splits.csv")}
    truth = read_rows(tiny_root / "truth.csv")
    ann = read_rows(tiny_root / "annotations.csv")
    n_points = n_truth = 0
    for im in listing.images:
        assert im.path.is_file() and im.path.is_absolute()
        assert im.image_id == f"{im.case_id}/{im.path.stem}"
        assert im.split == splits[im.case_id]
        assert im.pixel_size_um == 0.25
        assert im.points_yx.dtype == np.float32 and im.points_yx.shape[1] == 2
        assert (im.kinds == KIND_MITOSIS).all()
        assert im.truth_yx is not None and im.truth_kinds is not None
        assert set(np.unique(im.truth_kinds)) <= {KIND_MITOSIS, KIND_HARD_NEGATIVE}
        n_points += len(im.points_yx)
        n_truth += len(im.truth_yx)
        if im.split != "train":
            mit = im.truth_yx[im.truth_kinds == KIND_MITOSIS]
            assert sorted(map(tuple, im.points_yx.tolist())) == sorted(map(tuple, mit.tolist()))
    assert n_points == len(ann) and n_truth == len(truth)
    first = next(r for r in truth if r["image"] == "case01/f01.tif")
    im = next(i for i in listing.images if i.image_id == "case01/f01")
    assert im.truth_yx[0].tolist() == pytest.approx([float(first["y"]), float(first["x"])])


def test_discover_generates_missing_root_and_checks_spec(tmp_path):
    root = tmp_path / "gen"
    options = {**asdict(TINY), "fields_per_case": 1, "seed": 11}
    listing = discover(root, **options)
    assert len(listing.images) == 3
    assert json.loads((root / "dataset.json").read_text())["spec"]["seed"] == 11
    assert len(discover(root).images) == 3  # no options: whatever is there
    assert len(discover(root, seed=11, splits_file=None).images) == 3
    with pytest.raises(UsageError) as exc:
        discover(root, seed=12)
    assert "seed" in exc.value.message
    with pytest.raises(UsageError):
        discover(root, colour="blue")


def test_default_root_is_local_data():
    assert synthetic.DEFAULT_ROOT == Path("local_data/datasets/synthetic")


# ----------------------------------------------------------------------------- look settings

LOOK = SyntheticSpec(n_cases=3, fields_per_case=1, field_size=128, val_cases=1, test_cases=1, seed=2)


def _stain_before_look_settings(rng):
    """``case_stain`` as it was before ``stain_spread``: the default look must draw exactly this."""
    base_io = rng.uniform(236, 252)
    return _render.Stain(
        h=_render._unit(_render._H_REF + rng.normal(0, 0.06, 3)),
        e=_render._unit(_render._E_REF + rng.normal(0, 0.07, 3)),
        h_gain=float(rng.uniform(0.75, 1.25)),
        e_gain=float(rng.uniform(0.6, 1.35)),
        io=np.clip(base_io + rng.normal(0, 3.0, 3), 225, 255),
        gamma=float(rng.uniform(0.9, 1.1)),
    )


def _same_stain(a, b) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("h", "e", "h_gain", "e_gain", "io", "gamma"))


def test_default_stain_spread_draws_exactly_as_before():
    for case in range(20):
        old = _stain_before_look_settings(np.random.default_rng([0, case, 0]))
        assert _same_stain(_render.case_stain(np.random.default_rng([0, case, 0])), old)
        assert _same_stain(_render.case_stain(np.random.default_rng([0, case, 0]), 1.0), old)


def test_default_look_settings_render_the_same_field():
    def field(**look):
        rng = np.random.default_rng([3, 1, 1])
        return _render.render_field(rng, 128, _render.case_stain(rng), 1, 1, edge=False, **look)

    (a, objs_a), (b, objs_b) = field(), field(nucleus_density=1.0)
    assert np.array_equal(a, b) and objs_a == objs_b
    c, _ = field(nucleus_density=2.0)
    assert not np.array_equal(a, c)


def test_stain_spread_zero_gives_every_case_the_same_stain():
    a = _render.case_stain(np.random.default_rng([0, 0, 0]), 0.0)
    b = _render.case_stain(np.random.default_rng([0, 1, 0]), 0.0)
    assert _same_stain(a, b)
    assert (a.h_gain, a.gamma) == (1.0, 1.0) and np.allclose(a.io, 244.0)
    assert not _same_stain(_render.case_stain(np.random.default_rng([0, 0, 0])),
                           _render.case_stain(np.random.default_rng([0, 1, 0])))


def test_stain_spread_widens_the_case_to_case_variation():
    def gains(spread):
        return np.array([_render.case_stain(np.random.default_rng([0, c, 0]), spread).h_gain for c in range(50)])

    sd1, sd2 = gains(1.0).std(), gains(2.0).std()
    assert sd2 == pytest.approx(2 * sd1, rel=1e-6)  # same draws, twice the spread
    # However wide the spread, the stain stays valid.
    for c in range(50):
        s = _render.case_stain(np.random.default_rng([0, c, 0]), 20.0)
        assert s.h_gain >= 0.05 and s.e_gain >= 0.05 and 0.7 <= s.gamma <= 1.3
        assert ((s.io >= 225) & (s.io <= 255)).all()
        assert np.isclose(np.linalg.norm(s.h), 1) and (s.h > 0).all() and (s.e > 0).all()


def test_nucleus_density_paints_more_nuclei():
    from scipy import ndimage

    size = 256
    tissue = np.ones((size, size), bool)
    tissue[:, :4] = False
    tissue_dist = ndimage.distance_transform_edt(tissue)
    cell = np.tile(np.linspace(0, 1, size, dtype=np.float32), (size, 1))

    def count(density):
        return len(_render._place_nuclei(np.random.default_rng(7), size, tissue_dist, cell, [], density))

    assert count(1.0) == len(_render._place_nuclei(np.random.default_rng(7), size, tissue_dist, cell, []))
    assert count(0.5) < count(1.0) < count(2.0)


def test_look_settings_are_validated():
    assert SyntheticSpec(stain_spread=0).stain_spread == 0.0
    assert SyntheticSpec(nucleus_density=0.25).nucleus_density == 0.25
    assert SyntheticSpec(nucleus_density=4).nucleus_density == 4.0
    assert SyntheticSpec(lookalikes_per_field=0).lookalikes_per_field == 0.0
    bad = [{"stain_spread": -0.5}, {"stain_spread": float("nan")}, {"stain_spread": float("inf")},
           {"stain_spread": "2"}, {"nucleus_density": 10}, {"nucleus_density": 0.1},
           {"nucleus_density": 0}, {"nucleus_density": -1}, {"nucleus_density": float("nan")},
           {"lookalikes_per_field": -1}, {"lookalikes_per_field": float("nan")}]
    for options in bad:
        with pytest.raises(UsageError):
            SyntheticSpec(**options)


def test_look_settings_reach_the_dataset(tmp_path):
    spec = replace(LOOK, stain_spread=0.0, nucleus_density=2.0, lookalikes_per_field=6.0)
    root = generate(tmp_path / "look", spec)
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["spec"] == asdict(spec)
    stains = list(manifest["stains"].values())
    assert all(s == stains[0] for s in stains)  # spread 0: one stain for every case
    assert len(discover(root, stain_spread=0.0, nucleus_density=2.0).images) == 3
    with pytest.raises(UsageError, match="nucleus_density"):
        discover(root, nucleus_density=1.0)


def test_dataset_made_before_the_look_settings_is_still_recognised(tmp_path, monkeypatch):
    root = generate(tmp_path / "old", LOOK)
    manifest = json.loads((root / "dataset.json").read_text())
    for key in ("stain_spread", "nucleus_density"):
        del manifest["spec"][key]  # as written before these settings existed
    (root / "dataset.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def boom(*args, **kwargs):
        raise AssertionError("should not render")

    monkeypatch.setattr(_render, "render_field", boom)
    assert generate(root, LOOK) == root
    assert len(discover(root, seed=2, stain_spread=1.0, nucleus_density=1.0).images) == 3
    with pytest.raises(UsageError):
        generate(root, replace(LOOK, stain_spread=2.0))
    with pytest.raises(UsageError, match="stain_spread"):
        discover(root, stain_spread=2.0)
