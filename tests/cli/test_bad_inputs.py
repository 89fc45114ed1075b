"""A corpus of bad inputs across commands: each gives its exit code, one error line naming the
file, a hint, no traceback, and no output left behind as if it were complete.

Every case builds its inputs in a temp folder and returns the argv plus what to check. The README's
exit-code section lists the same corpus; keep the two in step.
"""
from __future__ import annotations

import io
import json
import types
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from conftest import write_tiny_store
from uts_cli.cli.app import app

ENV = {"NO_COLOR": "1", "TERMINAL_WIDTH": "200"}
runner = CliRunner()


@dataclass
class Case:
    argv: list[str]
    names: str  # the file/folder the error line must name
    absent: list[Path] = field(default_factory=list)  # outputs that must not exist afterwards
    present: list[Path] = field(default_factory=list)  # outputs that must still be there (untouched)


CASES: dict[str, tuple[int, object]] = {}


def case(name: str, exit_code: int):
    def deco(fn):
        CASES[name] = (exit_code, fn)
        return fn
    return deco


# -- builders ---------------------------------------------------------------------------------
def _rgb(h=64, w=64) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (230, 160, 200)
    img[20:30, 20:30] = (60, 30, 90)
    return img


def _tiff_bytes(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, **kw)
    return buf.getvalue()


def folder_dataset(tmp: Path, *, image: bytes | None = None, csv: str | None = "image,x,y\nc1/f1.tif,25,25\n",
                   name: str = "data", image_name: str = "f1.tif") -> tuple[Path, Path]:
    """A one-image `folder` dataset; returns (root, the image path)."""
    root = tmp / name
    (root / "images" / "c1").mkdir(parents=True)
    path = root / "images" / "c1" / image_name
    path.write_bytes(_tiff_bytes(_rgb(), photometric="rgb") if image is None else image)
    if csv is not None:
        (root / "annotations.csv").write_text(csv)
    return root, path


def prepare_folder(tmp: Path, root: Path, names: Path, *extra: str) -> Case:
    out = tmp / "out.h5"
    return Case(["prepare", "folder", "--root", str(root), "-o", str(out), "--patch-size", "32", *extra],
                str(names), absent=[out])


def prepare_image(tmp: Path, data: bytes) -> Case:
    root, img = folder_dataset(tmp, image=data)
    return prepare_folder(tmp, root, img)


def _valid_tiff() -> bytes:
    return _tiff_bytes(_rgb(), photometric="rgb")


