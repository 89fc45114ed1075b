import numpy as np
import pytest
import torch

from uts_cli.model.augment import AugmentConfig, augment_batch, smooth_field

torch.set_num_threads(2)
SIDE = 64
NONE = dict(p_hflip=0.0, p_vflip=0.0, p_transpose=0.0, p_rotate=0.0)


def dots(points: np.ndarray, side: int = SIDE, radius: float = 3.0) -> torch.Tensor:
    """White patches with one black disc per point (B, side, side, 3) uint8."""
    yy, xx = np.mgrid[:side, :side]
    img = np.full((len(points), side, side, 3), 255, np.uint8)
    for i, (y, x) in enumerate(points):
        img[i][(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = 0
    return torch.from_numpy(img)


def centroids(images: torch.Tensor) -> torch.Tensor:
    dark = (255 - images[:, 0]).clamp_min(0)
    yy, xx = torch.meshgrid(torch.arange(images.shape[-2]), torch.arange(images.shape[-1]), indexing="ij")
    w = dark.sum((1, 2))
    return torch.stack([(dark * yy).sum((1, 2)) / w, (dark * xx).sum((1, 2)) / w], 1)


def run(config, n=24, seed=0, side=SIDE, sync_free=None):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0.25 * side, 0.75 * side, (n, 2))
    images = dots(pts, side)
    # The disc is drawn on the pixel grid, so measure where it really is before augmentation.
    before = centroids(images.permute(0, 3, 1, 2).float())
    gen = torch.Generator().manual_seed(seed)
    out = augment_batch(images, before.unsqueeze(1).float(), torch.ones(n, 1, dtype=torch.bool),
                        torch.ones(n), gen, config, sync_free=sync_free)
    return out, centroids(out.images)


@pytest.mark.parametrize("config", [
    AugmentConfig(**{**NONE, "p_hflip": 1.0}),
    AugmentConfig(**{**NONE, "p_vflip": 1.0}),
    AugmentConfig(**{**NONE, "p_transpose": 1.0}),
    AugmentConfig(p_rotate=0.0),                       # random flips/transposes, exact path
    AugmentConfig(p_rotate=1.0),                       # rotation in [-90, 90]
    AugmentConfig(**{**NONE, "elastic": True, "p_elastic": 1.0}),
    AugmentConfig(p_rotate=1.0, elastic=True, p_elastic=1.0),
], ids=["hflip", "vflip", "transpose", "flips", "rotate", "elastic", "rotate+elastic"])
@pytest.mark.parametrize("sync_free", [False, True], ids=["subsets", "sync-free"])
def test_dot_lands_on_transformed_point(config, sync_free):
    out, measured = run(config, sync_free=sync_free)
    assert out.mask.all()
    err = (measured - out.points[:, 0]).norm(dim=1)
    assert float(err.max()) < 1.0, err


def test_known_flip_coordinates():
    pts = torch.tensor([[[10.0, 20.0]]])
    img = dots(pts[0].numpy())
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(img, pts, torch.ones(1, 1, dtype=torch.bool), torch.ones(1), gen,
                        AugmentConfig(**{**NONE, "p_hflip": 1.0}))
    torch.testing.assert_close(out.points[0, 0], torch.tensor([10.0, SIDE - 1 - 20.0]))
    out = augment_batch(img, pts, torch.ones(1, 1, dtype=torch.bool), torch.ones(1), gen,
                        AugmentConfig(**{**NONE, "p_transpose": 1.0}))
    torch.testing.assert_close(out.points[0, 0], torch.tensor([20.0, 10.0]))


def test_cheap_path_is_exact():
    gen = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (8, SIDE, SIDE, 3), dtype=torch.uint8)
    out = augment_batch(img, torch.zeros(8, 1, 2), torch.zeros(8, 1, dtype=torch.bool), torch.zeros(8),
                        gen, AugmentConfig(**{**NONE, "p_hflip": 1.0, "p_transpose": 1.0}))
    expect = img.permute(0, 3, 1, 2).flip(-1).transpose(-1, -2).float()
    assert torch.equal(out.images, expect)


