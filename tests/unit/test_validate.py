"""Selection by what is scored: the region-level threshold sweep of validation, and the training
options (optimizer, schedule, weight EMA, BatchNorm re-estimation) of the one TeachConfig."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_tiny_store
from uts_cli.config import TeachConfig
from uts_cli.errors import UsageError
from uts_cli.io.store import PatchStore
from uts_cli.metrics import Counts
from uts_cli.model.optim import WeightEma, lr_factor, make_optimizer, reestimate_bn
from uts_cli.model.validate import SWEEP, best_of_sweep, region_sweep


def cfg(**kw):
    return TeachConfig(store=Path("s.h5"), name="t", **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = write_tiny_store(tmp_path_factory.mktemp("val") / "tiny.h5", n_images=8, seed=2)
    s = PatchStore(path)
    assert len(s.image_points(0)) + len(s.image_points(1)) > 0
    return s


def blob_maps(store, indices, peak=0.8, decoy=None, shift=0.0):
    """Patch maps with a Gaussian blob of height ``peak`` on every annotated point (moved by ``shift``
    pixels along x), plus an optional decoy blob of height ``decoy`` away from the points."""
    p = store.patch_size
    yy, xx = np.mgrid[:p, :p].astype(np.float32)
    maps = np.zeros((len(indices), p, p), np.float32)
    for j, k in enumerate(indices):
        yx, kind = store.points_for(int(k))
        for y, x in yx[kind == 0]:
            maps[j] = np.maximum(maps[j], peak * np.exp(-((yy - y) ** 2 + (xx - x - shift) ** 2) / 18.0))
        if decoy is not None:
            # Somewhere at least 20 px from every point of the patch.
            pts = yx[kind == 0]
            cy, cx = next(c for c in ((p / 2, p / 2), (8, 8), (8, p - 8), (p - 8, 8), (p - 8, p - 8))
                          if all(np.hypot(c[0] - y, c[1] - x) > 20 for y, x in pts))
            maps[j] = np.maximum(maps[j], decoy * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0))
    return maps


def batches(indices, maps, size=3):
    for i in range(0, len(indices), size):
        yield indices[i:i + size], maps[i:i + size]


def test_region_sweep_finds_every_point_and_a_threshold_above_the_decoys(store):
    idx = np.arange(len(store))
    n_true = sum(len(store.image_points(i)) for i in range(len(store.image_ids)))
    # Decoys at 0.4 on every patch: only thresholds above 0.4 are perfect, and ties go up.
    res = region_sweep(store, batches(idx, blob_maps(store, idx, peak=0.8, decoy=0.4)), radius_px=10)
    assert res.n_fields == len(store.image_ids) and res.n_points == n_true
    assert res.best == Counts(tp=n_true, fp=0, fn=0) and res.f1 == 1.0
    assert 0.4 < res.threshold < 0.8 and not res.at_edge
    k_low = list(res.thresholds).index(0.3)
    assert res.counts[k_low].fp == len(store) and res.curve()[k_low] < 1.0


def test_region_sweep_uses_the_radius(store):
    idx = np.arange(len(store))
    maps = blob_maps(store, idx, shift=8.0)  # every blob 8 px off its point
    assert region_sweep(store, batches(idx, maps), radius_px=10).best.fn == 0
    far = region_sweep(store, batches(idx, maps), radius_px=4)
    assert far.best.tp == 0 and far.f1 == 0.0


def test_region_sweep_flags_degenerate_maps_at_the_edge(store):
    idx = np.arange(len(store))
    flat = np.full((len(store), store.patch_size, store.patch_size), 0.999, np.float32)
    res = region_sweep(store, batches(idx, flat), radius_px=30)
    # One field-sized blob per field at every threshold: F1 never reaches 1, all ties, the top wins.
    assert res.at_edge and res.threshold == SWEEP[-1]
    empty = region_sweep(store, batches(idx, np.zeros_like(flat)), radius_px=30)
    assert empty.at_edge and empty.f1 == 0.0


def test_region_sweep_on_a_partial_field_counts_only_covered_points(store):
    img = next(i for i in range(len(store.image_ids)) if len(store.image_points(i)) > 0)
    patches = store.image_patches(img)
    with_point = [int(k) for k in patches if store.label[k] == 1]
    keep = np.array(sorted(set(patches) - {with_point[0]}), np.int64)  # a distilled val set
    maps = blob_maps(store, keep)
    res = region_sweep(store, batches(keep, maps), radius_px=10, indices=keep)
    covered = sum(int((store.points_for(int(k))[1] == 0).sum()) for k in keep)
    assert res.n_fields == 1 and res.n_points == covered and res.best.fn == 0 and res.best.fp == 0


def test_best_of_sweep_ties_and_edges():
    t = np.array([0.1, 0.5, 0.9])
    mid = best_of_sweep(t, [Counts(1, 1, 0), Counts(1, 0, 0), Counts(1, 0, 0)])
    assert mid.threshold == 0.9 and mid.at_edge          # tie -> the higher threshold, which is the edge
    inner = best_of_sweep(t, [Counts(1, 3, 0), Counts(2, 0, 0), Counts(1, 0, 1)])
    assert inner.threshold == 0.5 and not inner.at_edge and inner.f1 == 1.0
    assert best_of_sweep(t, [Counts(2, 0, 0), Counts(1, 0, 1), Counts(0, 0, 2)]).at_edge


def test_lr_schedules():
    const = cfg()
    assert lr_factor(0, 100, const, 10) == lr_factor(99, 100, const, 10) == 1.0
    cos = cfg(lr_schedule="warmup-cosine", warmup_epochs=1.0)
    ramp = [lr_factor(s, 100, cos, 10) for s in range(10)]
    assert ramp[0] == pytest.approx(0.1) and ramp[-1] == pytest.approx(1.0) and ramp == sorted(ramp)
    assert lr_factor(10, 100, cos, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, cos, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(99, 100, cos, 10) < 0.01
    assert lr_factor(0, 100, cfg(lr_schedule="warmup-cosine", warmup_epochs=0), 10) == 1.0


def test_optimizers_and_decay_groups():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert isinstance(make_optimizer(net, cfg()), torch.optim.Adam)
    opt = make_optimizer(net, cfg(optimizer="adamw", weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    decays = {len(g["params"]): g["weight_decay"] for g in opt.param_groups}
    assert decays == {1: 0.05, 3: 0.0}   # the conv kernel decays; its bias and the BN affine do not


def test_weight_ema_averages_parameters_and_copies_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEma(net, decay=0.5)
    before = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.update(net)   # first update: decay limited to 2/11
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * before + (1 - d) * (before + 1.0))
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 3.0))
    state = ema.state_dict()
    other = WeightEma(net, decay=0.5)
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.module[0].weight, ema.module[0].weight)


def test_bn_reestimation_replaces_running_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    data = [torch.full((4, 1, 3, 3), 2.0), torch.full((4, 1, 3, 3), 4.0)]
    assert reestimate_bn(net, data) == 2
    assert torch.allclose(net[1].running_mean, torch.full((2,), 3.0))   # plain average of the batches
    assert net[1].momentum == 0.1 and not net.training
    assert reestimate_bn(net, []) == 0


@pytest.mark.parametrize("change, message", [
    ({"select": "bogus"}, "--select"), ({"optimizer": "sgd"}, "--optimizer"),
    ({"lr_schedule": "step"}, "--lr-schedule"), ({"ema_decay": 1.0}, "EMA decay"),
    ({"weight_decay": -1.0}, "weight decay"), ({"bn_reestimate": -1}, "bn_reestimate"),
    ({"radius_px": 0.0}, "radius_px"),
])
def test_new_options_are_validated(change, message):
    with pytest.raises(UsageError, match=message):
        cfg(**change).validate()


def test_off_grid_stores_are_swept_on_whole_fields(tmp_path):
    """Hand-made stores of overlapping crops (the benchmarks') score like stitched whole fields."""
    from uts_cli.model.validate import _on_store_grid

    s = PatchStore(write_tiny_store(tmp_path / "tiny.h5", n_images=4, seed=2))
    idx = np.arange(len(s))
    assert _on_store_grid(s, idx)
    maps = blob_maps(s, idx, peak=0.8)
    on_grid = region_sweep(s, batches(idx, maps), radius_px=10)
    # The same patches with one crop of field 0 duplicated at a shifted, off-grid origin: the
    # duplicate repeats the first patch's map there, so every true point is still found once.
    s.origin = np.concatenate([s.origin, s.origin[:1] + 8])
    s.image_idx = np.concatenate([s.image_idx, s.image_idx[:1]])
    idx2 = np.arange(len(s.origin))
    assert not _on_store_grid(s, idx2)
    shifted = np.zeros_like(maps[:1])
    shifted[0, :-8, :-8] = maps[0, 8:, 8:]
    off_grid = region_sweep(s, batches(idx2, np.concatenate([maps, shifted])), radius_px=10, indices=idx2)
    assert off_grid.n_fields == on_grid.n_fields == 4
    assert off_grid.best == on_grid.best


@pytest.mark.parametrize("partial", [False, True])
def test_whole_field_and_banded_sweeps_count_alike(store, monkeypatch, partial):
    """Fields too large to stitch whole go through eval's banded stitcher, threshold by threshold;
    both ways give the same counts at every threshold (maps with blobs, decoys and noise)."""
    import uts_cli.model.validate as validate

    rng = np.random.default_rng(5)
    idx = np.arange(len(store))
    if partial:
        idx = np.sort(rng.choice(idx, size=len(idx) * 3 // 4, replace=False))
    maps = np.maximum(blob_maps(store, idx, peak=0.9, decoy=0.5),
                      (rng.random((len(idx), store.patch_size, store.patch_size)) ** 6).astype(np.float32))
    whole = region_sweep(store, batches(idx, maps), radius_px=10, indices=idx)
    monkeypatch.setattr(validate, "WHOLE_FIELD_PIXELS", 0)
    banded = region_sweep(store, batches(idx, maps), radius_px=10, indices=idx)
    assert whole.counts == banded.counts and whole.threshold == banded.threshold
    assert (whole.n_fields, whole.n_points) == (banded.n_fields, banded.n_points)
    assert len({c.fp for c in whole.counts}) > 3      # the thresholds really differ
