from collections import Counter

import numpy as np
import pytest
import torch

from uts_cli.data import (BalancedBatchSampler, PatchDataset, batch_to_device, collate_patches,
                          make_eval_loader, make_train_loader, only_one_mitosis, padded_points)
from uts_cli.errors import InputDataError
from uts_cli.io.store import PatchStore

CPU = torch.device("cpu")


@pytest.fixture
def store(tiny_store):
    return PatchStore(tiny_store)


def test_item_matches_store(store):
    ds = PatchDataset(store, np.arange(len(store)))
    for i in range(len(store)):
        item = ds[i]
        assert item.images.dtype == torch.uint8 and item.images.shape == (64, 64, 3)
        assert np.array_equal(item.images.numpy(), store.read_rgb(i))
        assert float(item.labels) == store.label[i]
        yx, kind = store.points_for(i)
        assert int(item.mask.sum()) == int((kind == 0).sum()) == store.n_points[i]
        np.testing.assert_array_equal(item.points[item.mask].numpy(), yx[kind == 0])
        assert int(item.indices) == i


def test_getitems_reads_a_batch_in_the_order_asked(store):
    ds = PatchDataset(store, np.arange(len(store))[::-1].copy())
    batch = ds.__getitems__([5, 0, 17, 3])
    single = collate_patches([ds[i] for i in [5, 0, 17, 3]])
    for a, b in zip(batch, single):
        assert torch.equal(a, b)
    assert batch.indices.tolist() == [18, 23, 6, 20]


def test_padded_points_truncates_and_handles_duplicates(store):
    two = int(np.flatnonzero(store.n_points == 2)[0])
    pts, mask, dropped = padded_points(store, np.array([two, two, 0]), max_points=1)
    assert mask.sum(1).tolist() == [1, 1, 0] and dropped == 1
    assert np.array_equal(pts[0], pts[1])


def test_label_override_and_bad_indices(store):
    labels = np.zeros(len(store), np.uint8)
    labels[3] = 1
    ds = PatchDataset(store, [3, 4], labels=labels)
    assert ds.labels.tolist() == [1.0, 0.0]
    with pytest.raises(InputDataError):
        PatchDataset(store, [len(store)])
    with pytest.raises(InputDataError):
        PatchDataset(store, [0], labels=np.zeros(3))


def test_balanced_sampler_ratio_and_determinism():
    labels = np.array([0] * 30 + [1] * 5)
    s = BalancedBatchSampler(labels, batch_size=8, seed=1)
    assert s.repeat == 6
    s.set_epoch(1)
    flat = [i for b in s for i in b]
    counts = Counter(flat)
    assert len(flat) == 60 and len(s) == 8
    assert all(counts[i] == 6 for i in range(30, 35)) and all(counts[i] == 1 for i in range(30))
    again = [i for b in s for i in b]
    s.set_epoch(2)
    other = [i for b in s for i in b]
    assert again == flat and other != flat
    # Mid-epoch resume skips the batches already trained.
    s.set_epoch(1, skip_batches=3)
    assert [i for b in s for i in b] == flat[24:] and len(s) == 5
    # Minority negatives are oversampled the same way.
    inv = BalancedBatchSampler(1 - labels, batch_size=8, seed=1)
    assert inv.repeat == 6 and len(inv.base) == 60


def test_sampler_epoch_len_unbalanced_and_single_last():
    s = BalancedBatchSampler(np.array([0, 1] * 10), batch_size=4, epoch_len=50)
    batches = list(s)
    assert sum(len(b) for b in batches) == 50 and len(batches) == len(s) == 13
    plain = BalancedBatchSampler(np.array([0] * 9 + [1] * 1), batch_size=3, balance=False)
    b = list(plain)
    # 10 samples in batches of 3: the trailing single sample is dropped (BatchNorm needs 2).
    assert [len(x) for x in b] == [3, 3, 3] and len(plain) == 3
    one = BalancedBatchSampler(np.array([1]), batch_size=4)
    assert [len(x) for x in one] == [1] and len(one) == 1


def test_train_loader_yields_uint8_and_store_labels(store):
    idx = store.indices("train")
    loader = make_train_loader(store, idx, batch_size=4, seed=0, workers=0, device=CPU)
    loader.batch_sampler.set_epoch(1)
    n_pos = n = 0
    for batch in loader:
        batch = batch_to_device(batch, CPU)
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (64, 64, 3)
        assert np.array_equal(batch.labels.numpy(), store.label[batch.indices.numpy()].astype(np.float32))
        assert set(batch.indices.tolist()) <= set(idx.tolist())
        n_pos += int(batch.labels.sum())
        n += len(batch.labels)
    assert 0.4 <= n_pos / n <= 0.6  # balanced


def test_worker_loader_matches_in_process(store):
    idx = store.indices("train")
    ref = make_eval_loader(store, idx, batch_size=5, workers=0, device=CPU)
    par = make_eval_loader(store, idx, batch_size=5, workers=1, device=CPU)
    for a, b in zip(ref, par):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)


def test_only_one_mitosis(store):
    kept = only_one_mitosis(store)
    train = store.indices("train")
    assert set(kept) == {i for i in train if store.n_points[i] <= 1}
    assert len(kept) < len(train)  # the tiny store has a patch with two mitoses
    assert only_one_mitosis(store, [0, 1]).tolist() == [0, 1]
