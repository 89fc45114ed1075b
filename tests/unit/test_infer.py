"""Tiled inference pieces: pyramid level choice, coordinate mapping, TTA flips, tile reading."""
import numpy as np
import torch

from uts_cli.model.cam import CamNet
from uts_cli.model.infer import Geometry, TileDataset, cam_probabilities, choose_level
from uts_cli.tileplan import plan_tiles


def test_choose_level_takes_the_coarsest_level_still_fine_enough():
    shapes = [(4000, 6000), (2000, 3000), (1000, 1500), (250, 375)]
    assert choose_level(shapes, 1.0)[0] == 0
    assert choose_level(shapes, 2.0) == (1, (2.0, 2.0))
    assert choose_level(shapes, 3.9)[0] == 1
    assert choose_level(shapes, 4.0)[0] == 2
    assert choose_level(shapes, 0.5)[0] == 0     # upsampling: read full resolution


def test_geometry_maps_pixel_centres():
    g = Geometry(factor=2.0)
    # Working pixel 0 covers input pixels 0 and 1, its centre is input 0.5.
    assert g.to_input(np.array([[0.0, 10.0]])).tolist() == [[0.5, 20.5]]
    assert Geometry().to_input(np.array([[3.0, 4.0]])).tolist() == [[3.0, 4.0]]


def test_tta_is_flip_equivariant():
    torch.manual_seed(0)
    model = CamNet(n_blocks=1).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        p = cam_probabilities(model, x, 32, tta=True)
        pf = cam_probabilities(model, torch.flip(x, (3,)), 32, tta=True)
        plain = cam_probabilities(model, x, 32)
    assert p.shape == (2, 32, 32) and torch.all((p >= 0) & (p <= 1))
    assert torch.allclose(torch.flip(pf, (2,)), p, atol=1e-5)
    assert not torch.allclose(plain, p)


def test_tile_dataset_reads_padded_and_resampled_tiles(tmp_path):
    import imageio.v3 as iio

    rgb = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    iio.imwrite(path, rgb)
    plan = plan_tiles(50, 70, 32, 0)
    ds = TileDataset(path, plan, plan.origins(), Geometry())
    img, pos = ds[len(ds) - 1]
    assert img.shape == (32, 32, 3) and img.dtype == torch.uint8 and pos == len(ds) - 1
    assert np.array_equal(img.numpy()[:18, :6], rgb[32:, 64:])
    assert np.all(img.numpy()[18:] == 255)      # white padding, as prepare pads
    half = plan_tiles(25, 35, 32, 0)
    ds2 = TileDataset(path, half, half.origins(), Geometry(factor=2.0))
    tile, _ = ds2[0]
    assert tile.shape == (32, 32, 3)
    assert abs(float(tile.numpy()[:12, :12].mean()) - float(rgb[:24, :24].mean())) < 8
