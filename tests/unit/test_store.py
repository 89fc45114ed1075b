import h5py
import numpy as np
import pytest

from conftest import write_tiny_store
from uts_cli.errors import InputDataError, UsageError
from uts_cli.io import store


def test_schema_attributes_and_groups(tiny_store):
    with h5py.File(tiny_store, "r") as f:
        assert f.attrs["format"] == store.FORMAT
        assert f.attrs["schema_version"] == store.SCHEMA_VERSION
        assert bool(f.attrs["complete"])
        for name in ("images/id", "images/split", "patches/rgb", "patches/label", "points/yx"):
            assert name in f
        assert f["patches/rgb"].dtype == np.uint8


def test_reader_points_and_labels_agree(tiny_store):
    s = store.PatchStore(tiny_store)
    assert len(s) == 24 and s.n_images == 6
    for i in range(len(s)):
        yx, kind = s.points_for(i)
        assert s.n_points[i] == (kind == 0).sum()
        assert s.label[i] == (s.n_points[i] > 0)
        assert ((yx >= -0.5) & (yx < s.patch_size - 0.5)).all()
    assert s.read_rgb([5, 2, 9]).shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(s.read_rgb([5, 2])[1], s.read_rgb(2))
    assert set(np.unique(s.split)) == {0, 1, 2}


def test_image_points_are_in_image_coordinates(tiny_store):
    s = store.PatchStore(tiny_store)
    total = sum(len(s.image_points(i)) for i in range(s.n_images))
    assert total == int(s.n_points.sum())


def test_reader_refuses_foreign_incomplete_and_missing(tmp_path, tiny_store):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(InputDataError, match="not a uts patch store"):
        store.PatchStore(foreign)
    with h5py.File(tiny_store, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(InputDataError, match="schema version 99"):
        store.PatchStore(tiny_store)
    with pytest.raises(InputDataError, match="not found"):
        store.PatchStore(tmp_path / "nope.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(InputDataError, match="not a readable HDF5"):
        store.PatchStore(garbage)


def test_incomplete_store_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    f = store.create_partial(path, attrs={"config_json": "{}", "config_hash": "x"}, patch_size=32,
                             compression="none", has_truth=False)
    f.close()
    with pytest.raises(InputDataError, match="incomplete"):
        store.PatchStore(path)


def test_output_exists_needs_overwrite(tiny_store):
    with pytest.raises(UsageError, match="exists"):
        store.check_output_path(tiny_store, overwrite=False)
    store.check_output_path(tiny_store, overwrite=True)


def test_resume_trims_uncommitted_rows(tmp_path):
    path = tmp_path / "s.h5"
    write_tiny_store(path)
    # Build a partial by hand with one committed image and dangling rows after it.
    src = store.PatchStore(path)
    f = store.create_partial(tmp_path / "p.h5", attrs={"config_json": "{}", "config_hash": "h"},
                             patch_size=64, compression="none", has_truth=False)
    store.write_images_table(f, [{"id": "a", "case_id": "a", "path": "a", "shape": (128, 128, 3),
                                  "split": "train"}] * 2)
    rows = store.PatchRows(rgb=src.read_rgb(np.arange(4)), origin=src.origin[:4], label=src.label[:4],
                           n_points=src.n_points[:4], n_hard=src.n_hard[:4], tissue=src.tissue[:4],
                           points=(np.zeros(0, int), np.zeros((0, 2), np.float32), np.zeros(0, np.uint8)))
    store.append_image(f, 0, rows, "s")
    store.append_rows(f, 1, rows)  # never committed
    f.close()
    g = store.open_partial_for_resume(tmp_path / "p.h5", "h")
    assert g is not None and g["patches/rgb"].shape[0] == 4 and g["patches/label"].shape[0] == 4
    assert g["images/done"][...].tolist() == [True, False]
    g.close()
    assert store.open_partial_for_resume(tmp_path / "p.h5", "other-hash") is None
    assert not store.partial_path(tmp_path / "p.h5").exists()


def test_damaged_store_missing_a_dataset_is_input_error(tiny_store):
    with h5py.File(tiny_store, "r+") as f:
        del f["patches/label"]
    with pytest.raises(InputDataError, match="damaged or incompatible"):
        store.PatchStore(tiny_store)
