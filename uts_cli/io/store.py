"""The HDF5 patch store: schema, atomic/resumable writing, and validated lazy reading.

The full format is documented in ``docs/store-format.md``; keep the two in step.

Writing follows one rule: a store is written to ``<name>.h5.partial`` beside the final path and
renamed only after ``attrs["complete"]`` is set. Work is committed in units (one source image for
``prepare``, one block of patches for ``normalize``): rows are appended first, then the committed
row counts in the root attributes are updated, then the file is flushed. A rerun with the same
configuration reopens the partial file, trims every dataset back to the committed counts and
carries on, so the result equals that of an uninterrupted run.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import h5py
import numpy as np

from uts_cli.choices import COMPRESSIONS, POINT_KINDS
from uts_cli.errors import InputDataError, ResourceError, UsageError

FORMAT = "uts-patch-store"
SCHEMA_VERSION = 1
COORD_CONVENTION = "yx, pixels, 0-based, pixel centres at integer coords"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}
KIND_NAMES = POINT_KINDS
# Groups of ragged point annotations: what the annotators said, and (synthetic data only) the truth.
POINT_GROUPS = ("points", "truth")
# h5py's default chunk cache (1 MiB) is smaller than one 500 px patch chunk (750 KB) plus overhead.
READ_CACHE_BYTES = 16 * 1024 * 1024


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON form of a configuration (the resume guard)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _uts_version() -> str:
    from uts_cli import __version__

    return __version__


def rgb_chunks(patch_size: int) -> tuple[int, int, int, int]:
    """Chunk shape for ``/patches/rgb``: one patch per chunk when a patch is >= ~64 KB.

    Training reads patches at random, so a chunk should not hold much more than one patch; small
    patches are grouped so that chunks stay around 64-128 KB.
    """
    patch_bytes = patch_size * patch_size * 3
    per_chunk = max(1, (128 * 1024) // patch_bytes)
    return (per_chunk, patch_size, patch_size, 3)


def _compression_kwargs(compression: str) -> dict[str, Any]:
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "none":
        return {}
    raise UsageError(f"unknown compression {compression!r}", hint=f"use one of {', '.join(COMPRESSIONS)}")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _extendable(group: h5py.Group, name: str, shape_tail: tuple, dtype, **kwargs) -> None:
    group.create_dataset(name, shape=(0,) + shape_tail, maxshape=(None,) + shape_tail, dtype=dtype,
                         chunks=kwargs.pop("chunks", True), **kwargs)


def _append(ds: h5py.Dataset, rows: np.ndarray) -> None:
    n = ds.shape[0]
    rows = np.asarray(rows)
    if len(rows) == 0:
        return
    ds.resize(n + len(rows), axis=0)
    ds[n:] = rows


def open_new_partial(path: Path) -> h5py.File:
    """Create (truncate) ``partial_path(path)`` for writing, making its folder if needed.

    Args:
        path: the final store path.

    Returns:
        The open, empty ``h5py.File`` (mode ``w``).

    Raises:
        ResourceError: the folder cannot be created or written (a file in the way, read-only).
    """
    part = partial_path(path)
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        return h5py.File(part, "w")
    except OSError as exc:
        # A file in the way of the folder, a read-only folder: say where, not an internal error.
        blocker = next((p for p in part.parents if p.exists() and not p.is_dir()), part.parent)
        reason = "it is a file, not a folder" if not blocker.is_dir() else (exc.strerror or str(exc))
        raise ResourceError(f"cannot create the store in {blocker}: {reason}",
                            hint="choose a writable folder with --output") from None


def create_partial(path: Path, *, attrs: dict[str, Any], patch_size: int, compression: str,
                   has_truth: bool) -> h5py.File:
    """Create an empty ``.partial`` store with all datasets, ready for appends.

    Args:
        path: the final store path; the file created is ``partial_path(path)``.
        attrs: root attributes to set besides the fixed format attributes (``config_json`` and
            ``config_hash`` among them).
        patch_size: side of the square patches in pixels.
        compression: one of ``COMPRESSIONS`` for the RGB data.
        has_truth: whether a ``/truth`` group (clean ground truth) is written.

    Returns:
        The open ``h5py.File`` (mode ``w``).

    Raises:
        ResourceError: the folder cannot be created or written (a file in the way, read-only).
    """
    f = open_new_partial(path)
    f.attrs.update({
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "uuid": _uuid.uuid4().hex,
        "uts_version": _uts_version(),
        "created_at": _utc_now(),
        "coord_convention": COORD_CONVENTION,
        "complete": False,
        "stain": "none",
        "parent_uuid": "",
        "patch_size": patch_size,
        "compression": compression,
        "split_codes": json.dumps(SPLIT_CODES),
        "kind_codes": json.dumps(KIND_NAMES),
        "has_truth": has_truth,
        "n_patches_committed": 0,
        "n_points_committed": 0,
        "n_truth_committed": 0,
    })
    f.attrs.update(attrs)
    p = f.create_group("patches")
    _extendable(p, "rgb", (patch_size, patch_size, 3), np.uint8, chunks=rgb_chunks(patch_size),
                **_compression_kwargs(compression))
    _extendable(p, "image_idx", (), np.int32)
    _extendable(p, "origin", (2,), np.int32)
    _extendable(p, "label", (), np.uint8)
    _extendable(p, "n_points", (), np.uint16)
    _extendable(p, "n_hard", (), np.uint16)
    _extendable(p, "tissue", (), np.float32)
    for name in POINT_GROUPS if has_truth else POINT_GROUPS[:1]:
        g = f.create_group(name)
        _extendable(g, "patch_idx", (), np.int32)
        _extendable(g, "yx", (2,), np.float32)
        _extendable(g, "kind", (), np.uint8)
    return f


def write_images_table(f: h5py.File, rows: list[dict[str, Any]]) -> None:
    """Write ``/images`` (one row per source image) with ``done`` all False."""
    n = len(rows)
    g = f.create_group("images")
    str_dt = h5py.string_dtype()
    for key in ("id", "case_id", "path"):
        g.create_dataset(key, data=np.array([r[key] for r in rows], dtype=object), dtype=str_dt)
    g.create_dataset("sha256", shape=(n,), dtype=str_dt)
    g.create_dataset("shape", data=np.array([r["shape"] for r in rows], dtype=np.int32).reshape(n, 3))
    g.create_dataset("split", data=np.array([SPLIT_CODES[r["split"]] for r in rows], dtype=np.uint8))
    g.create_dataset("pixel_size_um", data=np.array(
        [np.nan if r.get("pixel_size_um") is None else r["pixel_size_um"] for r in rows], dtype=np.float32))
    # False for images a dataset ships without labels (MIDOG21 151-200): never scored.
    g.create_dataset("labelled", data=np.array([bool(r.get("labelled", True)) for r in rows], dtype=bool))
    g.create_dataset("patch_start", data=np.zeros(n, np.int64))
    g.create_dataset("patch_count", data=np.zeros(n, np.int64))
    g.create_dataset("n_skipped", data=np.zeros(n, np.int64))  # background tiles left out
    g.create_dataset("done", data=np.zeros(n, bool))


def trim_to_committed(f: h5py.File) -> None:
    """Cut every appendable dataset back to the counts of the last committed unit."""
    counts = {"patches": int(f.attrs["n_patches_committed"]),
              "points": int(f.attrs["n_points_committed"]),
              "truth": int(f.attrs["n_truth_committed"])}
    for group, n in counts.items():
        if group in f:
            for ds in f[group].values():
                if ds.shape[0] != n:
                    ds.resize(n, axis=0)


@dataclass
class PatchRows:
    """The patches of one source image, ready to append."""

    rgb: np.ndarray          # (n, P, P, 3) uint8
    origin: np.ndarray       # (n, 2) int32, top-left (y, x) in the source image
    label: np.ndarray        # (n,) uint8
    n_points: np.ndarray     # (n,) uint16, mitoses per patch
    n_hard: np.ndarray       # (n,) uint16, hard negatives per patch
    tissue: np.ndarray       # (n,) float32, tissue fraction
    points: tuple[np.ndarray, np.ndarray, np.ndarray]   # (local patch idx, yx patch-local, kind)
    truth: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def append_rows(f: h5py.File, image_idx: int, rows: PatchRows) -> None:
    """Append a block of patches of one image, uncommitted (see ``commit_image``).

    Point ``patch_idx`` values in ``rows`` are local to the block; they are made global here.
    """
    p = f["patches"]
    start = p["label"].shape[0]
    n = len(rows.origin)
    _append(p["rgb"], rows.rgb)
    _append(p["image_idx"], np.full(n, image_idx, np.int32))
    _append(p["origin"], rows.origin.astype(np.int32))
    _append(p["label"], rows.label.astype(np.uint8))
    _append(p["n_points"], rows.n_points.astype(np.uint16))
    _append(p["n_hard"], rows.n_hard.astype(np.uint16))
    _append(p["tissue"], rows.tissue.astype(np.float32))
    for name, pts in (("points", rows.points), ("truth", rows.truth)):
        if pts is None or name not in f:
            continue
        local_idx, yx, kind = pts
        g = f[name]
        _append(g["patch_idx"], (np.asarray(local_idx) + start).astype(np.int32))
        _append(g["yx"], np.asarray(yx, np.float32).reshape(-1, 2))
        _append(g["kind"], np.asarray(kind, np.uint8))


def commit_image(f: h5py.File, image_idx: int, sha256: str) -> None:
    """Commit everything appended since the last commit as the patches of ``image_idx``."""
    start = int(f.attrs["n_patches_committed"])
    end = f["patches/label"].shape[0]
    img = f["images"]
    img["patch_start"][image_idx] = start
    img["patch_count"][image_idx] = end - start
    img["sha256"][image_idx] = sha256
    counts = {"n_patches_committed": end}
    for name in POINT_GROUPS:
        if name in f:
            counts[f"n_{name}_committed"] = f[name]["patch_idx"].shape[0]
    # Counts and the done flag are written last: a crash before this point leaves the unit
    # uncommitted, and the next run trims it away.
    rows = {"patches": end, **{g: counts[f"n_{g}_committed"] for g in POINT_GROUPS if g in f}}
    record_tails(f, {f"{group}/{name}": n for group, n in rows.items() for name in f[group]})
    f.attrs.update(counts)
    img["done"][image_idx] = True
    f.flush()


def append_image(f: h5py.File, image_idx: int, rows: PatchRows, sha256: str) -> None:
    """Append all patches of one image and commit them (the resume unit of ``prepare``)."""
    append_rows(f, image_idx, rows)
    commit_image(f, image_idx, sha256)


def finalize(f: h5py.File, path: Path) -> None:
    """Mark the partial store complete, close it and move it onto ``path``."""
    f.attrs["complete"] = True
    f.flush()
    f.close()
    os.replace(partial_path(path), path)


def open_partial_for_resume(path: Path, expected_hash: str, required_group: str = "images",
                            warn: Callable[[str], None] | None = None) -> h5py.File | None:
    """Reopen ``<path>.partial`` for appending if it was made with the same configuration.

    ``required_group`` is a group the writer creates first (``normalization`` for ``normalize``);
    a partial file without it never got past its creation.

    Args:
        path: the final store path.
        expected_hash: ``config_hash`` of the current settings.
        required_group: see above.
        warn: told (one line) when an existing partial file is discarded, and why.

    Returns:
        The open file, trimmed to its last committed unit, or None when there is no usable partial
        file (absent, unreadable after a hard kill, or made with other settings); an unusable one
        is deleted, after a warning, so the caller starts afresh.
    """
    part = partial_path(path)
    if not part.exists():
        return None
    try:
        f = h5py.File(part, "r+")
    except OSError:
        _discard_partial(part, "it is unreadable (a write was cut short)", warn)
        return None
    reason = "it was made with other settings"
    try:
        if f.attrs.get("format") != FORMAT or required_group not in f:
            reason = "it is not a usable partial store"
        elif f.attrs.get("config_hash") == expected_hash:
            trim_to_committed(f)
            _check_tails(f)
            return f
    except (OSError, KeyError, ValueError):
        reason = "it is damaged"
    try:
        f.close()
    except OSError:  # a torn file may fail to flush on close as well
        pass
    _discard_partial(part, reason, warn)
    return None


def _tail_digest(ds: h5py.Dataset, n: int) -> str:
    """sha256 of rows ``[start of the chunk holding row n-1, n)``: the committed rows that share a
    chunk with rows written after the commit."""
    start = (n // ds.chunks[0]) * ds.chunks[0] if ds.chunks else n
    return hashlib.sha256(np.ascontiguousarray(ds[start:n]).tobytes()).hexdigest()


def record_tails(f: h5py.File, committed: dict[str, int]) -> None:
    """Remember the committed rows of each partly filled last chunk (call just before a commit).

    Why: HDF5 rewrites a compressed chunk elsewhere in the file when rows are added to it, and
    may hand the old place to another chunk. A process killed before the next flush can then
    leave the index pointing at someone else's pixels, which decode without any error. On resume,
    :func:`open_partial_for_resume` compares these digests and discards a file they disagree with.

    Args:
        f: the open partial store.
        committed: dataset path -> number of committed rows.
    """
    f.attrs["tail_check_json"] = json.dumps(
        {name: [n, _tail_digest(f[name], n)] for name, n in sorted(committed.items())})


def _check_tails(f: h5py.File) -> None:
    """Raise OSError if a committed chunk no longer holds what :func:`record_tails` saw."""
    recorded = json.loads(f.attrs.get("tail_check_json", "{}"))
    for name, (n, digest) in recorded.items():
        if name not in f or f[name].shape[0] < n or _tail_digest(f[name], n) != digest:
            raise OSError(f"committed rows of {name} were damaged by an interruption")


def _discard_partial(part: Path, reason: str, warn: Callable[[str], None] | None) -> None:
    # Announced, never silent: the user may have meant to resume it.
    if warn is not None:
        warn(f"discarding the unfinished {part}: {reason}; starting afresh")
    part.unlink()


def check_output_path(path: Path, overwrite: bool, warn: Callable[[str], None] | None = None) -> None:
    """Refuse to replace an existing store unless ``overwrite``; then discard a stale partial file.

    Args:
        path: the final store path.
        overwrite: replace an existing store (and discard an unfinished one).
        warn: told (one line) when an unfinished partial store is discarded.

    Raises:
        UsageError: ``path`` exists and ``overwrite`` is off, or ``path`` is a directory.
    """
    if path.is_dir():
        raise UsageError(f"output store path is a directory: {path}", hint="give a file name with --output")
    if path.exists() and not overwrite:
        raise UsageError(f"output store exists: {path}",
                         hint="pass --overwrite to replace it, or choose another --output")
    if overwrite:
        part = partial_path(path)
        if part.exists():
            _discard_partial(part, "--overwrite was given", warn)


def create_derived_partial(src: "PatchStore", path: Path, *, compression: str, attrs: dict[str, Any],
                           normalization: dict[str, Any]) -> h5py.File:
    """Create the ``.partial`` of a store derived from ``src`` with new pixels (``normalize``).

    Everything but ``/patches/rgb`` is copied from ``src``; ``rgb`` is created empty (same shape)
    with ``compression``, and a ``/normalization`` group with a per-patch ``ok`` flag is added.
    The new store gets its own ``uuid``, ``parent_uuid = src.uuid``, ``complete = False`` and
    ``n_done = 0`` (the committed patch count, the resume unit).

    Args:
        src: the complete input store.
        path: the final output path; the file created is ``partial_path(path)``.
        compression: one of ``COMPRESSIONS``.
        attrs: further root attributes (``stain``, ``config_hash``, the command's config ...).
        normalization: attributes of the ``/normalization`` group.

    Returns:
        The open ``h5py.File`` (mode ``w``).
    """
    kwargs = _compression_kwargs(compression)
    f = open_new_partial(path)
    try:
        with h5py.File(src.path, "r") as s:
            f.attrs.update(dict(s.attrs))
            for group in ("images", *POINT_GROUPS):
                if group in s:
                    s.copy(s[group], f, name=group)
            p = f.create_group("patches")
            for name, ds in s["patches"].items():
                if name != "rgb":
                    s.copy(ds, p, name=name)
        n, ps = len(src), src.patch_size
        p.create_dataset("rgb", shape=(n, ps, ps, 3), dtype=np.uint8, chunks=rgb_chunks(ps), **kwargs)
        f.attrs.update({"uuid": _uuid.uuid4().hex, "parent_uuid": src.uuid, "created_at": _utc_now(),
                        "uts_version": _uts_version(), "complete": False, "compression": compression,
                        "n_done": 0})
        f.attrs.update(attrs)
        g = f.create_group("normalization")
        g.create_dataset("ok", shape=(n,), dtype=bool)
        g.attrs.update(normalization)
        f.flush()
    except BaseException:
        f.close()
        raise
    return f


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class PatchStore:
    """Read-only, validated view of a complete patch store.

    Small per-patch arrays (labels, origins, points) are loaded on open; pixels are read lazily.
    The object is cheap to pickle: it reopens the HDF5 file in each process that touches pixels
    (HDF5 handles must not cross a fork into DataLoader workers).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        f = self._open_validated(self.path)
        try:
            a = f.attrs
            self.uuid = str(a["uuid"])
            self.patch_size = int(a["patch_size"])
            self.stain = str(a["stain"])
            self.parent_uuid = str(a.get("parent_uuid", ""))
            self.config = json.loads(a["config_json"]) if "config_json" in a else {}
            self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in a.items()}
            img = f["images"]
            self.image_ids = img["id"].asstr()[...]
            self.image_case = img["case_id"].asstr()[...]
            self.image_path = img["path"].asstr()[...]
            self.image_shape = img["shape"][...]
            self.image_split = img["split"][...]
            self.image_pixel_size = img["pixel_size_um"][...]
            self.image_labelled = img["labelled"][...]
            self.image_patch_start = img["patch_start"][...]
            self.image_patch_count = img["patch_count"][...]
            p = f["patches"]
            self.image_idx = p["image_idx"][...]
            self.origin = p["origin"][...]
            self.label = p["label"][...]
            self.n_points = p["n_points"][...]
            self.n_hard = p["n_hard"][...]
            self.tissue = p["tissue"][...]
            self.split = self.image_split[self.image_idx] if len(self.image_idx) else np.zeros(0, np.uint8)
            self._points = self._load_points(f, "points")
            self.has_truth = "truth" in f
            self._truth = self._load_points(f, "truth") if self.has_truth else None
            self.normalization_ok = f["normalization/ok"][...] if "normalization/ok" in f else None
            self.stain_state = (json.loads(f["normalization"].attrs["state_json"])
                                if "normalization" in f else None)
        except (KeyError, ValueError) as exc:
            # A complete file with a missing or unreadable member was damaged or hand-edited.
            raise InputDataError(f"store {self.path} is damaged or incompatible ({exc})",
                                 hint="recreate it with `uts prepare` (and `uts normalize`)") from None
        finally:
            f.close()

    # -- opening -----------------------------------------------------------------------------
    @staticmethod
    def _open_validated(path: Path) -> h5py.File:
        hint_regen = "recreate it with `uts prepare` (and `uts normalize`)"
        if not path.exists():
            if partial_path(path).exists():
                raise InputDataError(f"store is incomplete: only {partial_path(path)} exists",
                                     hint="rerun the command that writes it to resume")
            raise InputDataError(f"store not found: {path}", hint="create one with `uts prepare`")
        try:
            f = h5py.File(path, "r", rdcc_nbytes=READ_CACHE_BYTES)
        except OSError as exc:
            raise InputDataError(f"not a readable HDF5 file: {path} ({exc})", hint=hint_regen) from None
        a = f.attrs
        try:
            if a.get("format") != FORMAT:
                raise InputDataError(f"not a uts patch store: {path} (format attribute is "
                                     f"{a.get('format')!r})", hint=hint_regen)
            if int(a.get("schema_version", -1)) != SCHEMA_VERSION:
                raise InputDataError(
                    f"store schema version {a.get('schema_version')} is not supported "
                    f"(this uts reads version {SCHEMA_VERSION}): {path}", hint=hint_regen)
            if not bool(a.get("complete", False)):
                raise InputDataError(f"store is incomplete: {path}", hint=hint_regen)
        except InputDataError:
            f.close()
            raise
        return f

    def _h5(self) -> h5py.File:
        # Reopen after a fork: a handle inherited from the parent process is not safe to use.
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r", rdcc_nbytes=READ_CACHE_BYTES)
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sizes and indices ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.label)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def indices(self, split: str | None = None) -> np.ndarray:
        """Patch indices of one split (or all)."""
        if split is None:
            return np.arange(len(self), dtype=np.int64)
        return np.flatnonzero(self.split == SPLIT_CODES[split])

    def image_patches(self, image_idx: int) -> np.ndarray:
        start = int(self.image_patch_start[image_idx])
        return np.arange(start, start + int(self.image_patch_count[image_idx]), dtype=np.int64)

    # -- pixels --------------------------------------------------------------------------------
    def read_rgb(self, indices: Iterable[int] | int) -> np.ndarray:
        """uint8 patches ``(B, P, P, 3)`` (or ``(P, P, 3)`` for one int), in the order asked."""
        ds = self._h5()["patches/rgb"]
        if np.isscalar(indices):
            return ds[int(indices)]
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return np.zeros((0,) + ds.shape[1:], np.uint8)
        order = np.argsort(idx, kind="stable")
        out = np.empty((len(idx),) + ds.shape[1:], np.uint8)
        # h5py fancy indexing needs increasing indices; read each one (chunks are per patch).
        for j in order:
            ds.read_direct(out, np.s_[int(idx[j])], np.s_[j])
        return out

    # -- points --------------------------------------------------------------------------------
    @staticmethod
    def _load_points(f: h5py.File, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = f[name]
        return g["patch_idx"][...], g["yx"][...], g["kind"][...]

    @staticmethod
    def _select(points, patch_idx: int):
        pidx, yx, kind = points
        lo, hi = np.searchsorted(pidx, [patch_idx, patch_idx + 1])
        return yx[lo:hi], kind[lo:hi]

    def points_for(self, patch_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Annotated points of one patch: ``(yx (K, 2) patch-local, kind (K,))``."""
        return self._select(self._points, patch_idx)

    def truth_for(self, patch_idx: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Clean ground-truth points of one patch (synthetic data), or None."""
        return None if self._truth is None else self._select(self._truth, patch_idx)

    def all_points(self, truth: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(patch_idx, yx patch-local, kind)`` for every point of the store."""
        if truth:
            if self._truth is None:
                raise InputDataError(f"store has no clean ground truth: {self.path}",
                                     hint="only the synthetic dataset carries one; use the annotations")
            return self._truth
        return self._points

    def image_points(self, image_idx: int, truth: bool = False, kind: int | None = 0):
        """Points of one source image in image coordinates (``kind`` None = all kinds)."""
        pidx, yx, kinds = self.all_points(truth)
        patches = self.image_patches(image_idx)
        if len(patches) == 0:
            return np.zeros((0, 2), np.float32)
        lo, hi = np.searchsorted(pidx, [patches[0], patches[-1] + 1])
        sel = slice(lo, hi)
        pts = yx[sel] + self.origin[pidx[sel]].astype(np.float32)
        if kind is not None:
            pts = pts[kinds[sel] == kind]
        return pts
