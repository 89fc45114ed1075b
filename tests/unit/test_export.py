"""Tests for uts_cli.io.export: CSV and QuPath GeoJSON point files."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from uts_cli.errors import InputDataError
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
