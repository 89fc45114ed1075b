"""Streaming patches from a :class:`~uts_cli.io.store.PatchStore` into training and inference.

Nothing is preloaded: pixels are read from the HDF5 store batch by batch. A batch sampler yields
lists of dataset positions, and :meth:`PatchDataset.__getitems__` reads a whole batch in one call
(in increasing store order, which HDF5 reads fastest), so one DataLoader worker prepares one batch.
Batches stay uint8 until they are on the device; float conversion, augmentation and
normalisation happen there (see ``uts_cli.model.augment`` and ``CamNet.prepare_input``).
"""
from __future__ import annotations

import math
import signal
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from uts_cli.choices import KIND_MITOSIS
from uts_cli.errors import InputDataError, UsageError
from uts_cli.io.store import PatchStore


class PatchBatch(NamedTuple):
    """One batch (or one sample, without the leading B axis)."""

    images: torch.Tensor   # uint8 (B, P, P, 3)
    labels: torch.Tensor   # float32 (B,)
    points: torch.Tensor   # float32 (B, K, 2) yx patch-local, zero padded
    mask: torch.Tensor     # bool (B, K)
    indices: torch.Tensor  # int64 (B,) store indices


def padded_points(store: PatchStore, indices: np.ndarray, max_points: int = 8,
                  use_truth: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Mitosis points of ``indices`` as padded arrays.

    Args:
        store: the patch store.
        indices: store indices, ``(N,)``.
        max_points: K, the padded length; further points of a patch are dropped.
        use_truth: read the clean ground truth (synthetic stores) instead of the annotations.

    Returns:
        ``(points (N, K, 2) float32, mask (N, K) bool, n_dropped)``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    uniq, inverse = np.unique(indices, return_inverse=True)
    pidx, yx, kind = store.all_points(truth=use_truth)
    sel = kind == KIND_MITOSIS
    pidx, yx = pidx[sel], yx[sel]
    pos = np.full(len(store), -1, np.int64)
    pos[uniq] = np.arange(len(uniq))
    row = pos[pidx]
    keep = row >= 0
    pidx, yx, row = pidx[keep], yx[keep], row[keep]
    # Rank of each point within its patch (points are stored grouped by patch).
    order = np.argsort(row, kind="stable")
    row, yx = row[order], yx[order]
    first = np.searchsorted(row, row, side="left")
    rank = np.arange(len(row)) - first
    ok = rank < max_points
    points = np.zeros((len(uniq), max_points, 2), np.float32)
    mask = np.zeros((len(uniq), max_points), bool)
    points[row[ok], rank[ok]] = yx[ok]
    mask[row[ok], rank[ok]] = True
    return points[inverse], mask[inverse], int((~ok).sum())


class PatchDataset(Dataset):
    """Patches ``indices`` of a store, with weak labels and padded mitosis points.

    Args:
        store: the (picklable, lazily reopened) patch store.
        indices: store indices; dataset position ``i`` is store patch ``indices[i]``.
        max_points: padded number of points per patch.
        use_truth: take points from the clean ground truth instead of the annotations.
        labels: optional ``(len(store),)`` labels replacing the store's (pseudo-labels);
            indexed by store index.
    """

    def __init__(self, store: PatchStore, indices: Sequence[int], max_points: int = 8,
                 use_truth: bool = False, labels: np.ndarray | None = None):
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(store)):
            raise InputDataError(f"patch indices out of range for store {store.path} "
                                 f"({len(store)} patches)", hint="the indices belong to another store")
        source = store.label if labels is None else np.asarray(labels)
        if len(source) != len(store):
            raise InputDataError(f"labels cover {len(source)} patches, the store has {len(store)}",
                                 hint="pass one label per store patch")
        self.labels = source[self.indices].astype(np.float32)
        self.points, self.mask, self.n_dropped_points = padded_points(
            store, self.indices, max_points, use_truth)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> PatchBatch:
        return PatchBatch(torch.from_numpy(self.store.read_rgb(int(self.indices[i]))),
                          torch.tensor(self.labels[i]), torch.from_numpy(self.points[i]),
                          torch.from_numpy(self.mask[i]), torch.tensor(int(self.indices[i])))

    def __getitems__(self, positions: Sequence[int]) -> PatchBatch:
        """A whole batch in one read (DataLoader calls this with a batch sampler's list)."""
        pos = np.asarray(positions, dtype=np.int64)
        return PatchBatch(torch.from_numpy(self.store.read_rgb(self.indices[pos])),
                          torch.from_numpy(self.labels[pos]), torch.from_numpy(self.points[pos]),
                          torch.from_numpy(self.mask[pos]), torch.from_numpy(self.indices[pos]))


