"""Tests for the raw dataset readers, splits and the registry, on small synthetic layouts."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tifffile

from uts_cli.datasets import ccmct, folder, midog21, mitos14, registry, tupac16
from uts_cli.datasets.base import DatasetListing, SourceImage
from uts_cli.datasets.splits import apply_splits, hash_splits, read_splits_file
from uts_cli.errors import InputDataError, UsageError


def _tif(path: Path, h: int = 64, w: int = 64, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full((h, w, 3), 200, np.uint8)
    tifffile.imwrite(path, data, photometric="rgb", **kwargs)
    return path


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _by_id(listing: DatasetListing) -> dict[str, SourceImage]:
    return {image.image_id: image for image in listing.images}


# --- TUPAC16 -----------------------------------------------------------------------------

@pytest.fixture
def tupac_root(tmp_path):
    root = tmp_path / "TUPAC16"
    images = root / "mitoses_train_image_data"
    _tif(images / "mitoses_train_image_data_part_1" / "01" / "01.tif")
    _tif(images / "mitoses_train_image_data_part_1" / "01" / "02.tiff")
    _text(images / "mitoses_train_image_data_part_1" / "01" / "Thumbs.db", "junk")
    _tif(images / "mitoses_train_image_data_part_2" / "30" / "01.tif")
    _tif(images / "mitoses_train_image_data_part_3" / "31" / "01.tif")
    _text(root / ".DS_Store", "junk")
    gt = root / "mitoses_ground_truth"
    _text(gt / "01" / "01.csv", "10,20\n64,64\n")
    _text(gt / "30" / "01.csv", "")
    _text(gt / "99" / "01.csv", "1,1\n")
    _text(root / "nonmitoses_ground_truth" / "01" / "01.csv", "5,5\n")
    return root


def test_tupac_listing(tupac_root):
    listing = tupac16.discover(tupac_root)
    images = _by_id(listing)
    assert list(images) == ["01/01", "01/02", "30/01", "31/01"]
    assert [images[i].case_id for i in images] == ["01", "01", "30", "31"]
    assert [images[i].split for i in images] == ["train", "train", "val", "test"]
    first = images["01/01"]
    assert np.array_equal(first.points_yx, [[9, 19], [63, 63], [4, 4]])
    assert list(first.kinds) == [0, 0, 1]
    assert first.points_yx.dtype == np.float32 and first.kinds.dtype == np.uint8
    assert first.pixel_size_um == 0.25 and first.path.is_absolute() and not first.whole_slide
    assert images["30/01"].points_yx.shape == (0, 2)
    warnings = "\n".join(listing.warnings)
    assert "99/01" in warnings and "have no image" in warnings
    assert "01/02" in warnings and "31/01" in warnings and "no mitosis" in warnings


def test_tupac_hyphenated_folder_and_labels_option(tmp_path):
    root = tmp_path / "T"
    _tif(root / "mitoses-train_image_data" / "part_1" / "05" / "03.tif")
    labels = tmp_path / "TUPAC_AL"
    _text(labels / "mitoses_ground_truth" / "05" / "03.csv", "2,3\n")
    _text(labels / "nonmitoses_ground_truth" / "05" / "03.csv", "0,7\n")
    listing = tupac16.discover(root, labels=labels)
    image = _by_id(listing)["05/03"]
    assert np.array_equal(image.points_yx, [[1, 2], [0, 6]]) and list(image.kinds) == [0, 1]


def test_tupac_root_errors(tmp_path):
    with pytest.raises(InputDataError) as info:
        tupac16.discover(tmp_path / "missing")
    assert "not found" in info.value.message and "mitoses_train_image_data" in info.value.hint
    assert "--root" in info.value.hint
    empty = tmp_path / "empty"
    empty.mkdir()
    _text(empty / "Thumbs.db", "x")
    with pytest.raises(InputDataError, match="empty"):
        tupac16.discover(empty)
    other = tmp_path / "other"
    _text(other / "readme.txt", "x")
    with pytest.raises(InputDataError, match="no TUPAC16 image folder"):
        tupac16.discover(other)


def test_tupac_missing_ground_truth(tupac_root):
    import shutil

    shutil.rmtree(tupac_root / "mitoses_ground_truth")
    with pytest.raises(InputDataError, match="no TUPAC16 ground truth"):
        tupac16.discover(tupac_root)


def test_tupac_malformed_csv_names_file_and_line(tupac_root):
    bad = _text(tupac_root / "mitoses_ground_truth" / "01" / "02.csv", "1,2\n3;4\n")
    with pytest.raises(InputDataError) as info:
        tupac16.discover(tupac_root)
    assert str(bad) in info.value.message and "line 2" in info.value.message


def test_tupac_point_outside_image(tupac_root):
    _text(tupac_root / "mitoses_ground_truth" / "31" / "01.csv", "3,3\n66,10\n")
    with pytest.raises(InputDataError) as info:
        tupac16.discover(tupac_root)
    message = info.value.message
    assert "ROI 31/01" in message and "point 1" in message and "y=65" in message


def test_tupac_root_splits_file(tupac_root):
    _text(tupac_root / "splits.csv", "case,split\n1,test\n31,train\n")
    images = _by_id(tupac16.discover(tupac_root))
    assert images["01/01"].split == "test" and images["31/01"].split == "train"
    assert images["30/01"].split == "val"
    _text(tupac_root / "splits.csv", "case,split\n77,test\n")
    with pytest.raises(InputDataError, match="77"):
        tupac16.discover(tupac_root)


# --- MIDOG21 -----------------------------------------------------------------------------

def _midog_json(entries, annotations):
    return json.dumps({
        "images": [{"id": int(stem), "file_name": f"{stem}.tiff", "width": 64, "height": 64}
                   for stem in entries],
        "categories": [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "not mitotic figure"}],
        "annotations": annotations,
    })


@pytest.fixture
def midog_root(tmp_path):
    root = tmp_path / "MIDOG21"
    for stem in ("001", "041", "046", "151", "003"):
        _tif(root / "images" / f"{stem}.tiff")
    _tif(root / "images" / "002.tif")
    _text(root / "images" / "Thumbs.db", "x")
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 60, 70]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10]},
        {"id": 3, "image_id": 41, "category_id": 1, "bbox": [30, 30, 40, 40]},
    ]
    _text(root / "MIDOG.json", _midog_json(["001", "002", "041", "046", "151", "004"], annotations))
    return root


def test_midog_listing(midog_root):
    listing = midog21.discover(midog_root)
    images = _by_id(listing)
    assert list(images) == ["001", "002", "041", "046"]
    assert [images[i].split for i in images] == ["train", "train", "val", "test"]
    assert [images[i].case_id for i in images] == ["001", "002", "041", "046"]
    assert np.array_equal(images["001"].points_yx, [[45, 35], [5, 5]])
    assert list(images["001"].kinds) == [0, 1]
    assert images["002"].points_yx.shape == (0, 2) and images["002"].labelled
    assert images["001"].pixel_size_um == 0.25
    warnings = "\n".join(listing.warnings)
    assert "004.tiff" in warnings and "003" in warnings and "151" in warnings
    assert "include_unlabelled" in warnings


def test_midog_include_unlabelled(midog_root):
    images = _by_id(midog21.discover(midog_root, include_unlabelled=True))
    assert not images["151"].labelled and images["151"].split == "test"
    assert all(images[i].labelled for i in ("001", "002", "041", "046"))


def test_midog_errors(midog_root, tmp_path):
    _text(midog_root / "MIDOG.json", '{"images": [}')
    with pytest.raises(InputDataError, match="MIDOG.json, line 1"):
        midog21.discover(midog_root)
    annotations = [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [60, 60, 80, 80]}]
    _text(midog_root / "MIDOG.json", _midog_json(["002"], annotations))
    with pytest.raises(InputDataError) as info:
        midog21.discover(midog_root)
    assert "image 002" in info.value.message and "outside" in info.value.message
    (midog_root / "MIDOG.json").unlink()
    with pytest.raises(InputDataError, match="annotation file not found"):
        midog21.discover(midog_root)


# --- MITOS14 -----------------------------------------------------------------------------

@pytest.fixture
def mitos_root(tmp_path):
    root = tmp_path / "MITOS14"
    _tif(root / "A03" / "frames" / "x40" / "A03_00Aa.tiff")
    _tif(root / "A03" / "frames" / "x40" / "A03_00Ab.tif")
    _tif(root / "A03" / "frames" / "x20" / "A03_00Aa.tiff", h=32, w=32)
    _text(root / "A03" / "mitosis" / "A03_00Aa_mitosis.csv", "10,20,1\n30,40,0.3\n")
    _text(root / "A03" / "mitosis" / "A03_00Aa_not_mitosis.csv", "5,6,0.5\n")
    _text(root / "A03" / "mitosis" / "A03_00Zz_mitosis.csv", "1,1,1\n")
    _tif(root / "A04" / "frames" / "x40" / "A04_00Aa.tiff")
    _tif(root / "H10" / "frames" / "x40" / "H10_01Aa.tiff")
    _text(root / "H10" / "mitosis" / "H10_01Aa_mitosis.csv", "")
    return root


def test_mitos14_listing(mitos_root):
    listing = mitos14.discover(mitos_root)
    images = _by_id(listing)
    assert list(images) == ["A03/A03_00Aa", "A03/A03_00Ab", "A04/A04_00Aa", "H10/H10_01Aa"]
    assert [images[i].split for i in images] == ["val", "val", "test", "train"]
    assert [images[i].case_id for i in images] == ["A03", "A03", "A04", "H10"]
    frame = images["A03/A03_00Aa"]
    assert np.array_equal(frame.points_yx, [[20, 10], [40, 30], [6, 5]])
    assert list(frame.kinds) == [0, 0, 1] and frame.pixel_size_um == 0.2455
    warnings = "\n".join(listing.warnings)
    assert "A03/A03_00Ab" in warnings and "A03/A03_00Zz" in warnings


def test_mitos14_min_confidence_demotes_to_hard_negative(mitos_root):
    frame = _by_id(mitos14.discover(mitos_root, min_confidence=0.5))["A03/A03_00Aa"]
    assert list(frame.kinds) == [0, 1, 1]
    with pytest.raises(UsageError):
        mitos14.discover(mitos_root, min_confidence=2.0)


def test_mitos14_without_slides(tmp_path):
    _text(tmp_path / "M" / "A03" / "readme.txt", "x")
    with pytest.raises(InputDataError, match="frames/x40"):
        mitos14.discover(tmp_path / "M")


# --- CCMCT -------------------------------------------------------------------------------

def test_ccmct_listing(tmp_path):
    root = tmp_path / "CCMCT"
    slide = "be10fa37ad6e88e1f406"
    _tif(root / "WSI" / f"{slide}.svs", h=128, w=96, tile=(32, 32),
         description="Aperio Image Library v10\n96x128 |MPP = 0.2475")
    _tif(root / "WSI" / "0123456789abcdef0123.svs", h=64, w=64)
    data = {
        "images": [{"id": 11, "file_name": f"{slide}.svs", "width": 96, "height": 128},
                   {"id": 4, "file_name": "0123456789abcdef0123.svs", "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "Granulocyte"}, {"id": 2, "name": "Mitotic figure"},
                       {"id": 7, "name": "Mitotic figure lookalike"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 2, "bbox": [25, 75, 75, 125]},
            {"id": 2, "image_id": 11, "category_id": 7, "bbox": [0, 0, 50, 50]},
            {"id": 3, "image_id": 11, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 4, "image_id": 4, "category_id": 1, "bbox": [10, 10, 20, 20]},
        ],
    }
    _text(root / "MITOS_WSI_CCMCT_MEL.json", json.dumps(data))
    listing = ccmct.discover(root)
    images = _by_id(listing)
    assert list(images) == ["0123456789abcdef0123", slide]
    test_slide = images[slide]
    assert test_slide.whole_slide and test_slide.split == "test" and test_slide.case_id == slide
    assert np.array_equal(test_slide.points_yx, [[100, 50], [25, 25]])
    assert list(test_slide.kinds) == [0, 1]
    assert test_slide.pixel_size_um == pytest.approx(0.2475)
    assert images["0123456789abcdef0123"].split == "train"
    assert images["0123456789abcdef0123"].pixel_size_um == 0.25
    assert any("Granulocyte: 2" in w for w in listing.warnings)


def test_ccmct_category_kinds():
    assert ccmct.category_kinds({1: "Granulocyte", 2: "Mitotic figure", 7: "Mitotic figure lookalike",
                                 3: "Tumor cell"}) == {2: 0, 7: 1}
    assert ccmct.category_kinds({}) == {2: 0, 7: 1}


# --- generic folder ----------------------------------------------------------------------

def test_folder_with_case_subfolders(tmp_path):
    root = tmp_path / "mine"
    _tif(root / "images" / "caseA" / "img1.tif")
    import imageio.v3 as iio

    (root / "images" / "caseA").mkdir(parents=True, exist_ok=True)
    iio.imwrite(root / "images" / "caseA" / "img2.png", np.full((40, 50, 3), 9, np.uint8))
    _tif(root / "images" / "caseB" / "img3.tif")
    _text(root / "images" / "caseB" / ".DS_Store", "x")
    _text(root / "annotations.csv", (
        "image,x,y,label\n"
        "caseA/img1.tif,10,20,1\n"
        "img2.png,49,39,hard_negative\n"
        "caseB/img3,3,4\n"
        "ghost.tif,1,1\n"
    ))
    _text(root / "dataset.json", '{"pixel_size_um": 0.5}')
    listing = folder.discover(root)
    images = _by_id(listing)
    assert list(images) == ["caseA/img1", "caseA/img2", "caseB/img3"]
    assert [images[i].case_id for i in images] == ["caseA", "caseA", "caseB"]
    assert images["caseA/img1"].split == images["caseA/img2"].split
    assert np.array_equal(images["caseA/img2"].points_yx, [[39, 49]])
    assert list(images["caseA/img2"].kinds) == [1]
    assert np.array_equal(images["caseB/img3"].points_yx, [[4, 3]])
    assert all(image.pixel_size_um == 0.5 for image in listing.images)
    assert any("ghost.tif" in w for w in listing.warnings)


def test_folder_flat_root_and_unannotated_image(tmp_path):
    root = tmp_path / "flat"
    _tif(root / "x.tif")
    _tif(root / "y.tif", resolution=(1e4 / 0.3, 1e4 / 0.3), resolutionunit="CENTIMETER")
    _text(root / "annotations.csv", "image,x,y\nx.tif,5,5\n")
    listing = folder.discover(root)
    images = _by_id(listing)
    assert [images[i].case_id for i in images] == ["x", "y"]
    assert images["y"].points_yx.shape == (0, 2)
    assert images["y"].pixel_size_um == pytest.approx(0.3) and images["x"].pixel_size_um is None
    assert any("no line" in w and "y" in w for w in listing.warnings)


def test_folder_errors(tmp_path):
    root = tmp_path / "amb"
    _tif(root / "images" / "a" / "x.tif")
    _tif(root / "images" / "b" / "x.tif")
    _text(root / "annotations.csv", "image,x,y\nx.tif,1,1\n")
    with pytest.raises(InputDataError, match="ambiguous"):
        folder.discover(root)
    _text(root / "annotations.csv", "image,x,y\na/x.tif,1,70\n")
    with pytest.raises(InputDataError, match="image a/x.*outside"):
        folder.discover(root)
    (root / "annotations.csv").unlink()
    with pytest.raises(InputDataError, match="annotation file not found"):
        folder.discover(root)
    no_images = tmp_path / "noimg"
    _text(no_images / "annotations.csv", "image,x,y\n")
    with pytest.raises(InputDataError, match="no images"):
        folder.discover(no_images)


# --- splits ------------------------------------------------------------------------------

def test_hash_splits_are_stable_and_balanced():
    cases = [f"case{i:03d}" for i in range(200)]
    splits, warnings = hash_splits(cases)
    counts = {s: list(splits.values()).count(s) for s in ("train", "val", "test")}
    assert 120 <= counts["train"] <= 160 and counts["val"] >= 15 and counts["test"] >= 15
    more, _ = hash_splits(cases + ["new-case"])
    assert all(more[c] == splits[c] for c in cases) and not warnings
    # with three cases, val and test are never left empty
    few, _ = hash_splits(["a", "b", "c"])
    assert sorted(few.values()) == ["test", "train", "val"]


def test_read_splits_file(tmp_path):
    good = _text(tmp_path / "s.csv", "Case,Split\n01,VAL\nA03,test\n\n")
    assert read_splits_file(good) == {"01": "val", "A03": "test"}
    for text, words in [("01,val\n", "header"), ("case,split\n01\n", "line 2"),
                        ("case,split\n01,dev\n", "line 2: unknown split"),
                        ("case,split\n01,val\n01,test\n", "line 3"), ("", "empty")]:
        with pytest.raises(InputDataError, match=words):
            read_splits_file(_text(tmp_path / "bad.csv", text))


def test_apply_splits_strict_and_lenient(tmp_path):
    image = SourceImage("01/01", "01", tmp_path / "a.tif", np.zeros((0, 2), np.float32),
                        np.zeros(0, np.uint8), "train")
    listing = DatasetListing("TUPAC16", tmp_path, [image])
    apply_splits(listing, {"1": "test"})
    assert image.split == "test"
    with pytest.raises(InputDataError, match="not in dataset TUPAC16: 99"):
        apply_splits(listing, {"99": "val"})
    apply_splits(listing, {"99": "val"}, strict=False)
    assert image.split == "test" and "99" in listing.warnings[-1]


# --- registry ----------------------------------------------------------------------------

def test_registry_names_and_roots(tupac_root):
    assert registry.DATASET_NAMES == ("TUPAC16", "MIDOG21", "MITOS14", "CCMCT", "folder", "synthetic")
    assert registry.default_root("tupac16") == Path("local_data/datasets/TUPAC16")
    assert registry.default_root("FOLDER") == Path("local_data/datasets/folder")
    listing = registry.discover("Tupac16", root=tupac_root)
    assert listing.name == "TUPAC16" and len(listing.images) == 4
    with pytest.raises(UsageError) as info:
        registry.discover("camelyon", root=tupac_root)
    assert "MIDOG21" in info.value.hint
    with pytest.raises(UsageError, match="--min-confidence does not apply to dataset TUPAC16") as info:
        registry.discover("TUPAC16", root=tupac_root, min_confidence=0.5)
    assert "MITOS14" in info.value.hint


@pytest.mark.parametrize("dataset, option, value, takers", [
    ("TUPAC16", "seed", 3, "synthetic"),
    ("TUPAC16", "stain_spread", 2.0, "synthetic"),
    ("MITOS14", "nucleus_density", 2.0, "synthetic"),
    ("folder", "lookalikes_per_field", 5.0, "synthetic"),
    ("synthetic", "min_confidence", 0.5, "MITOS14"),
    ("folder", "include_unlabelled", True, "MIDOG21"),
    ("MIDOG21", "labels", "x", "TUPAC16"),
    ("MITOS14", "annotations", "a.csv", "folder, MIDOG21, CCMCT"),
])
def test_registry_refuses_options_of_other_datasets(dataset, option, value, takers, tmp_path):
    # Refused before the folder is even looked at: tmp_path holds no dataset.
    with pytest.raises(UsageError) as info:
        registry.discover(dataset, root=tmp_path, **{option: value})
    assert registry.option_flag(option) in info.value.message and takers in info.value.hint


def test_dataset_options_table_matches_the_readers():
    import importlib
    import inspect

    for option, takers in registry.DATASET_OPTIONS.items():
        for name in registry.DATASET_NAMES:
            if name == "synthetic":
                continue  # takes SyntheticSpec fields through **options
            params = inspect.signature(importlib.import_module(registry._MODULES[name]).discover).parameters
            assert (option in params) == (name in takers), (option, name)
    from uts_cli.datasets.synthetic import SyntheticSpec

    spec_fields = {f.name for f in __import__("dataclasses").fields(SyntheticSpec)}
    assert all(o in spec_fields for o, takers in registry.DATASET_OPTIONS.items() if "synthetic" in takers)


def test_registry_splits_option(tupac_root, tmp_path):
    splits = _text(tmp_path / "my_splits.csv", "case,split\n30,train\n")
    listing = registry.discover("TUPAC16", root=tupac_root, splits=splits)
    assert _by_id(listing)["30/01"].split == "train"


def test_registry_default_root_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputDataError) as info:
        registry.discover("MIDOG21")
    assert str(Path("local_data/datasets/MIDOG21")) in info.value.message


def test_registry_synthetic_is_imported_lazily(monkeypatch, tmp_path):
    calls = {}

    def fake_discover(root, **options):
        calls["args"] = (root, options)
        return DatasetListing("synthetic", root, [])

    module = types.ModuleType("uts_cli.datasets.synthetic")
    module.discover = fake_discover
    monkeypatch.setitem(sys.modules, "uts_cli.datasets.synthetic", module)
    listing = registry.discover("SYNTHETIC", root=tmp_path, seed=3)
    assert listing.name == "synthetic" and calls["args"] == (tmp_path, {"seed": 3})
