"""Shared fixtures: real-data location, slow-test switch, and a tiny patch store factory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("UTS_REALDATA", REPO.parent / "shared" / "realdata"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    gpu_items = [item for item in items if "gpu" in item.keywords]
    no_cuda = bool(gpu_items) and not _cuda_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if no_cuda and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real data not available at {REALDATA}")
    return REALDATA


def draw_blob(img: np.ndarray, y: float, x: float, r: float, colour) -> None:
    yy, xx = np.ogrid[: img.shape[0], : img.shape[1]]
    img[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = colour


def write_tiny_store(path: Path, *, n_images: int = 6, field: int = 128, patch: int = 64,
                     seed: int = 0, with_truth: bool = False) -> Path:
    """Write a small complete store straight through the store API (no dataset reader).

    Each field is pink with a few purple nuclei; about half hold a dark "mitosis" blob whose
    centre is annotated. Splits: first 4 images train, then val, then test (cycling).
    """
    from uts_cli.io import store

    rng = np.random.default_rng(seed)
    splits = ["train"] * max(1, n_images - 2) + ["val", "test"]
    rows = [{"id": f"c{i}/f0", "case_id": f"c{i}", "path": f"c{i}/f0.tif",
             "shape": (field, field, 3), "split": splits[i % len(splits)], "pixel_size_um": 0.25}
            for i in range(n_images)]
    cfg = {"dataset": "tiny", "patch_size": patch, "seed": seed}
    f = store.create_partial(path, attrs={"config_json": __import__("json").dumps(cfg),
                                          "config_hash": store.config_hash(cfg), "dataset": "tiny"},
                             patch_size=patch, compression="none", has_truth=with_truth)
    store.write_images_table(f, rows)
    from uts_cli.tiling import assign_points, extract_tile, tile_grid

    for i in range(n_images):
        img = np.empty((field, field, 3), np.uint8)
        img[:] = (235, 170, 200)
        for _ in range(6):
            draw_blob(img, rng.uniform(5, field - 5), rng.uniform(5, field - 5), 4, (150, 110, 190))
        pts = rng.uniform(10, field - 10, size=(int(rng.integers(0, 3)), 2)).astype(np.float32)
        for y, x in pts:
            draw_blob(img, y, x, 5, (60, 30, 90))
        grid = tile_grid(field, field, patch)
        owner = assign_points(pts, field, field, patch)
        # The store expects points grouped by patch (it looks them up by binary search).
        order = np.argsort(owner, kind="stable")
        pts, owner = pts[order], owner[order]
        n_pts = np.bincount(owner, minlength=len(grid)).astype(np.uint16)
        local = pts - grid[owner].astype(np.float32)
        kinds = np.zeros(len(pts), np.uint8)
        rgb = np.stack([extract_tile(img, y0, x0, patch) for y0, x0 in grid])
        pr = store.PatchRows(rgb=rgb, origin=grid, label=(n_pts > 0).astype(np.uint8), n_points=n_pts,
                             n_hard=np.zeros(len(grid), np.uint16), tissue=np.ones(len(grid), np.float32),
                             points=(owner, local, kinds),
                             truth=(owner, local, kinds) if with_truth else None)
        store.append_image(f, i, pr, sha256="0" * 64)
    store.finalize(f, path)
    return path


@pytest.fixture
def tiny_store(tmp_path) -> Path:
    return write_tiny_store(tmp_path / "tiny.h5")


# A minimal GeoJSON schema for what QuPath needs from a point detection (RFC 7946 Feature/Point).
POINT_FEATURE_SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {"type": "array", "items": {
            "type": "object",
            "required": ["type", "geometry", "properties"],
            "properties": {
                "type": {"const": "Feature"},
                "geometry": {
                    "type": "object", "required": ["type", "coordinates"],
                    "properties": {"type": {"const": "Point"},
                                   "coordinates": {"type": "array", "items": {"type": "number"},
                                                   "minItems": 2, "maxItems": 2}}},
                "properties": {
                    "type": "object", "required": ["objectType", "classification", "measurements"],
                    "properties": {
                        "objectType": {"const": "detection"},
                        "classification": {"type": "object", "required": ["name", "color"]},
                        "measurements": {"type": "object",
                                         "additionalProperties": {"type": "number"}}}},
            }}},
    },
}


def assert_qupath_detections(doc: dict) -> None:
    """Check a detections GeoJSON against the schema (jsonschema is a test dependency), then by hand."""
    import jsonschema

    jsonschema.validate(doc, POINT_FEATURE_SCHEMA)
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    for feat in doc["features"]:
        assert feat["type"] == "Feature"
        geom = feat["geometry"]
        assert geom["type"] == "Point"
        assert len(geom["coordinates"]) == 2
        assert all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in geom["coordinates"])
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert isinstance(props["classification"]["name"], str)
        assert len(props["classification"]["color"]) == 3
        assert isinstance(props["measurements"], dict)
        assert all(isinstance(v, (int, float)) for v in props["measurements"].values())


def tiny_teach_args(steps_per_epoch: int = 2) -> list[str]:
    """``uts teach`` options for a teacher that trains in seconds on CPU (the CLI tests need a run, not a good one)."""
    return ["--weights", "none", "--n-blocks", "1", "--epochs", "1", "--batch-size", "4",
            "--steps-per-epoch", str(steps_per_epoch), "--workers", "0", "--device", "cpu", "--lr", "1e-3"]


def train_tiny_teacher(root: Path, *, n_images: int, seed: int = 0, steps_per_epoch: int = 2,
                       extra: tuple[str, ...] = ()):
    """A tiny store with clean truth, ``root/tiny.h5``, and a teacher run ``t`` in ``root/runs``.

    ``extra``: more ``uts teach`` options. Returns ``(store, runs, the CliRunner result of uts teach)``.
    """
    from typer.testing import CliRunner

    from uts_cli.cli.app import app

    store = write_tiny_store(root / "tiny.h5", n_images=n_images, seed=seed, with_truth=True)
    runs = root / "runs"
    r = CliRunner().invoke(app, ["teach", str(store), "--name", "t", "--runs-dir", str(runs), *extra,
                                 *tiny_teach_args(steps_per_epoch)], env={"NO_COLOR": "1", "TERMINAL_WIDTH": "120"})
    assert r.exit_code == 0, r.stderr
    return store, runs, r


def set_run_threshold(run: Path, value: float) -> None:
    """Overwrite the image-level threshold in a run's config.json (what distill and eval read)."""
    import json

    path = Path(run) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["threshold"] = float(value)
    path.write_text(json.dumps(cfg))


def median_train_score(run: Path, store_path: Path) -> float:
    """The median of the run's best model's scores on the store's train split.

    As a threshold it puts both classes among the teacher's decisions, whatever a tiny teacher learnt.
    """
    import torch

    from uts_cli.io.store import PatchStore
    from uts_cli.model.predict import load_run_model, predict_scores

    model, _ = load_run_model(run, "best", "cpu")
    store = PatchStore(store_path)
    probs = predict_scores(model, store, store.indices("train"), torch.device("cpu"), batch_size=8)
    return float(np.median(probs))