def collate_patches(data) -> PatchBatch:
    """Collate for :class:`PatchDataset`: pass a pre-read batch through, stack single samples."""
    if isinstance(data, PatchBatch):
        return data
    return PatchBatch(*(torch.stack(list(field)) for field in zip(*data)))


class BalancedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of dataset positions, class-balanced as in the original method.

    Balancing: with ``n_maj`` majority and ``n_min`` minority samples, every minority sample is
    repeated ``r = round(n_maj / n_min)`` times and every majority sample appears once; the list
    is shuffled each epoch. (The original oversamples the minority class by ``round(max/min)``;
    repeating each one exactly ``r`` times gives the same expected mix with no sampling noise.)
    Without ``balance``, or when a class is absent, it is a plain shuffle.

    An epoch's order depends only on ``(seed, epoch)`` (call :meth:`set_epoch`), so a resumed run
    replays exactly the batches of the run it continues. ``epoch_len`` (samples) cuts or extends
    an epoch: further shuffled copies are drawn as needed. A last batch of one sample is dropped
    when there are others (BatchNorm cannot train on one sample of 1x1 features).

    Distributed training (``world_size > 1``): ``batch_size`` is the *global* batch. Every rank
    draws the same global batches and takes its slice ``rank`` of ``world_size`` nearly equal
    slices, so the ranks together train on exactly the batches of a single process, whatever
    the number of processes, and ``skip_batches`` counts global batches (a run resumes under
    any world size). A last global batch smaller than ``2 * world_size`` is dropped, so that no
    rank gets fewer than two samples.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int = 0, balance: bool = True,
                 epoch_len: int | None = None, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise UsageError(f"batch size {batch_size} must be at least 1", hint="use e.g. --batch-size 32")
        if world_size > 1 and batch_size < 2 * world_size:
            raise UsageError(f"--batch-size {batch_size} is the global batch: with {world_size} processes "
                             f"it must be at least {2 * world_size} (two samples per process)",
                             hint=f"use --batch-size {2 * world_size} or more, or fewer processes")
        if not 0 <= rank < max(1, world_size):
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.rank, self.world_size = int(rank), max(1, int(world_size))
        self.labels = np.asarray(labels) > 0.5
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.balance = balance
        self.epoch_len = epoch_len
        self.epoch = 0
        self.skip_batches = 0
        self.repeat, self.base = self._base_positions()

    def _base_positions(self) -> tuple[int, np.ndarray]:
        """How many times each minority sample appears per pass (1 = no balancing), and the pass."""
        pos = np.flatnonzero(self.labels)
        neg = np.flatnonzero(~self.labels)
        if not self.balance or len(pos) == 0 or len(neg) == 0:
            return 1, np.arange(len(self.labels))
        minority, majority = (pos, neg) if len(pos) <= len(neg) else (neg, pos)
        repeat = max(1, int(round(len(majority) / len(minority))))
        return repeat, np.concatenate([majority, np.repeat(minority, repeat)])

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; ``skip_batches`` leaves out its first batches (mid-epoch resume)."""
        self.epoch = int(epoch)
        self.skip_batches = int(skip_batches)

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.base) if self.epoch_len is None else int(self.epoch_len)
        copies = max(1, math.ceil(n / max(1, len(self.base))))
        return np.concatenate([rng.permutation(self.base) for _ in range(copies)])[:n]

    def _global_sizes(self) -> list[int]:
        """Sizes of all global batches of an epoch (before ``skip_batches``)."""
        n = len(self.base) if self.epoch_len is None else int(self.epoch_len)
        full, rest = divmod(n, self.batch_size)
        sizes = [self.batch_size] * full + ([rest] if rest else [])
        smallest = 2 if self.world_size == 1 else 2 * self.world_size
        if len(sizes) > 1 and sizes[-1] < smallest and (self.world_size > 1 or sizes[-1] == 1):
            sizes.pop()
        return sizes

    def _batches(self) -> list[np.ndarray]:
        order = self._order()
        sizes = self._global_sizes()
        starts = np.concatenate([[0], np.cumsum(sizes)])
        return [order[starts[i]:starts[i + 1]] for i in range(len(sizes))]

    def global_batch_sizes(self) -> list[int]:
        """Global batch size of each step still to come this epoch (after ``skip_batches``)."""
        return self._global_sizes()[self.skip_batches:]

    def __len__(self) -> int:
        return max(0, len(self._global_sizes()) - self.skip_batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches()[self.skip_batches:]:
            if self.world_size > 1:
                batch = np.array_split(batch, self.world_size)[self.rank]
            yield batch.tolist()


class SequentialBatchSampler(Sampler[list[int]]):
    """Consecutive batches of positions ``0..n-1`` (inference order = the order asked)."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = int(n), int(batch_size)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.n, self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.n)))