def _with_compression_tag(data: bytes, code: int) -> bytes:
    """Rewrite the Compression tag of the first page (pixels stay raw, which no codec decodes)."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        off = tif.pages[0].tags["Compression"].valueoffset
    out = bytearray(data)
    out[off:off + 2] = code.to_bytes(2, "little")
    return bytes(out)


# -- prepare: the dataset folder and its images ---------------------------------------------------
@case("prepare: missing dataset folder", 3)
def _(tmp):
    return prepare_folder(tmp, tmp / "nope", tmp / "nope")


@case("prepare: empty dataset folder", 3)
def _(tmp):
    (tmp / "empty").mkdir()
    return prepare_folder(tmp, tmp / "empty", tmp / "empty")


@case("prepare: empty image file", 3)
def _(tmp):
    return prepare_image(tmp, b"")


@case("prepare: corrupt TIFF", 3)
def _(tmp):
    return prepare_image(tmp, b"II*\x00" + bytes(range(256)) * 4)


@case("prepare: truncated TIFF", 3)
def _(tmp):
    data = _tiff_bytes(_rgb(256, 256), photometric="rgb")
    return prepare_image(tmp, data[: len(data) // 2])


@case("prepare: LZW TIFF without imagecodecs", 3)
def _(tmp, monkeypatch):
    # Simulate a machine without imagecodecs: tifffile then raises KeyError("... requires the
    # 'imagecodecs' package") when it looks the decoder up.
    import tifffile.tifffile as tt

    monkeypatch.setattr(tt, "imagecodecs", types.SimpleNamespace())
    monkeypatch.setattr(tt.TIFF.DECOMPRESSORS, "_codecs", {1: tt.identityfunc})
    return prepare_image(tmp, _with_compression_tag(_valid_tiff(), 5))


@case("prepare: JPEG-2000 TIFF without imagecodecs", 3)
def _(tmp, monkeypatch):
    import tifffile.tifffile as tt

    monkeypatch.setattr(tt, "imagecodecs", types.SimpleNamespace())
    monkeypatch.setattr(tt.TIFF.DECOMPRESSORS, "_codecs", {1: tt.identityfunc})
    return prepare_image(tmp, _with_compression_tag(_valid_tiff(), 34712))


@case("prepare: TIFF whose codec cannot decode it", 3)
def _(tmp):
    return prepare_image(tmp, _with_compression_tag(_valid_tiff(), 5))  # raw bytes labelled LZW


@case("prepare: 16-bit RGB TIFF", 3)
def _(tmp):
    return prepare_image(tmp, _tiff_bytes(_rgb().astype(np.uint16) * 256, photometric="rgb"))


@case("prepare: grayscale TIFF", 3)
def _(tmp):
    return prepare_image(tmp, _tiff_bytes(_rgb()[..., 0]))


@case("prepare: RGBA TIFF", 3)
def _(tmp):
    rgba = np.concatenate([_rgb(), np.full((64, 64, 1), 255, np.uint8)], axis=2)
    return prepare_image(tmp, _tiff_bytes(rgba, photometric="rgb", extrasamples=["unassalpha"]))


@case("prepare: palette TIFF", 3)
def _(tmp):
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, 1] = 65535
    index = np.zeros((64, 64), np.uint8)
    index[20:30, 20:30] = 1
    return prepare_image(tmp, _tiff_bytes(index, photometric="palette", colormap=cmap))


@case("prepare: 1-pixel image with a point outside it", 3)
def _(tmp):
    root, _ = folder_dataset(tmp, image=_tiff_bytes(np.full((1, 1, 3), 200, np.uint8), photometric="rgb"))
    return prepare_folder(tmp, root, root / "annotations.csv")


@case("prepare: unsupported image type named in the CSV", 3)
def _(tmp):
    root, img = folder_dataset(tmp, image=b"not an image", image_name="f1.png")
    (root / "annotations.csv").write_text("image,x,y\nc1/f1.png,5,5\n")
    return prepare_folder(tmp, root, img)


# -- prepare: annotation files ------------------------------------------------------------------
def _prepare_with_csv(tmp: Path, csv: str | None) -> Case:
    """``uts prepare folder`` on a dataset whose annotations.csv holds ``csv`` (None: no such file)."""
    root, _ = folder_dataset(tmp, csv=csv)
    return prepare_folder(tmp, root, root / "annotations.csv")


@case("prepare: CSV missing", 3)
def _(tmp):
    return _prepare_with_csv(tmp, None)


@case("prepare: --annotations file missing", 2)
def _(tmp):
    root, _ = folder_dataset(tmp, csv=None)
    return prepare_folder(tmp, root, root / "points.csv", "--annotations", str(root / "points.csv"))


@case("prepare: CSV empty", 3)
def _(tmp):
    return _prepare_with_csv(tmp, "")


@case("prepare: CSV with text for a coordinate", 3)
def _(tmp):
    return _prepare_with_csv(tmp, "image,x,y\nc1/f1.tif,ten,25\n")


@case("prepare: CSV with NaN", 3)
def _(tmp):
    return _prepare_with_csv(tmp, "image,x,y\nc1/f1.tif,nan,25\n")


@case("prepare: CSV with a negative point", 3)
def _(tmp):
    return _prepare_with_csv(tmp, "image,x,y\nc1/f1.tif,-20,25\n")


@case("prepare: CSV with an out-of-bounds point", 3)
def _(tmp):
    return _prepare_with_csv(tmp, "image,x,y\nc1/f1.tif,25,640\n")


@case("prepare: CSV without the header", 3)
def _(tmp):
    return _prepare_with_csv(tmp, "c1/f1.tif,25,25\n")


def _midog(tmp: Path, doc: dict) -> Case:
    root = tmp / "MIDOG21"
    (root / "images").mkdir(parents=True)
    (root / "images" / "001.tiff").write_bytes(_valid_tiff())
    (root / "MIDOG.json").write_text(json.dumps(doc))
    out = tmp / "out.h5"
    return Case(["prepare", "MIDOG21", "--root", str(root), "-o", str(out), "--patch-size", "32"],
                str(root / "MIDOG.json"), absent=[out, Path(str(out) + ".partial")])


_CATS = [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "hard negative"}]
_IMG = {"id": 1, "file_name": "001.tiff", "width": 64, "height": 64}
_ANN = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 30, 30]}


@case("prepare: JSON missing a key", 3)
def _(tmp):
    return _midog(tmp, {"images": [_IMG], "categories": _CATS})


@case("prepare: JSON with an unknown category", 3)
def _(tmp):
    return _midog(tmp, {"images": [_IMG], "categories": _CATS, "annotations": [{**_ANN, "category_id": 7}]})


@case("prepare: JSON with duplicate image ids", 3)
def _(tmp):
    return _midog(tmp, {"images": [_IMG, {**_IMG, "file_name": "002.tiff"}], "categories": _CATS,
                        "annotations": [_ANN]})


@case("prepare: JSON that is not JSON", 3)
def _(tmp):
    c = _midog(tmp, {})
    (tmp / "MIDOG21" / "MIDOG.json").write_text("{'images': [")
    return c


@case("prepare: splits CSV with an unknown split", 3)
def _(tmp):
    root, _ = folder_dataset(tmp)
    splits = tmp / "splits.csv"
    splits.write_text("case,split\nc1,holdout\n")
    return prepare_folder(tmp, root, splits, "--splits", str(splits))


# -- prepare: outputs ---------------------------------------------------------------------------
@case("prepare: existing output", 2)
def _(tmp):
    root, _ = folder_dataset(tmp)
    c = prepare_folder(tmp, root, tmp / "out.h5")
    (tmp / "out.h5").write_bytes(b"keep me")
    c.absent, c.present = [Path(str(tmp / "out.h5") + ".partial")], [tmp / "out.h5"]
    return c


@case("prepare: output folder is a regular file", 4)
def _(tmp):
    root, _ = folder_dataset(tmp)
    blocker = tmp / "not-a-folder"
    blocker.write_text("a file, so nothing can be created below it (fails for root too)")
    out = blocker / "out.h5"
    return Case(["prepare", "folder", "--root", str(root), "-o", str(out), "--patch-size", "32"],
                str(blocker), absent=[out])


@case("prepare: corrupt TIFF under a path with spaces and non-ASCII", 3)
def _(tmp):
    root, img = folder_dataset(tmp, name="my dätä ü", image=b"II*\x00garbage")
    return prepare_folder(tmp, root, img)


# -- stores -------------------------------------------------------------------------------------
def _teach(tmp: Path, store: Path, *extra: str) -> Case:
    runs = tmp / "runs"
    return Case(["teach", str(store), "--name", "r", "--runs-dir", str(runs), "--weights", "none",
                 "--device", "cpu", "--workers", "0", *extra], str(store),
                absent=[runs / "r" / "checkpoints" / "best.pt", runs / "r" / "checkpoints" / "last.pt"])


@case("teach: missing store", 2)
def _(tmp):
    return _teach(tmp, tmp / "missing.h5")


@case("teach: --weights file missing (no run folder is left behind)", 3)
def _(tmp):
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    weights = tmp / "missing.pt"
    c = _teach(tmp, store, "--weights", str(weights))
    return Case(c.argv, str(weights), absent=[tmp / "runs" / "r"])


@case("teach: store of another schema", 3)
def _(tmp):
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    with h5py.File(store, "r+") as f:
        f.attrs["schema_version"] = 99
    return _teach(tmp, store)


@case("teach: truncated store", 3)
def _(tmp):
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 3])
    return _teach(tmp, store)


@case("teach: empty store file", 3)
def _(tmp):
    store = tmp / "s.h5"
    store.write_bytes(b"")
    return _teach(tmp, store)


@case("teach: HDF5 file that is not a store", 3)
def _(tmp):
    store = tmp / "other.h5"
    with h5py.File(store, "w") as f:
        f["x"] = np.arange(3)
    return _teach(tmp, store)


@case("teach: incomplete store", 3)
def _(tmp):
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    with h5py.File(store, "r+") as f:
        f.attrs["complete"] = False
    return _teach(tmp, store)


@case("teach: --device cuda without CUDA", 4)
def _(tmp, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    c = _teach(tmp, store)
    c.argv[c.argv.index("cpu")] = "cuda"
    c.names = "CUDA"  # no file involved: the message names what is missing
    return c


@case("normalize: existing output", 2)
def _(tmp):
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    out = tmp / "n.h5"
    out.write_bytes(b"keep me")
    return Case(["normalize", str(store), "-o", str(out), "--device", "cpu"], str(out),
                absent=[Path(str(out) + ".partial")], present=[out])


@case("normalize: corrupt reference image", 3)
def _(tmp):
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    ref = tmp / "ref.tif"
    ref.write_bytes(b"II*\x00" + b"\x00" * 50)
    out = tmp / "n.h5"
    return Case(["normalize", str(store), "-o", str(out), "--reference", str(ref), "--device", "cpu"],
                str(ref), absent=[out, Path(str(out) + ".partial")])


@case("normalize: output folder is a regular file", 4)
def _(tmp):
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    blocker = tmp / "file"
    blocker.write_text("x")
    return Case(["normalize", str(store), "-o", str(blocker / "n.h5"), "--device", "cpu"], str(blocker),
                absent=[blocker / "n.h5"])


# -- runs ---------------------------------------------------------------------------------------
def _fake_run(tmp: Path, config: dict) -> Path:
    run = tmp / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    return run


@case("eval: unknown run", 3)
def _(tmp):
    out = tmp / "ev"
    return Case(["eval", "nope", "--runs-dir", str(tmp / "runs"), "-o", str(out), "--device", "cpu"],
                str(tmp / "runs" / "nope"), absent=[out / "metrics.json"])


@case("eval: run without checkpoint", 3)
def _(tmp):
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    run = _fake_run(tmp, {"command": "teach", "config": {"store": str(store)}})
    out = tmp / "ev"
    return Case(["eval", str(run), "-o", str(out), "--device", "cpu"], str(run / "checkpoints"),
                absent=[out / "metrics.json"])


@case("eval: run written by a newer uts", 3)
def _(tmp):
    run = _fake_run(tmp, {"schema_version": 999, "command": "teach", "uts_version": "99.0"})
    out = tmp / "ev"
    return Case(["eval", str(run), "-o", str(out), "--device", "cpu"], str(run / "config.json"),
                absent=[out / "metrics.json"])


@case("eval: run with a damaged config.json", 3)
def _(tmp):
    run = _fake_run(tmp, {})
    (run / "config.json").write_text('{"command": "te')
    out = tmp / "ev"
    return Case(["eval", str(run), "-o", str(out), "--device", "cpu"], str(run / "config.json"),
                absent=[out / "metrics.json"])


@case("distill: teacher run without checkpoint", 3)
def _(tmp):
    store = write_tiny_store(tmp / "s.h5", n_images=3)
    run = _fake_run(tmp, {"command": "teach", "config": {"store": str(store)}})
    return Case(["distill", "--teacher", str(run), "--name", "s", "--runs-dir", str(tmp / "runs"),
                 "--device", "cpu", "--workers", "0"], str(run),
                absent=[tmp / "runs" / "s" / "checkpoints" / "best.pt"])


@case("distill: teacher run written by a newer uts", 3)
def _(tmp):
    run = _fake_run(tmp, {"schema_version": 999, "command": "teach"})
    return Case(["distill", "--teacher", str(run), "--name", "s", "--runs-dir", str(tmp / "runs"),
                 "--device", "cpu", "--workers", "0"], str(run / "config.json"),
                absent=[tmp / "runs" / "s" / "checkpoints" / "best.pt"])


# -- the test -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, monkeypatch):
    exit_code, build = CASES[name]
    monkeypatch.chdir(tmp_path)
    tmp = tmp_path / "work"
    tmp.mkdir()
    c = build(tmp, monkeypatch) if build.__code__.co_argcount == 2 else build(tmp)
    r = runner.invoke(app, c.argv, env=ENV)
    assert r.exit_code == exit_code, (r.exit_code, r.stderr, r.stdout)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    if exit_code == 2 and not errors:  # Typer's own usage errors use a box, not our Error: line
        assert "Invalid value" in r.stderr or "does not exist" in r.stderr, r.stderr
        flat = " ".join(r.stderr.split())
        assert Path(c.names).name in flat or c.names in flat, r.stderr
    else:
        assert len(errors) == 1, r.stderr
        # the file by its full path, or by its name where the message gives it in context
        assert c.names in errors[0] or Path(c.names).name in errors[0], (c.names, errors[0])
        assert "Hint:" in r.stderr, r.stderr
    for path in c.absent:
        assert not path.exists(), f"{path} left behind"
    for path in c.present:
        assert path.exists(), f"{path} was removed"


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 25


def test_paths_with_spaces_and_non_ascii_work(tmp_path):
    """The same dataset that fails above when corrupt is prepared fine from such a folder."""
    root, _ = folder_dataset(tmp_path, name="my dätä ü")
    out = tmp_path / "out dir ✓" / "store ü.h5"
    r = runner.invoke(app, ["prepare", "folder", "--root", str(root), "-o", str(out), "--patch-size", "32",
                            "--json"], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_points"] == 1 and out.is_file()
