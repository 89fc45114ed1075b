"""The annotation parsers on the real files in ../shared/realdata (skipped when absent)."""
from __future__ import annotations

import numpy as np
import pytest

from uts_cli.io.annotations import (
    check_points_in_image,
    read_midog_json,
    read_tupac_csv,
    read_yolo_points,
)
from uts_cli.io.images import open_image, tissue_fraction, tissue_mask


def test_midog_json_counts(realdata):
    midog = read_midog_json(realdata / "midog21-annotations" / "databases" / "MIDOG.json")
    assert len(midog.images) == 200
    kinds = np.concatenate([k for _, k in midog.points.values()])
    assert int((kinds == 0).sum()) == 1721 and int((kinds == 1).sum()) == 2714
    by_id = {image.id: image for image in midog.images}
    for image_id, (yx, _) in midog.points.items():
        check_points_in_image(yx, by_id[image_id].height, by_id[image_id].width, f"MIDOG {image_id}")
    # images 151-200 carry no labels
    assert all(len(midog.points[i][0]) == 0 for i in range(151, 201))
    assert all(len(midog.points[i][0]) > 0 for i in range(1, 151))


@pytest.mark.parametrize("folder, files, points", [
    ("mitoses_ground_truth", 656, 1999),
    ("nonmitoses_ground_truth", 656, 10483),
])
def test_tupac_alternative_labels_parse(realdata, folder, files, points):
    paths = sorted((realdata / "tupac16-alternative-labels" / "TUPAC_AL" / folder).glob("*/*.csv"))
    assert len(paths) == files
    parsed = [read_tupac_csv(path) for path in paths]
    assert sum(len(yx) for yx in parsed) == points
    everything = np.concatenate(parsed)
    assert everything.dtype == np.float32 and everything.min() >= 0 and everything.max() < 5700


def test_ccmct_yolo_labels(realdata):
    base = realdata / "ccmct-tiles-yolo26" / "data" / "MIDOGpp" / "test"
    labels = sorted((base / "labels").glob("*.txt"))
    assert len(labels) == 3
    kinds = []
    for label in labels:
        with open_image(base / "images" / f"{label.stem}.jpg") as reader:
            height, width, _ = reader.shape
        yx, k = read_yolo_points(label, width, height)
        check_points_in_image(yx, height, width, label.name)
        kinds.append(k)
    kinds = np.concatenate(kinds)
    assert int((kinds == 1).sum()) == 14 and int((kinds == 0).sum()) == 0


def test_ccmct_tile_tissue_is_at_the_bottom(realdata):
    image = realdata / "ccmct-tiles-yolo26" / "data" / "MIDOGpp" / "test" / "images" / \
        "2191a7aa287ce1d5dbc0_patch_0_28860.jpg"
    with open_image(image) as reader:
        low, scale = reader.read_lowres(max_side=1024)
        height, width, _ = reader.shape
    mask = tissue_mask(low)
    assert tissue_fraction(mask, 0, 0, 1000, width, scale) < 0.01
    assert tissue_fraction(mask, height - 500, 0, 500, width, scale) > 0.3
