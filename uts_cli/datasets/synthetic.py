"""The built-in synthetic H&E mitosis dataset (``uts prepare synthetic``).

It lets the whole pipeline run on a fresh machine with no download, and it is where the method
is measured: the training annotations are noisy the way real ones are (some look-alikes
annotated as mitoses, some mitoses missed), while val/test annotations are clean and the clean
truth of every split is kept beside them.

Layout written under the root (the generic "folder" layout, readable by ``uts prepare folder``)::

    images/<case>/<field>.tif   uint8 RGB, 0.25 um/px in the TIFF resolution tags
    annotations.csv             image,x,y,label  what an annotator said (mitosis only; noisy in train)
    truth.csv                   image,x,y,label  every true mitosis and every look-alike (hard_negative)
    truth_objects.csv           truth.csv plus the phase / look-alike type and whether it was annotated
    splits.csv                  case,split
    dataset.json                spec, generator version, pixel size, counts (written last)

``image`` is the path relative to ``images/`` (``case03/f01.tif``); x is the column and y the
row, 0-based pixels with pixel centres at integers; points are object centroids.

Default size (12 cases x 4 fields of 512 px, 0.25 um/px): 32 training fields give 128 patches of
256 px, enough for a CPU teacher run of a few minutes, and the two val and two test cases carry
about 28 mitoses each, so a val/test F1 is not decided by one or two objects.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from uts_cli.datasets import _render
from uts_cli.choices import SPLITS
from uts_cli.datasets.base import DatasetListing, SourceImage, empty_points
from uts_cli.errors import InputDataError, UsageError
from uts_cli.reporting import NullReporter, Reporter

GENERATOR_VERSION = 1
FORMAT = "uts-synthetic"
DEFAULT_ROOT = Path("local_data/datasets/synthetic")
PIXEL_SIZE_UM = _render.PIXEL_SIZE_UM
MANIFEST = "dataset.json"
# Rendering runs in worker processes from this many fields on (fewer: the start-up of the
# workers, about a second, costs more than it saves) and in at most this many.
PARALLEL_MIN_FIELDS = 32
MAX_RENDER_WORKERS = 8
_CSV_HEADER = ("image", "x", "y", "label")


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Every field is part of the dataset's identity (see ``dataset.json``).

    Attributes:
        n_cases: number of cases (patients); splits are made per case.
        fields_per_case: high-power fields per case.
        field_size: side of a square field in pixels (0.25 um/px).
        mitoses_per_field: Poisson mean of mitotic figures per field.
        lookalikes_per_field: Poisson mean of look-alikes (apoptotic, pyknotic, lymphocytes).
        stain_spread: multiplier on the case-to-case stain variation (hue, strength, background,
            gamma); 0 gives every case the same reference stain, 2 twice the default spread.
        nucleus_density: relative number of normal (non-mitotic) nuclei per area, 0.25..4.
        label_noise_fp: fraction of the training look-alikes annotated as mitoses.
        label_noise_fn: fraction of the training mitoses left unannotated.
        val_cases: cases in the validation split.
        test_cases: cases in the test split.
        seed: generator seed; the same spec gives byte-identical files.
    """

    n_cases: int = 12
    fields_per_case: int = 4
    field_size: int = 512
    mitoses_per_field: float = 3.5
    lookalikes_per_field: float = 3.0
    stain_spread: float = 1.0
    nucleus_density: float = 1.0
    label_noise_fp: float = 0.35
    label_noise_fn: float = 0.15
    val_cases: int = 2
    test_cases: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_cases", "fields_per_case", "field_size", "val_cases", "test_cases", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise UsageError(f"synthetic: {name} must be a whole number >= 0, got {value!r}",
                                 hint="see SyntheticSpec in uts_cli/datasets/synthetic.py")
            object.__setattr__(self, name, int(value))  # numpy ints would not survive JSON
        for name in ("mitoses_per_field", "lookalikes_per_field", "stain_spread", "nucleus_density",
                     "label_noise_fp", "label_noise_fn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                    or not np.isfinite(value) or value < 0:
                raise UsageError(f"synthetic: {name} must be a number >= 0, got {value!r}",
                                 hint="see SyntheticSpec in uts_cli/datasets/synthetic.py")
            object.__setattr__(self, name, float(value))
        if not 0.25 <= self.nucleus_density <= 4:
            raise UsageError(f"synthetic: nucleus_density {self.nucleus_density} is outside 0.25..4",
                             hint="the default is 1 (relative to the default look)")
        if self.label_noise_fp > 1 or self.label_noise_fn > 1:
            raise UsageError("synthetic: label_noise_fp and label_noise_fn are fractions in [0, 1]",
                             hint="e.g. label_noise_fp=0.35")
        if self.val_cases < 1 or self.test_cases < 1 or self.n_cases < self.val_cases + self.test_cases + 1:
            raise UsageError(
                f"synthetic: {self.n_cases} case(s) cannot hold {self.val_cases} val, "
                f"{self.test_cases} test and at least one train case",
                hint="use n_cases >= val_cases + test_cases + 1, with val and test at least 1 each")
        if self.fields_per_case < 1:
            raise UsageError("synthetic: fields_per_case must be at least 1", hint="e.g. fields_per_case=4")
        if not 128 <= self.field_size <= 8192:
            raise UsageError(f"synthetic: field_size {self.field_size} is outside 128..8192 pixels",
                             hint="the default is 512")


# ----------------------------------------------------------------------------- layout helpers


def case_ids(spec: SyntheticSpec) -> list[str]:
    width = max(2, len(str(spec.n_cases)))
    return [f"case{i + 1:0{width}d}" for i in range(spec.n_cases)]


def field_names(spec: SyntheticSpec) -> list[str]:
    width = max(2, len(str(spec.fields_per_case)))
    return [f"f{j + 1:0{width}d}" for j in range(spec.fields_per_case)]


def assign_splits(spec: SyntheticSpec) -> dict[str, str]:
    """Case -> split: a seeded permutation picks the test cases, then the val cases."""
    cases = case_ids(spec)
    order = np.random.default_rng([spec.seed, 7_000_001]).permutation(len(cases))
    splits = {case: "train" for case in cases}
    for rank, i in enumerate(order[: spec.test_cases + spec.val_cases]):
        splits[cases[i]] = "test" if rank < spec.test_cases else "val"
    return splits


def _has_edge(case_index: int, field_index: int) -> bool:
    # Every fourth field shows a tissue edge with bare glass (background-only patches).
    return (case_index + field_index) % 4 == 0


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read {path}: {exc}",
                             hint="delete the folder to regenerate the synthetic dataset") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise InputDataError(f"{path} is not a complete synthetic dataset manifest",
                             hint="delete the folder to regenerate the synthetic dataset")
    return manifest