def test_point_leaving_frame_clears_label():
    side = SIDE
    pts = torch.tensor([[[2.0, 2.0], [0.0, 0.0]],     # corner point: leaves on a 45 degree turn
                        [[2.0, 2.0], [32.0, 32.0]],   # one leaves, the central one stays
                        [[0.0, 0.0], [0.0, 0.0]]])    # no points, pseudo-labelled positive
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    labels = torch.tensor([1.0, 1.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    cfg = AugmentConfig(**{**NONE, "p_rotate": 1.0, "angle_range": (45.0, 45.0)})
    out = augment_batch(torch.full((3, side, side, 3), 128, dtype=torch.uint8), pts, mask, labels, gen, cfg)
    assert out.mask.tolist() == [[False, False], [False, True], [False, False]]
    assert out.labels.tolist() == [0.0, 1.0, 1.0]
    assert out.labels.dtype == labels.dtype


def test_outside_is_white_and_reproducible():
    img = torch.zeros(2, SIDE, SIDE, 3, dtype=torch.uint8)
    cfg = AugmentConfig(**{**NONE, "p_rotate": 1.0, "angle_range": (45.0, 45.0)})
    a = augment_batch(img, torch.zeros(2, 1, 2), torch.zeros(2, 1, dtype=torch.bool), torch.zeros(2),
                      torch.Generator().manual_seed(5), cfg)
    assert float(a.images[0, :, 0, 0]. min()) == 255.0 and float(a.images[0, :, 32, 32].max()) == 0.0
    rnd = torch.randint(0, 256, (6, SIDE, SIDE, 3), dtype=torch.uint8)
    args = (rnd, torch.zeros(6, 1, 2), torch.zeros(6, 1, dtype=torch.bool), torch.zeros(6))
    full = AugmentConfig(elastic=True)
    x1 = augment_batch(*args, torch.Generator().manual_seed(7), full).images
    x2 = augment_batch(*args, torch.Generator().manual_seed(7), full).images
    x3 = augment_batch(*args, torch.Generator().manual_seed(8), full).images
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_smooth_field_rms():
    field = smooth_field(3, 64, 64, alpha_px=2.0, sigma_px=6.0, generator=torch.Generator().manual_seed(0),
                         device="cpu")
    assert field.shape == (3, 2, 64, 64)
    rms = field.pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.full((3,), 2.0), rtol=0.25)
    # Smooth: neighbouring pixels move almost together.
    assert float((field[..., 1:] - field[..., :-1]).abs().max()) < 1.0


def test_non_square_rejected():
    with pytest.raises(ValueError):
        augment_batch(torch.zeros(1, 8, 9, 3, dtype=torch.uint8), torch.zeros(1, 1, 2),
                      torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1), torch.Generator())


def test_scaled_float_batch_matches_uint8_path():
    from uts_cli.model.cam import CamNet

    net = CamNet(n_blocks=1, input_norm="imagenet")
    rnd = torch.randint(0, 256, (6, SIDE, SIDE, 3), dtype=torch.uint8)
    args = (torch.rand(6, 1, 2) * SIDE, torch.ones(6, 1, dtype=torch.bool), torch.ones(6))
    cfg = AugmentConfig(elastic=True)
    a = augment_batch(rnd, *args, torch.Generator().manual_seed(2), cfg)
    b = augment_batch(net.prepare_input(rnd), *args, torch.Generator().manual_seed(2), cfg,
                      fill=net.fill_value())
    torch.testing.assert_close(b.images, net.prepare_input(a.images), rtol=1e-4, atol=1e-4)
    assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)


def test_sync_free_path_matches_subset_path():
    # The GPU strategy (both paths on every sample, then a per-sample select) must give the same
    # pixels and points as the CPU strategy (each path on its own subset).
    rnd = torch.randint(0, 256, (16, SIDE, SIDE, 3), dtype=torch.uint8)
    pts = torch.rand(16, 2, 2) * SIDE
    args = (pts, torch.ones(16, 2, dtype=torch.bool), torch.ones(16))
    a = augment_batch(rnd, *args, torch.Generator().manual_seed(4), AugmentConfig(), sync_free=False)
    b = augment_batch(rnd, *args, torch.Generator().manual_seed(4), AugmentConfig(), sync_free=True)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-3)
    torch.testing.assert_close(a.points, b.points)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.labels, b.labels)
    out, measured = run(AugmentConfig(p_rotate=1.0, elastic=True, p_elastic=0.5), seed=1)
    assert float((measured - out.points[:, 0]).norm(dim=1).max()) < 1.0
