"""``normalize``: histogram matching + Macenko stain normalization into a new patch store.

The input store is never modified. The output has the same schema with normalized pixels, a
``/normalization`` group (per-patch ``ok`` flag, fitted stain state) and ``stain = "macenko"`` (or
``"histogram"`` when only histogram matching ran). Work is committed in blocks of patches, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from uts_cli.config import NormalizeConfig, to_dict, to_json
from uts_cli.errors import InputDataError, ResourceError, UsageError, library_errors, resource_error
from uts_cli.io import store
from uts_cli.reporting import NullReporter, Reporter

# Bytes of pixels per committed block (the unit of resume, and of read-ahead). A fixed byte size
# keeps peak memory flat whatever the patch size and the number of patches.
BLOCK_BYTES = 48 * 1024 * 1024
# Fixed block length in patches; None derives it from BLOCK_BYTES (tests set it small).
BLOCK: int | None = None
# A store-chosen reference is rebuilt from at most this many patches per side around the centre.
REFERENCE_MAX_TILES = 4


@dataclass
class NormalizeResult:
    store: Path
    source: Path
    n_patches: int
    n_flagged: int
    reference: str
    device: str
    resumed_patches: int
    seconds: float
    patches_per_second: float
    stain_state: dict = field(default_factory=dict)


def default_output(source: Path) -> Path:
    return source.with_name(f"{source.stem}-norm.h5")


def _stitch_field(src: store.PatchStore, image_idx: int) -> np.ndarray:
    """Rebuild (a central window of) one source field from its patches."""
    idx = src.image_patches(image_idx)
    origins = src.origin[idx]
    p = src.patch_size
    rows, cols = np.unique(origins[:, 0]), np.unique(origins[:, 1])
    # Keep a centred window so that a huge field does not become a huge reference.
    r0 = max(0, (len(rows) - REFERENCE_MAX_TILES) // 2)
    c0 = max(0, (len(cols) - REFERENCE_MAX_TILES) // 2)
    rows, cols = rows[r0:r0 + REFERENCE_MAX_TILES], cols[c0:c0 + REFERENCE_MAX_TILES]
    out = np.full((len(rows) * p, len(cols) * p, 3), 255, np.uint8)
    for k, (y, x) in zip(idx, origins):
        if y in rows and x in cols:
            i, j = int(np.searchsorted(rows, y)), int(np.searchsorted(cols, x))
            out[i * p:(i + 1) * p, j * p:(j + 1) * p] = src.read_rgb(int(k))
    return out


def choose_reference_image(src: store.PatchStore) -> int:
    """Pick the training field whose tissue colour is most typical of the store.

    Each field is summarised by the mean colour of its tissue patches; the field closest to the
    median summary (and with at least half its area tissue, when any field has) is chosen, so the
    reference is neither an outlier stain nor mostly background.
    """
    train = np.flatnonzero(src.image_split == store.SPLIT_CODES["train"])
    candidates = train if len(train) else np.arange(src.n_images)
    summaries, tissue = [], []
    for i in candidates:
        idx = src.image_patches(int(i))
        if len(idx) == 0:
            summaries.append(np.full(3, np.nan))
            tissue.append(0.0)
            continue
        # Read at most 8 patches per field: enough for a colour summary.
        sample = idx[np.linspace(0, len(idx) - 1, min(8, len(idx))).astype(int)]
        rgb = src.read_rgb(sample).reshape(-1, 3).astype(np.float32)
        tissue_px = rgb[rgb.mean(axis=1) < 220]
        summaries.append(tissue_px.mean(axis=0) if len(tissue_px) else np.full(3, np.nan))
        tissue.append(float(src.tissue[idx].mean()))
    summaries_arr = np.array(summaries)
    tissue_arr = np.array(tissue)
    valid = np.isfinite(summaries_arr).all(axis=1)
    if not valid.any():
        raise InputDataError(f"no field in {src.path} holds enough tissue to serve as stain reference",
                             hint="pass --reference IMAGE with a representative H&E field")
    if (tissue_arr[valid] >= 0.5).any():
        valid &= tissue_arr >= 0.5
    median = np.median(summaries_arr[valid], axis=0)
    dist = np.where(valid, np.linalg.norm(summaries_arr - median, axis=1), np.inf)
    return int(candidates[int(np.argmin(dist))])


def _load_reference(cfg: NormalizeConfig, src: store.PatchStore) -> tuple[np.ndarray, str]:
    if cfg.reference is not None:
        from uts_cli.io.images import open_image

        with open_image(cfg.reference) as reader:
            h, w = reader.shape[:2]
            side = 2000  # a whole HPF; larger images give their central 2000 px square
            y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
            ref = reader.read_region(y0, x0, min(h, side), min(w, side))
        return ref, f"file:{Path(cfg.reference).resolve()}"
    if cfg.reference_image_id is not None:
        matches = np.flatnonzero(src.image_ids == cfg.reference_image_id)
        if len(matches) == 0:
            raise UsageError(f"--reference-id {cfg.reference_image_id!r} is not an image of {src.path}",
                             hint=f"image ids look like {src.image_ids[0]!r}")
        image_idx = int(matches[0])
    else:
        image_idx = choose_reference_image(src)
    return _stitch_field(src, image_idx), f"store:{src.image_ids[image_idx]}"


def _normalization_of(path: Path) -> tuple[dict, str]:
    """The ``/normalization`` attributes and the uuid of another normalized store (for ``--like``).

    Raises:
        InputDataError: not a readable store.
        UsageError: a store that was not normalized.
    """
    other = store.PatchStore(path)
    if other.stain_state is None:
        raise UsageError(f"--like {path}: the store is not normalized (stain {other.stain!r})",
                         hint="name the store `uts normalize` wrote for the training data")
    with h5py.File(path, "r") as f:
        attrs = dict(f["normalization"].attrs)
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()}, other.uuid


def _create_output(src: store.PatchStore, out: Path, cfg: NormalizeConfig, chash: str, state: dict,
                   reference: str, compression: str, like: dict | None = None) -> h5py.File:
    steps = {"io": cfg.io, "alpha": cfg.alpha, "beta": cfg.beta, "hist_match": cfg.hist_match,
             "macenko": cfg.macenko}
    extra = {}
    if like is not None:
        steps = {k: like[k] for k in steps}
        extra = {"like": str(Path(cfg.like).resolve())}
    stain_name = "macenko" if steps["macenko"] else ("histogram" if steps["hist_match"] else "none")
    return store.create_derived_partial(
        src, out, compression=compression,
        attrs={"stain": stain_name, "config_hash": chash, "normalize_config_json": to_json(cfg)},
        normalization={"method": stain_name, "reference": reference, "state_json": json.dumps(state),
                       **steps, **extra})


def block_length(patch_size: int) -> int:
    """Patches per block: ``BLOCK`` when set, else about ``BLOCK_BYTES`` of pixels."""
    return BLOCK or max(1, BLOCK_BYTES // (patch_size * patch_size * 3))


def _prefetch(src: store.PatchStore, starts: list[int], n: int, block: int):
    """Read blocks in a background thread so decompression overlaps normalization.

    At most one block waits in the queue, so memory holds about three blocks at a time: the one
    being normalized, the one waiting and the one being read.
    """
    q: queue.Queue = queue.Queue(maxsize=1)

    def work():
        try:
            for s in starts:
                e = min(s + block, n)
                q.put((s, src.read_rgb(np.arange(s, e))))
        except BaseException as exc:  # handed to the consumer, which raises it
            q.put(exc)
        q.put(None)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _check_options(cfg: NormalizeConfig) -> None:
    """Refuse option values and combinations no normalization can use (before any work)."""
    if not (cfg.hist_match or cfg.macenko):
        raise UsageError("both --hist-match and --macenko are off: nothing to do",
                         hint="turn on at least one step")
    if cfg.reference is not None and cfg.reference_image_id is not None:
        raise UsageError("--reference and --reference-id exclude each other", hint="give one of them")
    if cfg.like is not None and (cfg.reference is not None or cfg.reference_image_id is not None):
        raise UsageError("--like excludes --reference and --reference-id",
                         hint="--like takes the reference of the store it names; give one of them")
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} must be at least 1", hint="use e.g. --batch-size 16")
    if cfg.compression is not None and cfg.compression not in store.COMPRESSIONS:
        raise UsageError(f"unknown --compression {cfg.compression!r}",
                         hint=f"use one of {', '.join(store.COMPRESSIONS)}")
    if cfg.io <= 0:
        raise UsageError(f"--io {cfg.io} is not a background intensity", hint="use a positive value, e.g. 240")
    if not 0 <= cfg.alpha < 50:
        raise UsageError(f"--alpha {cfg.alpha} is not an angle percentile below 50", hint="use e.g. --alpha 1")
    if cfg.beta < 0:
        raise UsageError(f"--beta {cfg.beta} must not be negative", hint="use e.g. --beta 0.15")


@library_errors
def normalize(cfg: NormalizeConfig, reporter: Reporter | None = None) -> NormalizeResult:
    """Write a stain-normalized copy of a patch store.

    Args:
        cfg: input store, output path, reference, which steps to run, device.
        reporter: progress sink.

    Returns:
        Summary with the number of flagged (background) patches and the throughput.

    Raises:
        UsageError: output exists, nothing to do, or a bad reference id.
        InputDataError: input store invalid or the reference holds too little tissue.
        ResourceError: the device is unavailable or out of memory.
    """
    import torch

    from uts_cli.devices import resolve_device
    from uts_cli.stain import StainState, fit_stain_state, normalize_batch

    reporter = reporter or NullReporter()
    t0 = time.monotonic()
    _check_options(cfg)
    src = store.PatchStore(cfg.store)
    if src.stain != "none":
        raise UsageError(f"{cfg.store} is already normalized ({src.stain})",
                         hint="normalize the raw store written by `uts prepare`")
    out = Path(cfg.output) if cfg.output else default_output(Path(cfg.store))
    if out.resolve() == Path(cfg.store).resolve():
        raise UsageError("output would overwrite the input store", hint="choose another --output")
    store.check_output_path(out, cfg.overwrite, warn=reporter.warn)
    device = resolve_device(cfg.device)
    compression = cfg.compression or str(src.attrs.get("compression", "gzip"))
    like, like_uuid = _normalization_of(Path(cfg.like)) if cfg.like is not None else (None, None)
    key = to_dict(cfg)
    key.update(output=None, overwrite=None, device=None, batch_size=None, source_uuid=src.uuid,
               like=like_uuid, compression=compression)
    chash = store.config_hash(key)

    f = store.open_partial_for_resume(out, chash, required_group="normalization", warn=reporter.warn)
    resumed = 0
    if f is not None:
        state = StainState.from_dict(json.loads(f["normalization"].attrs["state_json"]))
        reference = str(f["normalization"].attrs["reference"])
        resumed = int(f.attrs["n_done"])
        reporter.log(f"resuming {store.partial_path(out)}: {resumed}/{len(src)} patches already done")
    else:
        if like is not None:
            state = StainState.from_dict(json.loads(like["state_json"]))
            reference = str(like["reference"])
        else:
            ref_rgb, reference = _load_reference(cfg, src)
            state = fit_stain_state(ref_rgb, hist_match=cfg.hist_match, macenko=cfg.macenko,
                                    io=cfg.io, alpha=cfg.alpha, beta=cfg.beta)
        try:
            f = _create_output(src, out, cfg, chash, state.to_dict(), reference, compression, like)
        except OSError as exc:
            raise resource_error(exc, store.partial_path(out)) or exc
    n = len(src)
    flagged = 0
    try:
        ok_ds, rgb_ds = f["normalization/ok"], f["patches/rgb"]
        reporter.start("normalize", n)
        reporter.advance(resumed)
        block_len = block_length(src.patch_size)
        starts = list(range(resumed, n, block_len))
        for s, block in _prefetch(src, starts, n, block_len):
            e = s + len(block)
            oks = []
            for b in range(0, len(block), cfg.batch_size):
                batch = torch.from_numpy(block[b:b + cfg.batch_size])
                try:
                    normed, ok = normalize_batch(batch.to(device, non_blocking=True), state)
                except torch.cuda.OutOfMemoryError:
                    raise ResourceError(f"out of GPU memory at batch size {cfg.batch_size}",
                                        hint="lower --batch-size or use --device cpu") from None
                ok = ok.cpu().numpy()
                # Flagged patches pass through untouched: histogram matching alone would paint
                # stain colours into empty glass.
                block[b:b + cfg.batch_size][ok] = normed.cpu().numpy()[ok]
                oks.append(ok)
                reporter.advance(len(batch))
            rgb_ds[s:e] = block
            ok_ds[s:e] = np.concatenate(oks)
            # Commit the block last (see io/store.py: a crash before this line redoes the block).
            store.record_tails(f, {"patches/rgb": e, "normalization/ok": e})
            f.attrs["n_done"] = e
            f.flush()
        reporter.finish()
        flagged = int((~ok_ds[...]).sum())
        store.finalize(f, out)
    except OSError as exc:
        mapped = resource_error(exc, store.partial_path(out))
        if mapped is None:
            raise
        raise mapped from None
    finally:
        if f.id.valid:
            f.close()
    seconds = time.monotonic() - t0
    return NormalizeResult(store=out, source=Path(cfg.store), n_patches=n, n_flagged=flagged,
                           reference=reference, device=str(device), resumed_patches=resumed,
                           seconds=round(seconds, 2),
                           patches_per_second=round((n - resumed) / max(seconds, 1e-9), 2),
                           stain_state=state.to_dict())
