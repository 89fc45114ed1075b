"""Tests for uts_cli.io.annotations: every parser's conversion to 0-based (y, x) and its errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from uts_cli.errors import InputDataError
from uts_cli.io.annotations import (
    check_points_in_image,
    parse_label,
    read_coco_points,
    read_midog_json,
    read_mitos14_csv,
    read_points_csv,
    read_tupac_csv,
    read_yolo_points,
)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --- TUPAC16 -----------------------------------------------------------------------------

def test_tupac_one_based_to_zero_based(tmp_path):
    path = _write(tmp_path / "01.csv", "839,2\n778,1586\n")
    yx = read_tupac_csv(path)
    assert yx.dtype == np.float32 and yx.shape == (2, 2)
    assert np.array_equal(yx, [[838, 1], [777, 1585]])
    assert np.array_equal(read_tupac_csv(path, one_based=False), [[839, 2], [778, 1586]])


def test_tupac_empty_header_crlf_floats_and_column_zero(tmp_path):
    assert read_tupac_csv(_write(tmp_path / "e.csv", "")).shape == (0, 2)
    assert read_tupac_csv(_write(tmp_path / "b.csv", "\n\n")).shape == (0, 2)
    path = _write(tmp_path / "h.csv", "\ufeffrow,col\r\n10.5,20\r\n\r\n705,0\r\n")
    # column 0 (present in the real alternative labels) is read as the first column
    assert np.array_equal(read_tupac_csv(path), [[9.5, 19], [704, 0]])


@pytest.mark.parametrize(
    "text, line",
    [("1,2\n3\n", 2), ("1,2\n3,4,5\n", 2), ("5,x\n", 1), ("1,2\n\n-4,3\n", 3), ("1,2\nrow,col\n", 2)],
)
def test_tupac_malformed_line_names_file_and_line(tmp_path, text, line):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(InputDataError) as info:
        read_tupac_csv(path)
    assert str(path) in info.value.message and f"line {line}" in info.value.message


def test_missing_annotation_file(tmp_path):
    with pytest.raises(InputDataError, match="not found"):
        read_tupac_csv(tmp_path / "none.csv")


# --- MITOS14 -----------------------------------------------------------------------------

def test_mitos14_xy_confidence(tmp_path):
    path = _write(tmp_path / "A03_00Aa_mitosis.csv", "100,200,1\n30.5,40,0.65\n7,8,0.3\n")
    yx, conf = read_mitos14_csv(path)
    assert np.array_equal(yx, [[200, 100], [40, 30.5], [8, 7]])
    assert np.allclose(conf, [1, 0.65, 0.3])
    yx, conf = read_mitos14_csv(path, min_confidence=0.5)
    assert np.array_equal(yx, [[200, 100], [40, 30.5]]) and len(conf) == 2


def test_mitos14_malformed(tmp_path):
    path = _write(tmp_path / "m.csv", "1,2,1\n1,2\n")
    with pytest.raises(InputDataError, match="line 2"):
        read_mitos14_csv(path)


# --- generic points CSV ------------------------------------------------------------------

def test_points_csv_labels_and_keys(tmp_path):
    path = _write(tmp_path / "annotations.csv", (
        "image,x,y,label\n"
        "caseA/img1.tif,10,20,mitosis\n"
        "caseA/img1.tif,11.5,21,Hard_Negative\n"
        "img2.png,5,6,\n"
        "img2.png,7,8,FALSE\n"
        ".\\caseB\\img3.tif,1,2,non-mitosis\n"
        "empty.tif,,,\n"
    ))
    points = read_points_csv(path)
    assert list(points) == ["caseA/img1.tif", "img2.png", "caseB/img3.tif", "empty.tif"]
    yx, kinds = points["caseA/img1.tif"]
    assert np.array_equal(yx, [[20, 10], [21, 11.5]]) and list(kinds) == [0, 1]
    assert list(points["img2.png"][1]) == [0, 1]
    assert list(points["caseB/img3.tif"][1]) == [1]
    assert points["empty.tif"][0].shape == (0, 2) and points["empty.tif"][1].dtype == np.uint8


def test_points_csv_without_label_column_and_reordered(tmp_path):
    path = _write(tmp_path / "p.csv", "Y,X,Image\n3,4,a.tif\n")
    yx, kinds = read_points_csv(path)["a.tif"]
    assert np.array_equal(yx, [[3, 4]]) and list(kinds) == [0]


@pytest.mark.parametrize(
    "text, words",
    [
        ("img,x,y\na.tif,1,2\n", "line 1"),
        ("image,x,y\na.tif,1,two\n", "line 2"),
        ("image,x,y,label\na.tif,1,2,maybe\n", "line 2: unknown label"),
        ("image,x,y\n\n,1,2\n", "line 3: empty image"),
        ("", "empty"),
    ],
)
def test_points_csv_errors(tmp_path, text, words):
    path = _write(tmp_path / "p.csv", text)
    with pytest.raises(InputDataError) as info:
        read_points_csv(path)
    assert str(path) in info.value.message and words in info.value.message


def test_parse_label():
    assert parse_label("TRUE") == 0 and parse_label("1") == 0 and parse_label("") == 0
    assert parse_label("non_mitosis") == 1 and parse_label("hard negative") == 1
    assert parse_label("other") is None


# --- YOLO --------------------------------------------------------------------------------

def test_yolo_points(tmp_path):
    path = _write(tmp_path / "t.txt", "0 0.5 0.25 0.1 0.1\n1 0.1 1.0 0.01 0.01")
    yx, kinds = read_yolo_points(path, width=200, height=100)
    assert np.allclose(yx, [[25, 100], [100, 20]]) and list(kinds) == [0, 1]
    assert read_yolo_points(_write(tmp_path / "e.txt", ""), 10, 10)[0].shape == (0, 2)


@pytest.mark.parametrize("text", ["2 0.5 0.5 0.1 0.1\n", "0 0.5 0.5\n", "0 1.5 0.5 0.1 0.1\n"])
def test_yolo_errors(tmp_path, text):
    path = _write(tmp_path / "bad.txt", text)
    with pytest.raises(InputDataError, match="line 1"):
        read_yolo_points(path, 10, 10)


# --- COCO / MIDOG ------------------------------------------------------------------------

def _midog(**overrides):
    data = {
        "images": [
            {"id": 1, "file_name": "001.tiff", "width": 100, "height": 80},
            {"id": 2, "file_name": "002.tiff", "width": 100, "height": 80},
        ],
        "categories": [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "not mitotic figure"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 60, 70]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0.5, 1.5, 50.5, 51.5]},
        ],
    }
    data.update(overrides)
    return data


def test_midog_centres_and_kinds(tmp_path):
    path = _write(tmp_path / "MIDOG.json", json.dumps(_midog()))
    midog = read_midog_json(path)
    assert [(i.id, i.file_name, i.width, i.height) for i in midog.images] == [
        (1, "001.tiff", 100, 80), (2, "002.tiff", 100, 80)]
    yx, kinds = midog.points[1]
    assert np.array_equal(yx, [[45, 35], [26.5, 25.5]]) and list(kinds) == [0, 1]
    assert midog.points[2][0].shape == (0, 2)
    assert midog.categories == {1: "mitotic figure", 2: "not mitotic figure"}


@pytest.mark.parametrize(
    "mutate, pointer",
    [
        (lambda d: d.pop("images"), "images: missing"),
        (lambda d: d.update(images={"id": 1}), "images: expected a list"),
        (lambda d: d["images"][1].pop("width"), "images[1].width: missing"),
        (lambda d: d["images"][0].update(id="1"), "images[0].id"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), "annotations[1].bbox"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, 3, "4"]), "annotations[1].bbox"),
        (lambda d: d["annotations"][0].update(category_id=3),
         "annotations[0].category_id: unknown category 3"),
        (lambda d: d["annotations"][1].update(image_id=9), "annotations[1].image_id: no image with id 9"),
        (lambda d: d["annotations"][0].pop("bbox"), "annotations[0].bbox: missing"),
    ],
)
def test_midog_structure_errors_point_at_the_entry(tmp_path, mutate, pointer):
    data = _midog()
    mutate(data)
    path = _write(tmp_path / "MIDOG.json", json.dumps(data))
    with pytest.raises(InputDataError) as info:
        read_midog_json(path)
    assert str(path) in info.value.message and pointer in info.value.message


def test_invalid_json_names_line(tmp_path):
    path = _write(tmp_path / "MIDOG.json", '{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(InputDataError, match="line 2, column"):
        read_midog_json(path)


def test_coco_ignores_other_categories_when_asked(tmp_path):
    data = _midog()
    data["annotations"].append({"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 2, 2]})
    path = _write(tmp_path / "c.json", json.dumps(data))
    coco = read_coco_points(path, {2: 0}, ignore_other_categories=True)
    assert coco.ignored == {1: 1, 7: 1}
    assert list(coco.points[1][1]) == [0] and coco.points[2][0].shape == (0, 2)
    by_name = read_coco_points(path, lambda cats: {k: 0 for k, v in cats.items() if v == "mitotic figure"},
                               ignore_other_categories=True)
    assert by_name.ignored == {2: 1, 7: 1}


# --- bounds ------------------------------------------------------------------------------

def test_check_points_clips_within_half_a_pixel():
    yx = np.array([[-0.5, 0], [79.4, 99.5], [10, 10]], np.float32)
    out = check_points_in_image(yx, 80, 100, "image x")
    assert np.array_equal(out, [[0, 0], [79, 99], [10, 10]])


def test_check_points_outside_names_image_and_point():
    yx = np.array([[1, 1], [80.6, 5]], np.float32)
    with pytest.raises(InputDataError) as info:
        check_points_in_image(yx, 80, 100, "image 007 (MIDOG.json)")
    assert "image 007 (MIDOG.json)" in info.value.message
    assert "point 1" in info.value.message and "y=80.6" in info.value.message