def _seed_worker(worker_id: int) -> None:
    # A terminal Ctrl-C reaches the whole process group. Workers ignore it: the main process
    # decides (finish the step, save, stop), and a worker that quit on its own would make the
    # next batch fail with "DataLoader worker exited unexpectedly" instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Workers only read; still seed numpy/random in case a transform ever draws numbers.
    info = get_worker_info()
    seed = (info.seed if info is not None else worker_id) % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)
    torch.set_num_threads(1)


def _loader(dataset: PatchDataset, batch_sampler: Sampler, workers: int, device: torch.device,
            seed: int) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    kwargs = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2, worker_init_fn=_seed_worker)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      collate_fn=collate_patches, pin_memory=device.type == "cuda",
                      generator=generator, **kwargs)


def make_train_loader(store: PatchStore, indices: Sequence[int], batch_size: int, seed: int,
                      workers: int, device: torch.device, balance: bool = True,
                      epoch_len: int | None = None, labels: np.ndarray | None = None,
                      max_points: int = 8, use_truth: bool = False, rank: int = 0,
                      world_size: int = 1) -> DataLoader:
    """DataLoader of shuffled, class-balanced training batches (uint8, see :class:`PatchBatch`).

    Its ``batch_sampler`` is a :class:`BalancedBatchSampler`; call
    ``loader.batch_sampler.set_epoch(e)`` before each epoch.

    Args:
        store: the patch store.
        indices: store indices of the training patches.
        batch_size: samples per batch.
        seed: seeds the epoch orders and the worker seeds.
        workers: DataLoader worker processes (0 = read in the main process).
        device: where batches go (pinned host memory on CUDA).
        balance: oversample the minority class (see :class:`BalancedBatchSampler`).
        epoch_len: samples per epoch (None = one balanced pass).
        labels: optional per-store-patch labels replacing the store's.
        max_points: padded number of points per patch.
        use_truth: points from the clean ground truth instead of the annotations.
        rank / world_size: this process's slice of each global batch (distributed training;
            ``batch_size`` is then the global batch, see :class:`BalancedBatchSampler`).

    Returns:
        The DataLoader.
    """
    dataset = PatchDataset(store, indices, max_points=max_points, use_truth=use_truth, labels=labels)
    sampler = BalancedBatchSampler(dataset.labels, batch_size, seed=seed, balance=balance,
                                   epoch_len=epoch_len, rank=rank, world_size=world_size)
    # Worker seeds differ per rank (the loader's generator seeds them).
    return _loader(dataset, sampler, workers, device, seed + 7919 * rank)


def make_eval_loader(store: PatchStore, indices: Sequence[int], batch_size: int, workers: int,
                     device: torch.device, labels: np.ndarray | None = None,
                     max_points: int = 8, use_truth: bool = False) -> DataLoader:
    """DataLoader over ``indices`` in the given order, in batches of ``batch_size``."""
    dataset = PatchDataset(store, indices, max_points=max_points, use_truth=use_truth, labels=labels)
    return _loader(dataset, SequentialBatchSampler(len(dataset), batch_size), workers, device, 0)


def batch_to_device(batch: PatchBatch, device: torch.device) -> PatchBatch:
    """Move a batch to ``device`` (asynchronously from pinned memory on CUDA); pixels stay uint8."""
    nb = device.type == "cuda"
    return PatchBatch(*(t.to(device, non_blocking=nb) for t in batch))


def only_one_mitosis(store: PatchStore, indices: Sequence[int] | None = None) -> np.ndarray:
    """Patches with at most one annotated mitosis (the method's training filter).

    Args:
        store: the patch store.
        indices: candidate store indices (default: the train split).

    Returns:
        The subset of ``indices`` (order kept) whose mitosis count is 0 or 1.
    """
    idx = store.indices("train") if indices is None else np.asarray(indices, dtype=np.int64)
    return idx[store.n_points[idx] <= 1]
