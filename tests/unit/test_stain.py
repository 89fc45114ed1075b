"""Stain normalization: batched histogram matching and Macenko against skimage and torchstain."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.exposure import match_histograms

from uts_cli import stain
from uts_cli.errors import InputDataError

# Ruifrok & Johnston H and E optical density vectors (unit columns), and a "scanner" variant.
HE_A = np.array([[0.650, 0.072], [0.704, 0.990], [0.286, 0.105]])
HE_B = np.array([[0.55, 0.20], [0.75, 0.85], [0.37, 0.48]])


def beer_lambert_patch(rng: np.random.Generator, size: int = 96, he: np.ndarray = HE_A,
                       strength: float = 1.0, lumen: bool = True) -> np.ndarray:
    """Synthetic H&E patch: smooth eosin stroma, hematoxylin nuclei, optional white lumen."""
    he = he / np.linalg.norm(he, axis=0)
    eosin = 0.25 + 0.5 * gaussian_filter(rng.random((size, size)), 4) * 4
    haem = np.zeros((size, size))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(int(rng.integers(6, 12))):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 8)
        haem += rng.uniform(0.6, 1.4) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    haem = haem + 0.1 * gaussian_filter(rng.random((size, size)), 2)
    if lumen:
        hole = (yy - size * 0.7) ** 2 + (xx - size * 0.3) ** 2 < (size * 0.15) ** 2
        eosin[hole] *= 0.05
        haem[hole] *= 0.05
    od = strength * (haem[..., None] * he[:, 0] + eosin[..., None] * he[:, 1])
    od += rng.normal(0, 0.02, od.shape)
    rgb = 240.0 * np.exp(-od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    rng = np.random.default_rng(7)
    out = [beer_lambert_patch(rng, he=HE_B if i % 2 else HE_A, strength=rng.uniform(0.7, 1.3))
           for i in range(10)]
    return np.stack(out)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return beer_lambert_patch(np.random.default_rng(1), size=160, he=HE_A)


@pytest.fixture(scope="module")
def state(reference) -> stain.StainState:
    return stain.fit_stain_state(reference)


def torchstain_normalize(patch: np.ndarray, st: stain.StainState) -> np.ndarray:
    import torchstain

    norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    norm.HERef = torch.tensor(st.he_ref, dtype=torch.float32)
    norm.maxCRef = torch.tensor(st.max_c_ref, dtype=torch.float32)
    out, _, _ = norm.normalize(torch.from_numpy(patch).permute(2, 0, 1).float(), Io=st.io,
                               alpha=st.alpha, beta=st.beta, stains=False)
    return out.numpy()


def test_fit_state_matches_torchstain_fit(reference, state):
    import torchstain

    norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    norm.fit(torch.from_numpy(reference).permute(2, 0, 1).float())
    # Same torchstain call; only multi-threaded float32 reductions may differ in the last bit.
    np.testing.assert_allclose(state.he_ref, norm.HERef.double().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.max_c_ref, norm.maxCRef.double().numpy(), rtol=1e-5)
    assert state.hist_ref.shape == (3, 256)
    assert state.hist_ref[:, -1] == pytest.approx(1.0)
    assert np.all(np.diff(state.hist_ref, axis=1) >= 0)
    # H column first: hematoxylin absorbs red more than eosin does.
    assert state.he_ref[0, 0] > state.he_ref[0, 1]


def test_macenko_matches_torchstain_per_patch(patches, state):
    out, ok = stain.macenko_normalize(torch.from_numpy(patches), state)
    assert ok.all()
    diffs = np.stack([np.abs(out[i].numpy().astype(int) - torchstain_normalize(p, state))
                      for i, p in enumerate(patches)])
    print(f"macenko vs torchstain: max {diffs.max()} mean {diffs.mean():.5f} "
          f"p99 {np.percentile(diffs, 99)} differing {np.mean(diffs > 0):.2e}")
    assert diffs.mean() < 1.0
    assert np.percentile(diffs, 99) <= 2
    assert diffs.mean() < 0.01  # observed about 1e-4: only float rounding at the integer cut
    # And normalization really changed the B-scanner patches.
    assert np.abs(out[1].numpy().astype(int) - patches[1]).mean() > 3


def test_histogram_match_matches_skimage(patches, reference, state):
    ours = stain.histogram_match(torch.from_numpy(patches), state).numpy()
    theirs = np.stack([match_histograms(p, reference, channel_axis=-1) for p in patches])
    diff = np.abs(ours.astype(int) - theirs)
    print(f"histogram match vs skimage: max {diff.max()} differing {np.mean(diff > 0):.2e}")
    assert diff.max() <= 1
    assert np.mean(diff > 0) < 1e-3  # observed: identical


def test_histogram_match_edge_patches(reference, state):
    rng = np.random.default_rng(3)
    flat = np.full((1, 20, 20, 3), 17, np.uint8)  # one grey level per channel
    two = rng.choice(np.array([0, 255], np.uint8), size=(1, 20, 20, 3))
    for batch in (flat, two):
        ours = stain.histogram_match(torch.from_numpy(batch), state).numpy()[0]
        np.testing.assert_array_equal(ours, match_histograms(batch[0], reference, channel_axis=-1))
    one_level_ref = stain.fit_stain_state(np.full((8, 8, 3), 200, np.uint8), macenko=False)
    out = stain.histogram_match(torch.from_numpy(two), one_level_ref).numpy()
    assert np.all(out == 200)


def test_state_round_trip_through_json(patches, state):
    restored = stain.StainState.from_dict(json.loads(json.dumps(state.to_dict())))
    for name in ("hist_ref", "he_ref", "max_c_ref"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(state, name))
    batch = torch.from_numpy(patches)
    a, ok_a = stain.normalize_batch(batch, state)
    b, ok_b = stain.normalize_batch(batch, restored)
    assert torch.equal(a, b) and torch.equal(ok_a, ok_b)


def test_state_with_steps_off_round_trips():
    st = stain.StainState(hist_ref=None, he_ref=None, max_c_ref=None, beta=0.2)
    again = stain.StainState.from_dict(json.loads(json.dumps(st.to_dict())))
    assert again.hist_ref is None and again.he_ref is None and again.beta == 0.2


@pytest.mark.parametrize("bad", [
    {"he_ref": [[1, 2]], "max_c_ref": [1, 1]},
    {"he_ref": [[0.5, 0.2]] * 3, "max_c_ref": None},
    {"hist_ref": [[0.0] * 255] * 3},
    {"he_ref": [[float("nan"), 0.2]] * 3, "max_c_ref": [1, 1]},
    {"io": "bright"},
    {"hist_ref": [[1.0] * 128 + [0.5] * 128] * 3},
    {"version": 99},
    [1, 2, 3],
])
def test_from_dict_rejects_malformed(bad):
    with pytest.raises(InputDataError):
        stain.StainState.from_dict(bad)


def test_background_patches_pass_through_flagged(patches, state):
    white = np.full((96, 96, 3), 250, np.uint8)
    specks = white.copy()
    specks[10:13, 10:13] = (90, 40, 120)  # a few stained pixels, far under the tissue minimum
    specks[50:52, 70:73] = (150, 80, 160)
    batch = torch.from_numpy(np.stack([patches[0], white, specks, patches[1]]))
    for fn in (stain.normalize_batch, stain.macenko_normalize):
        out, ok = fn(batch, state)
        assert ok.tolist() == [True, False, False, True]
        assert torch.equal(out[1], batch[1]) and torch.equal(out[2], batch[2])
    # The good patches are normalized exactly as they are on their own.
    alone, _ = stain.normalize_batch(batch[[0, 3]], state)
    assert torch.equal(out[[0, 3]], stain.macenko_normalize(batch[[0, 3]], state)[0])
    mixed, _ = stain.normalize_batch(batch, state)
    assert torch.equal(mixed[[0, 3]], alone)


def test_tissue_fraction_guard(state):
    """A patch just under min_tissue_fraction is flagged, one just over is normalized."""
    rng = np.random.default_rng(5)
    tissue = beer_lambert_patch(rng, size=100, lumen=False)
    need = stain._min_tissue_pixels(100 * 100, state.min_tissue_fraction)
    mask = stain.tissue_mask(torch.from_numpy(tissue)[None])[0].numpy()
    rows = []
    for n_keep in (need - 1, need + 200):
        keep = np.zeros(100 * 100, bool)
        keep[np.flatnonzero(mask.reshape(-1))[:n_keep]] = True
        patch = np.where(keep.reshape(100, 100, 1), tissue, np.uint8(245))
        rows.append(patch)
    _, ok = stain.macenko_normalize(torch.from_numpy(np.stack(rows)), state)
    assert ok.tolist() == [False, True]


def test_normalize_batch_steps_can_be_switched_off(patches, reference):
    batch = torch.from_numpy(patches[:3])
    hist_only = stain.fit_stain_state(reference, macenko=False)
    out, ok = stain.normalize_batch(batch, hist_only)
    assert ok.all() and torch.equal(out, stain.histogram_match(batch, hist_only))
    mac_only = stain.fit_stain_state(reference, hist_match=False)
    out, ok = stain.normalize_batch(batch, mac_only)
    assert ok.all() and torch.equal(out, stain.macenko_normalize(batch, mac_only)[0])
    neither = stain.StainState(hist_ref=None, he_ref=None, max_c_ref=None)
    out, ok = stain.normalize_batch(batch, neither)
    assert ok.all() and torch.equal(out, batch)


def test_chunking_does_not_change_results(patches, state, monkeypatch):
    batch = torch.from_numpy(patches)
    whole, ok_whole = stain.normalize_batch(batch, state)
    monkeypatch.setattr(stain, "_CHUNK_PIXELS_CPU", 96 * 96 * 3)  # 3 patches per chunk
    chunked, ok_chunked = stain.normalize_batch(batch, state)
    assert torch.equal(whole, chunked) and torch.equal(ok_whole, ok_chunked)


def test_empty_batch_and_bad_input(state):
    out, ok = stain.normalize_batch(torch.zeros((0, 8, 8, 3), dtype=torch.uint8), state)
    assert out.shape == (0, 8, 8, 3) and ok.shape == (0,)
    with pytest.raises(InputDataError):
        stain.normalize_batch(torch.zeros((2, 8, 8, 3), dtype=torch.float32), state)
    with pytest.raises(InputDataError):
        stain.histogram_match(torch.zeros((8, 8, 3), dtype=torch.uint8), state)
    with pytest.raises(InputDataError):
        stain.macenko_normalize(torch.zeros((1, 8, 8, 3), dtype=torch.uint8),
                                stain.StainState(hist_ref=None, he_ref=None, max_c_ref=None))


def test_fit_rejects_background_reference():
    white = np.full((64, 64, 3), 248, np.uint8)
    white[5:8, 5:8] = 100
    with pytest.raises(InputDataError) as err:
        stain.fit_stain_state(white)
    assert "reference" in err.value.hint
    with pytest.raises(InputDataError):
        stain.fit_stain_state(np.zeros((4, 4), np.uint8))
    # Histogram matching alone needs no tissue.
    assert stain.fit_stain_state(white, macenko=False).he_ref is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(patches, state):
    batch = torch.from_numpy(np.concatenate([patches, np.full((1, 96, 96, 3), 250, np.uint8)]))
    cpu, ok_cpu = stain.normalize_batch(batch, state)
    gpu, ok_gpu = stain.normalize_batch(batch.cuda(), state)
    assert gpu.device.type == "cuda" and ok_gpu.device.type == "cuda"
    assert torch.equal(ok_cpu, ok_gpu.cpu())
    diff = (cpu.int() - gpu.cpu().int()).abs().float()
    print(f"cuda vs cpu: max {diff.max().item()} mean {diff.mean().item():.5f}")
    assert diff.mean() < 0.01 and diff.max() <= 2
    assert torch.equal(stain.histogram_match(batch.cuda(), state).cpu(),
                       stain.histogram_match(batch, state))
