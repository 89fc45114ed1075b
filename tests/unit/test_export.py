"""Tests for uts_cli.io.export: CSV and QuPath GeoJSON point files."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from uts_cli.errors import InputDataError
from conftest import assert_qupath_detections
from uts_cli.io.export import (
    DEFAULT_COLORS,
    class_color,
    point_feature,
    write_geojson_points,
    write_points_csv,
)


def test_csv_header_rows_and_numpy_values(tmp_path):
    path = tmp_path / "out" / "detections.csv"
    rows = [
        {"image": "a.tif", "y": np.float32(10.5), "x": np.float32(0.1), "score": np.float64(0.9)},
        {"image": "b.tif", "y": 1, "x": 2, "reason": "no TP"},
    ]
    assert write_points_csv(path, rows) == 2
    lines = path.read_text().splitlines()
    assert lines[0] == "image,y,x,score,reason"
    assert lines[1] == "a.tif,10.5,0.1,0.9,"
    back = list(csv.DictReader(path.open()))
    assert back[1] == {"image": "b.tif", "y": "1", "x": "2", "score": "", "reason": "no TP"}
    assert [p.name for p in path.parent.iterdir()] == ["detections.csv"]  # no temp file left


def test_csv_empty_with_fieldnames_and_errors(tmp_path):
    path = tmp_path / "empty.csv"
    assert write_points_csv(path, [], fieldnames=["image", "y", "x"]) == 0
    assert path.read_text() == "image,y,x\n"
    with pytest.raises(InputDataError):
        write_points_csv(tmp_path / "bad.csv", [{"y": 1, "z": 2}], fieldnames=["y"])


def test_geojson_points_qupath_layout(tmp_path):
    path = tmp_path / "points.geojson"
    items = [
        {"y": 12.0, "x": 340.5, "classification": "mitosis",
         "measurements": {"score": np.float32(0.875)},
         "properties": {"reason": "FP", "yx": np.array([12.0, 340.5], np.float32)}},
        {"y": np.float32(7), "x": 8, "classification": "custom", "name": "p2",
         "object_type": "detection"},
    ]
    assert write_geojson_points(path, items) == 2
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    f0, f1 = data["features"]
    assert f0["type"] == "Feature"
    assert f0["geometry"] == {"type": "Point", "coordinates": [340.5, 12.0]}  # [x, y]
    props = f0["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "mitosis", "color": list(DEFAULT_COLORS["mitosis"])}
    assert props["measurements"] == {"score": 0.875}
    assert props["reason"] == "FP"
    assert props["yx"] == [12.0, 340.5]
    assert f1["geometry"]["coordinates"] == [8.0, 7.0]
    assert f1["properties"]["objectType"] == "detection"
    assert f1["properties"]["name"] == "p2"
    color = f1["properties"]["classification"]["color"]
    assert color == class_color("custom") and len(color) == 3 and all(0 <= c <= 255 for c in color)


def test_geojson_ready_features_and_errors(tmp_path):
    feat = point_feature(1.0, 2.0, "TP", measurements={"distance": 3.5})
    path = tmp_path / "f.geojson"
    write_geojson_points(path, [feat])
    assert json.loads(path.read_text())["features"] == [feat]
    with pytest.raises(InputDataError, match="lacks"):
        write_geojson_points(tmp_path / "x.geojson", [{"y": 1.0, "classification": "TP"}])
    with pytest.raises(InputDataError, match="not finite"):
        point_feature(1.0, 2.0, "TP", measurements={"score": float("nan")})
    with pytest.raises(InputDataError, match="non-finite"):
        point_feature(np.nan, 2.0, "TP")
    with pytest.raises(InputDataError, match="NaN"):
        write_geojson_points(tmp_path / "y.geojson",
                             [{"y": 1, "x": 2, "classification": "TP", "properties": {"s": np.nan}}])
    assert not (tmp_path / "y.geojson").exists()


def test_geojson_empty_collection(tmp_path):
    path = tmp_path / "none.geojson"
    assert write_geojson_points(path, []) == 0
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}


# --- per-slide exports of `uts predict` ------------------------------------------------------

from uts_cli.io.export import (  # noqa: E402  (grouped with the tests that use them)
    EXPORT_FORMATS,
    SUMMARY_COLUMNS,
    write_detections_csv,
    write_detections_geojson,
    write_multiple_points,
    write_summary_csv,
)

# (row, col) detections deliberately out of order; the files list them by y, then x.
YX = np.array([[30.25, 7.0], [4.0, 100.5], [30.25, 2.0]], dtype=np.float32)
SCORES = np.array([0.5, 0.875, 0.25], dtype=np.float32)

def test_export_formats_constant():
    assert EXPORT_FORMATS == ("csv", "geojson", "midog")


def test_detections_csv_with_pixel_size_sorted_by_y_then_x(tmp_path):
    path = tmp_path / "slide" / "detections.csv"
    assert write_detections_csv(path, YX, SCORES, pixel_size_um=0.25) == path
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["x", "y", "score", "x_um", "y_um"]
    assert [(r["x"], r["y"], r["score"]) for r in rows] == [
        ("100.5", "4.0", "0.875"), ("2.0", "30.25", "0.25"), ("7.0", "30.25", "0.5")]
    assert [(r["x_um"], r["y_um"]) for r in rows] == [("25.125", "1.0"), ("0.5", "7.5625"), ("1.75", "7.5625")]
    assert [p.name for p in path.parent.iterdir()] == ["detections.csv"]


def test_detections_csv_without_pixel_size_and_empty(tmp_path):
    path = tmp_path / "a.csv"
    write_detections_csv(path, YX[:1], SCORES[:1], None)
    assert path.read_text() == "x,y,score\n7.0,30.25,0.5\n"
    write_detections_csv(path, np.zeros((0, 2)), [], 0.25)
    assert path.read_text() == "x,y,score,x_um,y_um\n"


@pytest.mark.parametrize("yx, scores, match", [
    (np.zeros((2, 3)), [0.1, 0.2], "shape"),
    (np.zeros((2, 2)), [0.1], "scores"),
    (np.array([[1.0, np.nan]]), [0.5], "NaN"),
    (np.ones((1, 2)), [1.5], r"\[0, 1\]"),
    (np.ones((1, 2)), [-0.1], r"\[0, 1\]"),
])
def test_detection_writers_reject_bad_input_and_keep_the_old_file(tmp_path, yx, scores, match):
    writers = [
        lambda p: write_detections_csv(p, yx, scores, 0.25),
        lambda p: write_detections_geojson(p, yx, scores),
        lambda p: write_multiple_points(p, yx, scores, 0.25),
    ]
    for i, write in enumerate(writers):
        path = tmp_path / f"out{i}"
        path.write_text("previous complete file\n")
        with pytest.raises(InputDataError, match=match):
            write(path)
        assert path.read_text() == "previous complete file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out0", "out1", "out2"]


def test_writers_leave_nothing_when_the_rename_fails(tmp_path, monkeypatch):
    import os

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_detections_geojson(tmp_path / "d.geojson", YX, SCORES)
    with pytest.raises(OSError):
        write_multiple_points(tmp_path / "d.json", YX, SCORES, 0.25)
    assert list(tmp_path.iterdir()) == []


def test_detections_geojson_is_a_qupath_detection_collection(tmp_path):
    path = tmp_path / "nested" / "detections.geojson"
    write_detections_geojson(path, YX, SCORES, properties={"slide": "s1"})
    doc = json.loads(path.read_text())
    assert_qupath_detections(doc)
    feats = doc["features"]
    assert [f["geometry"]["coordinates"] for f in feats] == [[100.5, 4.0], [2.0, 30.25], [7.0, 30.25]]
    assert [f["properties"]["measurements"] for f in feats] == [{"score": 0.875}, {"score": 0.25}, {"score": 0.5}]
    props = feats[0]["properties"]
    assert props["classification"] == {"name": "Mitotic figure", "color": list(DEFAULT_COLORS["mitosis"])}
    assert props["slide"] == "s1"
    other = tmp_path / "o.geojson"
    write_detections_geojson(other, YX[:1], SCORES[:1], classification="candidate")
    cls = json.loads(other.read_text())["features"][0]["properties"]["classification"]
    assert cls == {"name": "candidate", "color": class_color("candidate")}


def test_detections_geojson_empty(tmp_path):
    path = tmp_path / "e.geojson"
    write_detections_geojson(path, [], [])
    doc = json.loads(path.read_text())
    assert doc == {"type": "FeatureCollection", "features": []}
    assert_qupath_detections(doc)


def test_structural_check_catches_a_wrong_feature():
    bad = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1.0]},
         "properties": {"objectType": "detection", "classification": {"name": "x", "color": [1, 2, 3]},
                        "measurements": {}}}]}
    with pytest.raises(Exception):
        assert_qupath_detections(bad)


def test_multiple_points_in_millimetres(tmp_path):
    path = tmp_path / "detections.json"
    write_multiple_points(path, YX, SCORES, pixel_size_um=0.25)
    doc = json.loads(path.read_text())
    assert set(doc) == {"type", "points", "version"}
    assert doc["type"] == "Multiple points"
    assert doc["version"] == {"major": 1, "minor": 0}
    pts = doc["points"]
    assert [p["point"] for p in pts] == [[0.025125, 0.001, 0], [0.0005, 0.0075625, 0], [0.00175, 0.0075625, 0]]
    assert [p["probability"] for p in pts] == [0.875, 0.25, 0.5]
    assert all(p["name"] == "mitotic figure" for p in pts)
    write_multiple_points(path, [], [], 0.25)
    assert json.loads(path.read_text())["points"] == []


@pytest.mark.parametrize("px", [None, 0.0, -1.0, float("nan")])
def test_multiple_points_needs_a_pixel_size(tmp_path, px):
    with pytest.raises(InputDataError, match="pixel size"):
        write_multiple_points(tmp_path / "d.json", YX, SCORES, px)
    assert not (tmp_path / "d.json").exists()


def test_summary_csv_column_order_and_nested_hotspot(tmp_path):
    from uts_cli.clinical import clinical_summary

    with_hotspot = clinical_summary(np.array([[5.0, 5.0], [9.0, 9.0]]), (100, 100), 0.25, 4e4)
    rows = [
        {"extra": "x", "slide": "b", **clinical_summary(np.zeros((0, 2)), (10, 10), None, None).to_dict()},
        {"slide": "a", "path": "/data/a.tif", **with_hotspot.to_dict()},
    ]
    path = tmp_path / "out" / "summary.csv"
    assert write_summary_csv(path, rows) == path
    back = list(csv.DictReader(path.open()))
    header = list(back[0])
    known = [c for c in SUMMARY_COLUMNS if c in header]
    assert header[:len(known)] == known and header[-1] == "extra"
    assert "hotspot" not in header
    assert back[0]["slide"] == "b" and back[0]["hotspot_count"] == "" and back[0]["density_per_mm2"] == ""
    assert back[1]["hotspot_count"] == "2" and back[1]["count"] == "2"
    assert float(back[1]["tissue_area_mm2"]) == pytest.approx(4e4 * 0.25**2 / 1e6)
    # The header does not depend on whether any slide has a hotspot.
    write_summary_csv(tmp_path / "none.csv", rows[:1])
    alone = list(csv.DictReader((tmp_path / "none.csv").open()))[0]
    assert list(alone) == [c for c in header if c != "path"]
