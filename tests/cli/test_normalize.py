"""`uts normalize` on a small synthetic store: outputs, flags, reference choice, resume, bad use."""
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from uts_cli.cli.app import app
from uts_cli.io.store import PatchStore, partial_path

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "120"}
runner = CliRunner()


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory):
    from uts_cli.datasets.synthetic import SyntheticSpec, generate

    root = tmp_path_factory.mktemp("norm")
    generate(root / "syn", SyntheticSpec(n_cases=4, fields_per_case=2, field_size=256, val_cases=1, test_cases=1))
    out = root / "raw.h5"
    r = runner.invoke(app, ["prepare", "synthetic", "--root", str(root / "syn"), "--patch-size", "64",
                            "-o", str(out)], env=ENV)
    assert r.exit_code == 0, r.stderr
    return out


def test_normalize_writes_a_new_store_with_state_and_flags(raw_store, tmp_path):
    out = tmp_path / "n.h5"
    r = runner.invoke(app, ["normalize", str(raw_store), "-o", str(out), "--device", "cpu", "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["reference"].startswith("store:") and doc["n_patches"] == 128
    src, dst = PatchStore(raw_store), PatchStore(out)
    assert dst.stain == "macenko" and dst.parent_uuid == src.uuid and dst.uuid != src.uuid
    assert dst.stain_state["he_ref"] is not None and dst.stain_state["hist_ref"] is not None
    ok = dst.normalization_ok
    assert doc["n_flagged"] == int((~ok).sum())
    a, b = src.read_rgb(np.arange(len(src))), dst.read_rgb(np.arange(len(dst)))
    np.testing.assert_array_equal(a[~ok], b[~ok])          # flagged: passed through untouched
    assert (a[ok] != b[ok]).any()                          # the others changed
    np.testing.assert_array_equal(src.label, dst.label)     # labels and points copied
    np.testing.assert_array_equal(src.all_points()[1], dst.all_points()[1])
    assert dst.has_truth


def test_background_patch_is_flagged_not_fatal(raw_store, tmp_path):
    # Paint one patch white in a copy of the store: Macenko cannot run on it.
    copy = tmp_path / "white.h5"
    copy.write_bytes(raw_store.read_bytes())
    with h5py.File(copy, "r+") as f:
        f["patches/rgb"][5] = 255
    out = tmp_path / "n.h5"
    r = runner.invoke(app, ["normalize", str(copy), "-o", str(out), "--device", "cpu"], env=ENV)
    assert r.exit_code == 0, r.stderr
    dst = PatchStore(out)
    assert not dst.normalization_ok[5] and (dst.read_rgb(5) == 255).all()


def test_reference_from_file_and_steps_switched_off(raw_store, tmp_path):
    import tifffile

    ref = tmp_path / "ref.tif"
    tifffile.imwrite(ref, np.concatenate([PatchStore(raw_store).read_rgb(np.arange(4)).reshape(256, 64, 3)], axis=0))
    out = tmp_path / "n.h5"
    r = runner.invoke(app, ["normalize", str(raw_store), "-o", str(out), "--reference", str(ref), "--no-macenko",
                            "--device", "cpu", "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["reference"] == f"file:{ref.resolve()}"
    dst = PatchStore(out)
    assert dst.stain == "histogram" and dst.stain_state["he_ref"] is None
    r = runner.invoke(app, ["normalize", str(raw_store), "-o", str(tmp_path / "x.h5"), "--no-macenko",
                            "--no-hist-match"], env=ENV)
    assert r.exit_code == 2 and "nothing to do" in r.stderr


def test_normalized_store_is_not_normalized_twice(raw_store, tmp_path):
    out = tmp_path / "n.h5"
    assert runner.invoke(app, ["normalize", str(raw_store), "-o", str(out), "--device", "cpu"], env=ENV).exit_code == 0
    r = runner.invoke(app, ["normalize", str(out), "-o", str(tmp_path / "nn.h5"), "--device", "cpu"], env=ENV)
    assert r.exit_code == 2 and "already normalized" in r.stderr


def test_interrupted_normalize_resumes_to_identical_store(raw_store, tmp_path, monkeypatch):
    from uts_cli.api import normalize as norm_api
    import uts_cli.stain as stain

    monkeypatch.setattr(norm_api, "BLOCK", 32)
    ref = tmp_path / "ref.h5"
    args = ["normalize", str(raw_store), "--device", "cpu", "--batch-size", "16"]
    assert runner.invoke(app, args + ["-o", str(ref)], env=ENV).exit_code == 0

    real = stain.normalize_batch
    calls = {"n": 0}

    def flaky(batch, state):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the third block of 32 (two batches of 16 per block)
            raise KeyboardInterrupt
        return real(batch, state)

    monkeypatch.setattr(stain, "normalize_batch", flaky)
    out = tmp_path / "o.h5"
    r = runner.invoke(app, args + ["-o", str(out)], env=ENV)
    assert r.exit_code == 130
    assert not out.exists() and partial_path(out).exists()
    monkeypatch.setattr(stain, "normalize_batch", real)
    r = runner.invoke(app, args + ["-o", str(out), "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["resumed_patches"] == 64
    with h5py.File(ref) as a, h5py.File(out) as b:
        np.testing.assert_array_equal(a["patches/rgb"][...], b["patches/rgb"][...])
        np.testing.assert_array_equal(a["normalization/ok"][...], b["normalization/ok"][...])


def test_compression_option_sets_the_output_compression(raw_store, tmp_path):
    out = tmp_path / "g.h5"
    r = runner.invoke(app, ["normalize", str(raw_store), "-o", str(out), "--device", "cpu",
                            "--compression", "gzip"], env=ENV)
    assert r.exit_code == 0, r.stderr
    with h5py.File(out) as f:
        assert f["patches/rgb"].compression == "gzip" and f.attrs["compression"] == "gzip"
    with h5py.File(raw_store) as f:
        assert f.attrs["compression"] != "gzip"  # so the option, not inheritance, chose it


def test_api_refuses_reference_and_reference_id_together(raw_store, tmp_path):
    from uts_cli.api.normalize import normalize
    from uts_cli.config import NormalizeConfig
    from uts_cli.errors import UsageError

    cfg = NormalizeConfig(store=raw_store, output=tmp_path / "x.h5", reference=raw_store,
                          reference_image_id="c0/f0", device="cpu")
    with pytest.raises(UsageError, match="exclude each other"):
        normalize(cfg)
    with pytest.raises(UsageError, match="--batch-size"):
        normalize(NormalizeConfig(store=raw_store, output=tmp_path / "x.h5", batch_size=0))
    assert not (tmp_path / "x.h5").exists() and not partial_path(tmp_path / "x.h5").exists()


def test_partial_made_with_other_settings_is_announced_before_it_is_discarded(raw_store, tmp_path,
                                                                              monkeypatch):
    from uts_cli.api import normalize as norm_api
    import uts_cli.stain as stain

    monkeypatch.setattr(norm_api, "BLOCK", 32)
    out = tmp_path / "o.h5"
    real = stain.normalize_batch

    def interrupt(batch, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(stain, "normalize_batch", interrupt)
    args = ["normalize", str(raw_store), "-o", str(out), "--device", "cpu"]
    assert runner.invoke(app, args, env=ENV).exit_code == 130
    assert partial_path(out).exists()
    monkeypatch.setattr(stain, "normalize_batch", real)
    r = runner.invoke(app, args + ["--beta", "0.2"], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert "discarding the unfinished" in r.stderr and "other settings" in r.stderr


def test_like_applies_another_stores_normalization(raw_store, tmp_path):
    """--like copies the fitted state, reference and options; the result equals a fit to the same reference."""
    first = tmp_path / "first.h5"
    r = runner.invoke(app, ["normalize", str(raw_store), "-o", str(first), "--reference-id",
                            str(PatchStore(raw_store).image_ids[1]), "--alpha", "2", "--device", "cpu"], env=ENV)
    assert r.exit_code == 0, r.stderr
    again = tmp_path / "again.h5"
    r = runner.invoke(app, ["normalize", str(raw_store), "-o", str(again), "--like", str(first), "--device", "cpu",
                            "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    a, b = PatchStore(first), PatchStore(again)
    assert json.loads(r.stdout)["reference"] == f"store:{PatchStore(raw_store).image_ids[1]}"
    assert b.stain_state == a.stain_state and b.stain == a.stain == "macenko"
    np.testing.assert_array_equal(a.read_rgb(np.arange(len(a))), b.read_rgb(np.arange(len(b))))
    with h5py.File(again) as f:
        attrs = f["normalization"].attrs
        assert attrs["alpha"] == 2.0 and attrs["like"] == str(first.resolve())


def test_like_refuses_a_raw_store_and_a_second_reference(raw_store, tmp_path):
    r = runner.invoke(app, ["normalize", str(raw_store), "-o", str(tmp_path / "x.h5"), "--like", str(raw_store)],
                      env=ENV)
    assert r.exit_code == 2 and "not normalized" in r.stderr
    assert not (tmp_path / "x.h5").exists()
    r = runner.invoke(app, ["normalize", str(raw_store), "-o", str(tmp_path / "x.h5"), "--like", str(raw_store),
                            "--reference-id", "x"], env=ENV)
    assert r.exit_code == 2 and "--like excludes" in r.stderr
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    r = runner.invoke(app, ["normalize", str(raw_store), "-o", str(tmp_path / "x.h5"), "--like", str(bad)], env=ENV)
    assert r.exit_code not in (0, 1, 2) and "bad.h5" in r.stderr and "Traceback" not in r.stderr
