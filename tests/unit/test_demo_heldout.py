"""The demo's held-out test set: rendered once, normalized like the training store, scored end to end."""
import json
from pathlib import Path

import numpy as np
import pytest

from uts_cli.api import demo as demo_api
from uts_cli.io.store import PatchStore

# Small fields and few of them, so the whole pipeline runs in seconds.
SMALL = {"field_size": 256, "fields_per_case": 2}


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    cfg = demo_api.DemoConfig(workdir=work, seed=3, patch_size=64, epochs=1, steps_per_epoch=2, batch_size=8,
                              n_cases=6, heldout_cases=2, device="cpu", workers=0, dataset_options=SMALL)
    return cfg, demo_api.demo(cfg)


def test_demo_scores_teacher_and_student_on_the_heldout_set(small_demo):
    cfg, result = small_demo
    ts = result.test_set
    assert ts["held_out"] and ts["cases"] == 2 and ts["fields"] == 4 and ts["mitoses"] > 0
    assert ts["generator_seed"] == demo_api.HELDOUT_GENERATOR_SEED
    assert f"-g{ts['generator_seed']}-" in Path(ts["store"]).name   # the seed that renders the set again
    held, train = PatchStore(ts["store"]), PatchStore(result.store)
    assert held.stain_state == train.stain_state             # the training colours
    assert held.uuid != train.uuid
    for who in ("teacher", "student"):
        run = cfg.workdir / "runs" / f"{who}-s{cfg.seed}"
        saved = json.loads((run / "eval-heldout" / "metrics.json").read_text())
        assert saved["region"]["f1"] == getattr(result, who)["region"]["f1"]
        assert saved["region"]["tp"] + saved["region"]["fn"] == ts["mitoses"]
    assert "render held-out test set" in result.steps


def test_heldout_store_is_reused_and_never_the_training_seed(small_demo, tmp_path):
    cfg, result = small_demo
    path = demo_api.heldout_test_store(cfg.workdir, result.store, 2, 64, SMALL, device="cpu")
    assert str(path) == result.test_set["store"]
    before = path.stat().st_mtime_ns
    assert demo_api.heldout_test_store(cfg.workdir, result.store, 2, 64, SMALL, device="cpu").stat().st_mtime_ns \
        == before
    assert demo_api._heldout_seed(demo_api.HELDOUT_GENERATOR_SEED) != demo_api.HELDOUT_GENERATOR_SEED
    assert demo_api._heldout_seed(0) == demo_api.HELDOUT_GENERATOR_SEED


def test_heldout_fields_differ_from_the_training_fields(small_demo):
    _, result = small_demo
    held, train = PatchStore(result.test_set["store"]), PatchStore(result.store)
    a = held.read_rgb(held.indices("test")[:4])
    b = train.read_rgb(train.indices("test")[:4])
    assert not np.array_equal(a, b)


def test_heldout_copy_follows_a_new_training_stain_state(small_demo, tmp_path):
    """A held-out copy normalized for an older training store of the same name is made again."""
    import shutil

    import h5py

    cfg, result = small_demo
    work = tmp_path / "w"
    shutil.copytree(cfg.workdir / "stores", work / "stores")
    like = work / "stores" / result.store.name
    first = demo_api.heldout_test_store(work, like, 2, 64, SMALL, device="cpu")
    with h5py.File(like, "r+") as f:  # as if the training store had been rendered anew
        state = json.loads(f["normalization"].attrs["state_json"])
        state["io"] = state["io"] + 1
        f["normalization"].attrs["state_json"] = json.dumps(state)
    again = demo_api.heldout_test_store(work, like, 2, 64, SMALL, device="cpu")
    assert again == first and PatchStore(again).stain_state == PatchStore(like).stain_state