# Spec fields added after generator version 1 without changing what the other fields render; a
# manifest written before they existed holds a dataset rendered with these values.
_ADDED_FIELDS = {"stain_spread": 1.0, "nucleus_density": 1.0}


def _stored_spec(manifest: dict) -> dict:
    """The manifest's spec, with the fields it predates filled in with the values it was made with.

    Raises:
        InputDataError: the manifest holds no spec.
    """
    stored = manifest.get("spec")
    if not isinstance(stored, dict):
        raise InputDataError(f"synthetic dataset manifest {MANIFEST} holds no spec",
                             hint="delete the folder to regenerate the synthetic dataset")
    return {**_ADDED_FIELDS, **stored}


def _same_spec(manifest: dict, spec: SyntheticSpec) -> bool:
    return manifest.get("generator_version") == GENERATOR_VERSION and _stored_spec(manifest) == asdict(spec)


# ----------------------------------------------------------------------------- generation


def generate(root: str | os.PathLike, spec: SyntheticSpec | None = None,
             reporter: Reporter | None = None, workers: int | None = None) -> Path:
    """Render the synthetic dataset into ``root``, atomically.

    Everything is written into a temporary folder beside ``root`` and renamed onto it when
    complete, so an interrupted run never leaves a partial dataset behind.

    Args:
        root: the dataset folder to create (its parent is created when missing).
        spec: what to generate (default ``SyntheticSpec()``).
        reporter: progress sink (one step per field).
        workers: processes that render fields (None: one per usable CPU, up to
            ``MAX_RENDER_WORKERS``, when there are at least ``PARALLEL_MIN_FIELDS`` fields). Each
            field draws from its own seeded generator, so the dataset is the same for any number.
            The workers are spawned, so a script that calls this with more than one worker needs
            the usual ``if __name__ == "__main__":`` guard (the ``uts`` command has it).

    Returns:
        ``root`` as a Path. When ``root`` already holds a complete dataset of the same spec and
        generator version, it is returned without any work.

    Raises:
        UsageError: ``root`` exists and holds something else (another spec, other files).
    """
    root = Path(root)
    spec = spec or SyntheticSpec()
    reporter = reporter or NullReporter()
    if _existing_matches(root, spec):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not mkdtemp, which makes it 0700) so the dataset gets the user's usual mode.
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        t0 = time.monotonic()
        manifest = _write_dataset(tmp, spec, reporter, _render_workers(spec, workers))
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished the same dataset first: theirs is as good as ours.
            if _existing_matches(root, spec):
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
        reporter.log(f"synthetic dataset written to {root} in {time.monotonic() - t0:.1f} s: "
                     f"{_summary(manifest)}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _existing_matches(root: Path, spec: SyntheticSpec) -> bool:
    """True when ``root`` holds this very dataset; raises when it holds anything else."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    manifest = _read_manifest(root) if root.is_dir() else None
    if manifest is not None and _same_spec(manifest, spec):
        return True
    what = "a synthetic dataset with another spec or generator version" if manifest else "other files"
    raise UsageError(f"{root} already exists and holds {what}",
                     hint="pass another --root, or delete that folder to regenerate it")


def _summary(manifest: dict) -> str:
    c = manifest["counts"]
    return (f"{c['fields']} fields, {c['mitoses']} mitoses, {c['lookalikes']} look-alikes; "
            + ", ".join(f"{s} {c['splits'][s]['mitoses']} mitoses" for s in SPLITS))


def _render_workers(spec: SyntheticSpec, workers: int | None) -> int:
    if workers is not None:
        return max(1, int(workers))
    n_fields = spec.n_cases * spec.fields_per_case
    if n_fields < PARALLEL_MIN_FIELDS:
        return 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, MAX_RENDER_WORKERS))


def _render_one(out: Path, spec: SyntheticSpec, ci: int, fi: int, case: str, name: str,
                stain: _render.Stain) -> list[dict]:
    """Render field ``fi`` of case ``ci`` (whose stain is ``stain``) into ``out/images``; return its objects."""
    rng = np.random.default_rng([spec.seed, ci, fi + 1])
    n_mit = int(rng.poisson(spec.mitoses_per_field))
    n_look = int(rng.poisson(spec.lookalikes_per_field))
    rgb, objs = _render.render_field(rng, spec.field_size, _render.field_stain(stain, rng), n_mit, n_look,
                                     _has_edge(ci, fi), nucleus_density=spec.nucleus_density)
    image = f"{case}/{name}.tif"
    _write_tiff(out / "images" / image, rgb)
    return [dict(image=image, case=case, x=o.x, y=o.y, mitosis=o.is_mitosis, subtype=o.subtype) for o in objs]


def _quiet_worker() -> None:
    # Ctrl-C reaches the whole process group; the parent stops the pool and removes the partial
    # dataset, so the workers need not each print a KeyboardInterrupt traceback.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_dataset(out: Path, spec: SyntheticSpec, reporter: Reporter, workers: int = 1) -> dict:
    cases, names, splits = case_ids(spec), field_names(spec), assign_splits(spec)
    stains = [_render.case_stain(np.random.default_rng([spec.seed, ci, 0]), spec.stain_spread)
              for ci in range(len(cases))]
    jobs = [(ci, fi, case, name, stains[ci]) for ci, case in enumerate(cases) for fi, name in enumerate(names)]
    objects: list[dict] = []
    reporter.start("Rendering synthetic fields", len(jobs))
    if workers <= 1:
        for job in jobs:
            objects += _render_one(out, spec, *job)
            reporter.advance(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may hold torch's thread pools, which do not survive a fork.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_quiet_worker) as pool:
            try:
                futures = [pool.submit(_render_one, out, spec, *job) for job in jobs]
                for future in futures:  # in job order, so the object lists are the same as serially
                    objects += future.result()
                    reporter.advance(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    for o in objects:
        o["split"] = splits[o["case"]]
    reporter.finish()
    _annotate(objects, spec)
    _write_csv(out / "annotations.csv", _CSV_HEADER,
               [_row(o, "mitosis") for o in objects if o["annotated"]])
    _write_csv(out / "truth.csv", _CSV_HEADER, [_row(o, _truth_label(o)) for o in objects])
    _write_csv(out / "truth_objects.csv", _CSV_HEADER + ("subtype", "annotated"),
               [_row(o, _truth_label(o)) + (o["subtype"], int(o["annotated"])) for o in objects])
    _write_csv(out / "splits.csv", ("case", "split"), [(c, splits[c]) for c in cases])
    manifest = {
        "format": FORMAT,
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "seed": spec.seed,
        "pixel_size_um": PIXEL_SIZE_UM,
        "counts": _counts(objects, spec, splits),
        "stains": {case: stain.to_dict() for case, stain in zip(cases, stains)},
        "files": {"images": "images/<case>/<field>.tif", "annotations": "annotations.csv",
                  "truth": "truth.csv", "truth_objects": "truth_objects.csv", "splits": "splits.csv"},
        "complete": True,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _annotate(objects: list[dict], spec: SyntheticSpec) -> None:
    """Mark what an annotator would have marked: exact noise fractions in train, clean elsewhere."""
    rng = np.random.default_rng([spec.seed, 9_000_011])
    for o in objects:
        o["annotated"] = o["mitosis"]
    train_look = [o for o in objects if o["split"] == "train" and not o["mitosis"]]
    train_mit = [o for o in objects if o["split"] == "train" and o["mitosis"]]
    n_fp = int(round(spec.label_noise_fp * len(train_look)))
    n_fn = int(round(spec.label_noise_fn * len(train_mit)))
    for i in rng.choice(len(train_look), n_fp, replace=False):
        train_look[i]["annotated"] = True
    for i in rng.choice(len(train_mit), n_fn, replace=False):
        train_mit[i]["annotated"] = False


def _truth_label(o: dict) -> str:
    return "mitosis" if o["mitosis"] else "hard_negative"


def _row(o: dict, label: str) -> tuple:
    return (o["image"], f"{o['x']:.2f}", f"{o['y']:.2f}", label)


def _counts(objects: list[dict], spec: SyntheticSpec, splits: dict[str, str]) -> dict:
    def tally(objs: list[dict], n_cases: int) -> dict:
        return {
            "cases": n_cases,
            "fields": n_cases * spec.fields_per_case,
            "mitoses": sum(o["mitosis"] for o in objs),
            "lookalikes": sum(not o["mitosis"] for o in objs),
            "annotated": sum(o["annotated"] for o in objs),
            "annotated_lookalikes": sum(o["annotated"] and not o["mitosis"] for o in objs),
            "missed_mitoses": sum(o["mitosis"] and not o["annotated"] for o in objs),
        }

    counts = tally(objects, spec.n_cases)
    counts["splits"] = {s: tally([o for o in objects if o["split"] == s],
                                 sum(v == s for v in splits.values())) for s in SPLITS}
    subtypes = sorted({o["subtype"] for o in objects})
    counts["subtypes"] = {t: sum(o["subtype"] == t for o in objects) for t in subtypes}
    return counts


def _write_tiff(path: Path, rgb: np.ndarray) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    px_per_cm = 1e4 / PIXEL_SIZE_UM
    tifffile.imwrite(path, rgb, photometric="rgb", compression="zlib", metadata=None,
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")


def _write_csv(path: Path, header: tuple, rows: list[tuple]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


# ----------------------------------------------------------------------------- discovery

_SPEC_FIELDS = {f.name for f in fields(SyntheticSpec)}


def discover(root: str | os.PathLike | None = None, **options) -> DatasetListing:
    """List a generated synthetic dataset, generating it first when ``root`` does not exist.

    Args:
        root: dataset folder (default ``local_data/datasets/synthetic``).
        **options: ``SyntheticSpec`` fields (e.g. ``seed=3``, ``n_cases=20``) used when the
            dataset is generated, and checked against an existing one; ``None`` values are
            ignored. ``reporter`` may carry a progress sink for the generation.

    Returns:
        A listing whose images carry the annotations (noisy in train) as points and the clean
        truth as ``truth_yx`` / ``truth_kinds``; splits come from ``splits.csv``.

    Raises:
        UsageError: an unknown option, or ``root`` holds a dataset of another spec or
            something that is not a synthetic dataset.
        InputDataError: the dataset on disk is incomplete or its files are malformed.
    """
    from uts_cli.datasets.splits import read_splits_file
    from uts_cli.io.annotations import read_points_csv

    root = Path(root) if root is not None else DEFAULT_ROOT
    reporter = options.pop("reporter", None)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - _SPEC_FIELDS)
    if unknown:
        raise UsageError(f"synthetic dataset: unknown option(s) {', '.join(unknown)}",
                         hint=f"known options: {', '.join(sorted(_SPEC_FIELDS))}")
    manifest = _read_manifest(root) if root.is_dir() else None
    if manifest is None:
        generate(root, SyntheticSpec(**given), reporter)
        manifest = _read_manifest(root)
    _check_requested(root, manifest, given)

    annotations = read_points_csv(root / "annotations.csv")
    truth = read_points_csv(root / "truth.csv")
    splits = read_splits_file(root / "splits.csv")
    spec = SyntheticSpec(**_stored_spec(manifest))
    images = []
    for case in case_ids(spec):
        if case not in splits:
            raise InputDataError(f"{root / 'splits.csv'} does not name case {case}",
                                 hint="delete the folder to regenerate the synthetic dataset")
        for name in field_names(spec):
            images.append(_source_image(root, case, name, splits[case], annotations, truth))
    warnings = []
    if manifest.get("generator_version") != GENERATOR_VERSION:
        warnings.append(f"{root} was made by synthetic generator version "
                        f"{manifest.get('generator_version')}, this is version {GENERATOR_VERSION}; "
                        "delete it to regenerate")
    return DatasetListing(name="synthetic", root=root.resolve(), images=images, warnings=warnings)


def _check_requested(root: Path, manifest: dict, given: dict) -> None:
    stored = _stored_spec(manifest)
    diff = [f"{k}={stored.get(k)!r} (asked {v!r})" for k, v in given.items() if stored.get(k) != v]
    if diff:
        raise UsageError(f"{root} holds a synthetic dataset with {', '.join(diff)}",
                         hint="pass another --root, or delete that folder to regenerate it")


def _source_image(root: Path, case: str, name: str, split: str, annotations: dict,
                  truth: dict) -> SourceImage:
    key = f"{case}/{name}.tif"
    path = root / "images" / key
    if not path.is_file():
        raise InputDataError(f"synthetic dataset at {root} lacks image {key}",
                             hint="delete the folder to regenerate the synthetic dataset")
    points, kinds = annotations.get(key, empty_points())
    truth_yx, truth_kinds = truth.get(key, empty_points())
    return SourceImage(image_id=f"{case}/{name}", case_id=case, path=path.resolve(), points_yx=points,
                       kinds=kinds, split=split, pixel_size_um=PIXEL_SIZE_UM, truth_yx=truth_yx,
                       truth_kinds=truth_kinds)
