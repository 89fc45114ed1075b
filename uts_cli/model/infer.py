"""Tiled CAM inference over a field or a whole slide, streaming (torch).

Tiles of a :class:`~uts_cli.tileplan.TilePlan` are read by a DataLoader (each worker opens the
image lazily, so nothing unpicklable crosses processes and reading overlaps compute), normalised
with the run's stain state, pushed through the CAM network in batches, and handed to a
:class:`~uts_cli.stitching.BandStitcher` as probability maps. Only the batch, the loader's
read-ahead and one band are in memory at a time.

Resolution: the plan is laid out in *working* pixels (the run's pixel size). ``factor`` is input
pixels per working pixel; a tile at working ``(y, x)`` covers input pixels ``y * factor ...`` and
is read from the pyramid level ``level`` (the level nearest above the working resolution), then
resized to the tile size. With ``factor == 1`` tiles are read at full resolution, unresized.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from uts_cli.devices import resolve_amp
from uts_cli.model.cam import CamNet
from uts_cli.model.predict import _eval_mode
from uts_cli.stitching import BandStitcher
from uts_cli.tileplan import TilePlan


@dataclass(frozen=True)
class Geometry:
    """How working pixels map onto the input image.

    Attributes:
        factor: input (level-0) pixels per working pixel; 1.0 means no resampling.
        level: pyramid level the tiles are read from.
        level_downsample: level-0 pixels per level pixel ``(dy, dx)``.
    """

    factor: float = 1.0
    level: int = 0
    level_downsample: tuple[float, float] = (1.0, 1.0)

    def to_input(self, yx: np.ndarray) -> np.ndarray:
        """Working-pixel coordinates to input-pixel coordinates (pixel centres at integers)."""
        yx = np.asarray(yx, np.float64).reshape(-1, 2)
        if self.factor == 1.0:
            return yx.astype(np.float32)
        return ((yx + 0.5) * self.factor - 0.5).astype(np.float32)


def choose_level(level_shapes: list[tuple[int, int]], factor: float) -> tuple[int, tuple[float, float]]:
    """Coarsest pyramid level that is still at least as fine as the working resolution.

    Args:
        level_shapes: ``(H, W)`` per level, full resolution first.
        factor: input pixels per working pixel.

    Returns:
        ``(level, (dy, dx))`` with the level's downsample factors.
    """
    h0, w0 = level_shapes[0]
    best, best_d = 0, (1.0, 1.0)
    for i, (h, w) in enumerate(level_shapes):
        dy, dx = h0 / h, w0 / w
        # A level may be a hair coarser than asked (rounded level sizes) without losing detail.
        if max(dy, dx) <= factor * 1.001 and max(dy, dx) > max(best_d):
            best, best_d = i, (dy, dx)
    return best, best_d


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process decides what to do with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


class TileDataset(Dataset):
    """The kept tiles of a plan, read from an image file (opened lazily, once per process).

    Items are ``(rgb uint8 (P, P, 3) tensor, position)``; ``position`` indexes ``tiles``.
    """

    def __init__(self, path: Path, plan: TilePlan, tiles: np.ndarray, geometry: Geometry):
        self.path = Path(path)
        self.plan = plan
        self.tiles = np.asarray(tiles, np.int64)
        self.geometry = geometry
        self._reader = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.tiles)

    def _open(self):
        import os

        from uts_cli.io.images import open_image

        if self._reader is None or self._pid != os.getpid():
            self._reader = open_image(self.path)
            self._pid = os.getpid()
        return self._reader

    def read_tile(self, i: int) -> np.ndarray:
        reader = self._open()
        row, col = int(self.tiles[i, 0]), int(self.tiles[i, 1])
        y0, x0 = self.plan.tile_origin(row, col)
        p = self.plan.tile
        g = self.geometry
        if g.factor == 1.0 and g.level == 0:
            return reader.read_region(y0, x0, p, p)
        dy, dx = g.level_downsample
        ly0, lx0 = int(round(y0 * g.factor / dy)), int(round(x0 * g.factor / dx))
        lh, lw = max(1, int(round(p * g.factor / dy))), max(1, int(round(p * g.factor / dx)))
        region = reader.read_region(ly0, lx0, lh, lw, level=g.level)
        if (lh, lw) == (p, p):
            return region
        from PIL import Image

        # PIL widens its bilinear kernel when shrinking, so downsampling is antialiased.
        return np.array(Image.fromarray(region).resize((p, p), Image.BILINEAR))

    def __getitem__(self, i: int):
        return torch.from_numpy(np.ascontiguousarray(self.read_tile(i))), i


@dataclass
class Timings:
    """Seconds spent per stage of tiled inference (wall clock of the main process)."""

    read: float = 0.0          # waiting for the loader (reading + resizing in workers)
    normalize: float = 0.0     # stain normalisation
    model: float = 0.0         # forward pass, CAM upsampling and sigmoid, copy to host
    post: float = 0.0          # stitching and blob detection
    tiles: int = 0

    def add(self, other: "Timings") -> None:
        for k in ("read", "normalize", "model", "post", "tiles"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def to_dict(self) -> dict:
        return {"read_s": round(self.read, 3), "normalize_s": round(self.normalize, 3),
                "model_s": round(self.model, 3), "post_s": round(self.post, 3), "tiles": self.tiles}


def cam_probabilities(model: CamNet, x: torch.Tensor, size: int, tta: bool = False) -> torch.Tensor:
    """Probability maps ``(B, size, size)``: sigmoid of the upsampled CAM.

    With ``tta`` the maps of the four flips (none, horizontal, vertical, both) are flipped back and
    averaged in probability space.
    """
    flips = [()] + ([(3,), (2,), (2, 3)] if tta else [])
    total = None
    for dims in flips:
        xi = torch.flip(x, dims) if dims else x
        _, cam = model(xi)
        prob = torch.sigmoid(model.upsample(cam.float(), (size, size)))[:, 0]
        if dims:
            prob = torch.flip(prob, tuple(d - 1 for d in dims))
        total = prob if total is None else total + prob
    return total / len(flips)


def make_tile_loader(dataset: TileDataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """DataLoader over the tiles in plan order (row-major), so bands complete one after another."""
    kwargs = {}
    if workers > 0:
        kwargs.update(prefetch_factor=2, worker_init_fn=_worker_init)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", **kwargs)


@torch.inference_mode()
def infer_tiles(model: CamNet, loader, tiles: np.ndarray, stitcher: BandStitcher, device: torch.device, *,
                stain_state=None, tta: bool = False, amp: str | bool = "auto", progress=None) -> Timings:
    """Run the model over every tile of ``loader`` and feed the probability maps to ``stitcher``.

    Args:
        model: the network (any mode; evaluated in eval mode).
        loader: yields ``(uint8 (B, P, P, 3), positions)`` (see :func:`make_tile_loader`).
        tiles: the ``(N, 3)`` ``(row, col, flat)`` array the positions index.
        stitcher: receives each tile's map.
        device: the device.
        stain_state: a :class:`~uts_cli.stain.StainState` to normalise with, or None.
        tta: average the four flips.
        amp: mixed precision (see :func:`uts_cli.devices.resolve_amp`).
        progress: optional callable ``(n_tiles_done_in_batch)``.

    Returns:
        :class:`Timings` of the stages.
    """
    from uts_cli.stain import normalize_batch

    policy = resolve_amp(amp, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = Timings()
    with _eval_mode(model):
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                images, positions = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            t.read += t1 - t0
            images = images.to(device, non_blocking=device.type == "cuda")
            if stain_state is not None:
                images, _ = normalize_batch(images, stain_state)
                sync()
            t2 = time.perf_counter()
            t.normalize += t2 - t1
            x = model.prepare_input(images, channels_last=True)   # faster on CPU and CUDA alike
            with policy.autocast():
                probs = cam_probabilities(model, x, images.shape[1], tta=tta)
            probs = probs.float().cpu().numpy()
            t3 = time.perf_counter()
            t.model += t3 - t2
            for pos, m in zip(positions.numpy(), probs):
                row, col = int(tiles[pos, 0]), int(tiles[pos, 1])
                stitcher.add(row, col, m)
            t.post += time.perf_counter() - t3
            t.tiles += len(positions)
            if progress is not None:
                progress(len(positions))
    return t
