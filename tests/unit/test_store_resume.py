"""A partial store whose committed rows were damaged by a hard kill is discarded, not resumed."""
import h5py
import numpy as np

from uts_cli.io import store


def _partial(path, n_images=3, patch=16):
    cfg = {"k": 1}
    f = store.create_partial(path, attrs={"config_hash": store.config_hash(cfg)}, patch_size=patch,
                             compression="lzf", has_truth=False)
    store.write_images_table(f, [{"id": f"i{i}", "case_id": "c", "path": f"i{i}.tif", "shape": (32, 32, 3),
                                  "split": "train", "pixel_size_um": 0.25} for i in range(n_images)])
    rng = np.random.default_rng(0)
    for i in range(n_images - 1):  # the last image stays uncommitted
        n = 3  # rows per unit that do not align with the chunk rows, so chunks are shared
        rows = store.PatchRows(rgb=rng.integers(0, 255, (n, patch, patch, 3), dtype=np.uint8),
                               origin=np.zeros((n, 2), np.int32), label=np.zeros(n, np.uint8),
                               n_points=np.zeros(n, np.uint16), n_hard=np.zeros(n, np.uint16),
                               tissue=np.ones(n, np.float32),
                               points=(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.uint8)))
        store.append_image(f, i, rows, sha256="0" * 64)
    f.close()
    return store.config_hash(cfg)


def test_intact_partial_resumes(tmp_path):
    chash = _partial(tmp_path / "s.h5")
    f = store.open_partial_for_resume(tmp_path / "s.h5", chash)
    assert f is not None and f["patches/rgb"].shape[0] == 6
    f.close()


def test_partial_with_a_torn_committed_chunk_is_discarded(tmp_path):
    chash = _partial(tmp_path / "s.h5")
    part = store.partial_path(tmp_path / "s.h5")
    with h5py.File(part, "r+") as f:
        # What a kill can leave: the chunk index pointing at other pixels that decode fine.
        f["patches/rgb"][5] = 255 - f["patches/rgb"][5]
    assert store.open_partial_for_resume(tmp_path / "s.h5", chash) is None
    assert not part.exists()
