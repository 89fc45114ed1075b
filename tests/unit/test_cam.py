import math

import pytest
import torch

from uts_cli.errors import InputDataError, ResourceError, UsageError
from uts_cli.model import cam as cam_mod
from uts_cli.model.cam import CamNet, load_backbone_weights, upsample_cam

torch.set_num_threads(2)


@pytest.mark.parametrize("arch,n_blocks,channels", [("resnet18", 1, 64), ("resnet18", 3, 256),
                                                    ("resnet50", 1, 256), ("resnet50", 2, 512)])
@pytest.mark.parametrize("mode", ["instance", "embedding"])
@pytest.mark.parametrize("aggregation", ["max", "mean", "lse"])
def test_shapes(arch, n_blocks, channels, mode, aggregation):
    torch.manual_seed(0)
    net = CamNet(arch, n_blocks=n_blocks, aggregation=aggregation, mode=mode).eval()
    assert net.out_channels == channels
    x = net.prepare_input(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
    with torch.no_grad():
        logit, cam = net(x)
    side = 64 // net.stride
    assert logit.shape == (2,) and cam.shape == (2, 1, side, side)
    assert upsample_cam(cam, 64).shape == (2, 1, 64, 64)


def test_pooling_semantics():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    inst_max = CamNet(n_blocks=2, aggregation="max", mode="instance").eval()
    with torch.no_grad():
        logit, cam = inst_max(x)
        torch.testing.assert_close(logit, cam.flatten(1).amax(1))
        # Mean pooling is linear: pooling the CAM or the features gives the same logit.
        inst_mean = CamNet(n_blocks=2, aggregation="mean", mode="instance").eval()
        emb_mean = CamNet(n_blocks=2, aggregation="mean", mode="embedding").eval()
        emb_mean.load_state_dict(inst_mean.state_dict())
        torch.testing.assert_close(inst_mean(x)[0], emb_mean(x)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(inst_mean(x)[0], inst_mean(x)[1].flatten(1).mean(1))
        # Max embedding: classifier applied to max-pooled features, not max of the CAM.
        emb_max = CamNet(n_blocks=2, aggregation="max", mode="embedding").eval()
        feats = emb_max.backbone(x)
        expect = (feats.flatten(2).amax(2) * emb_max.classifier.weight.flatten()).sum(1)
        torch.testing.assert_close(emb_max(x)[0], expect, rtol=1e-4, atol=1e-5)


def test_lse_pooling_lies_between_mean_and_max():
    net = CamNet(n_blocks=1, aggregation="lse")
    cam = torch.randn(4, 1, 6, 6)
    pooled = net._pool(cam)[:, 0]
    flat = cam.flatten(1)
    assert (pooled > flat.mean(1)).all() and (pooled < flat.amax(1)).all()
    # log-mean-exp of a constant map is that constant; one far larger cell pulls it towards the max.
    torch.testing.assert_close(net._pool(torch.full((1, 1, 4, 4), 3.0))[:, 0], torch.tensor([3.0]))
    spike = torch.zeros(1, 1, 4, 4)
    spike[0, 0, 1, 2] = 40.0
    r = cam_mod.LSE_SHARPNESS
    torch.testing.assert_close(net._pool(spike)[:, 0], torch.tensor([40.0 - math.log(16) / r]), rtol=0, atol=1e-4)


def test_upsample_align_corners_keeps_corner_values():
    cam = torch.arange(16.0).view(1, 1, 4, 4)
    up = upsample_cam(cam, (13, 13))
    assert up[0, 0, 0, 0] == 0 and up[0, 0, -1, -1] == 15 and up[0, 0, 0, -1] == 3


def test_upsample_exact_puts_cell_n_on_pixel_stride_n():
    cam = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8).contiguous()
    up = upsample_cam(cam, (128, 128), stride=16)[0, 0, 0]
    assert up.shape == (128,)
    for n in range(8):
        assert up[16 * n] == n
    assert up[8] == 0.5                                  # bilinear between centres
    assert (up[112:] == 7).all()                         # past the last centre: the edge value
    # Non-square output, and a side the cells do not reach exactly (250 px, stride 16, 16 cells).
    assert upsample_cam(torch.zeros(2, 1, 16, 16), (250, 250), stride=16).shape == (2, 1, 250, 250)


@pytest.mark.parametrize("n_blocks", [2, 3])
def test_exact_mapping_follows_the_receptive_field(n_blocks):
    """The gradient of an interior CAM cell is centred where ``exact`` puts the cell, not ``method``."""
    torch.manual_seed(0)
    net = CamNet(n_blocks=n_blocks).eval()
    x = torch.rand(1, 3, 128, 128, requires_grad=True)
    feats = net.backbone(x)
    n = feats.shape[-1] // 2
    feats[0, :, n, n].sum().backward()
    g = x.grad[0].abs().sum(0).sum(1)
    centre = float((g * torch.arange(128.0)).sum() / g.sum())
    exact, method = net.stride * n, n * 127 / (feats.shape[-1] - 1)
    assert abs(centre - exact) < 2.0 < abs(centre - method)


def test_old_configs_keep_the_original_upsampling():
    net = CamNet(n_blocks=3)
    assert net.upsample_mode == "exact" and net.config()["upsample"] == "exact"
    old = {k: v for k, v in net.config().items() if k != "upsample"}
    assert CamNet.from_config(old).upsample_mode == "method"
    cam = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(CamNet.from_config(old).upsample(cam, 128), upsample_cam(cam, 128))
    torch.testing.assert_close(net.upsample(cam, 128), upsample_cam(cam, 128, stride=16))
    with pytest.raises(UsageError):
        CamNet(upsample="nearest")


def test_group_norm_network_and_old_configs_keep_batch_norm():
    net = CamNet(n_blocks=3, norm="group")
    norms = [m for m in net.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))]
    assert norms and all(isinstance(m, torch.nn.GroupNorm) and m.num_groups == cam_mod.GROUPS for m in norms)
    assert CamNet.from_config(net.config()).norm == "group"
    logit, cam = net(torch.rand(2, 3, 64, 64))
    assert logit.shape == (2,) and cam.shape == (2, 1, 4, 4)
    # "norm" is only written for GroupNorm, so configs and checkpoints saved before it compare equal.
    plain = CamNet(n_blocks=3)
    assert "norm" not in plain.config() and CamNet.from_config(plain.config()).norm == "batch"
    with pytest.raises(UsageError):
        CamNet(norm="layer")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_narrow_network_has_the_layout_of_torchvisions(arch):
    wide, narrow = CamNet(arch=arch, n_blocks=3), CamNet(arch=arch, n_blocks=3, width=32)
    # Same module names and tensor ranks, every channel count halved: a quarter of the weights.
    wide_state, narrow_state = wide.backbone.state_dict(), narrow.backbone.state_dict()
    assert list(wide_state) == list(narrow_state)
    assert narrow.out_channels * 2 == wide.out_channels == cam_mod.STAGE_CHANNELS[arch][2]
    for key, t in narrow_state.items():
        if t.ndim == 4:  # conv weights: input channels halve too, except the stem's RGB
            assert t.shape[0] * 2 == wide_state[key].shape[0] and t.shape[2:] == wide_state[key].shape[2:]
    logit, cam = narrow(torch.rand(2, 3, 64, 64))
    assert logit.shape == (2,) and cam.shape == (2, 1, 4, 4)
    # Written only when not 64, so configs saved before the option compare equal.
    assert "width" not in wide.config() and narrow.config()["width"] == 32
    again = CamNet.from_config(narrow.config())
    again.load_state_dict(narrow.state_dict())
    assert again.width == 32 and CamNet.from_config(wide.config()).width == 64


def test_width_64_is_torchvisions_network_draw_for_draw():
    # Runs saved before the option must train the same from the same seed.
    from torchvision import models

    torch.manual_seed(3)
    ours = CamNet(n_blocks=2).backbone.state_dict()
    torch.manual_seed(3)
    theirs = models.resnet18(weights=None).state_dict()
    for key, t in ours.items():
        torch.testing.assert_close(t, theirs[key])


@pytest.mark.parametrize("width, norm", [(12, "batch"), (0, "batch"), (48, "group")])
def test_unbuildable_widths_are_refused(width, norm):
    with pytest.raises(UsageError) as err:
        CamNet(n_blocks=1, width=width, norm=norm)
    assert "--width" in err.value.hint


def test_weights_of_another_width_are_refused(tmp_path):
    torch.save(CamNet(n_blocks=2).state_dict(), tmp_path / "w64.pt")
    with pytest.raises(InputDataError, match="shape"):
        load_backbone_weights(CamNet(n_blocks=2, width=32), tmp_path / "w64.pt")


def test_prepare_input_scaling():
    img = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    unit = CamNet(n_blocks=1, input_norm="unit")
    torch.testing.assert_close(unit.prepare_input(img), img.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(unit.prepare_input(img.permute(0, 3, 1, 2).float()), unit.prepare_input(img))
    imnet = CamNet(n_blocks=1, input_norm="imagenet")
    mean = torch.tensor(cam_mod.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cam_mod.IMAGENET_STD).view(1, 3, 1, 1)
    expect = (img.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(imnet.prepare_input(img), expect, rtol=1e-5, atol=1e-5)
    assert imnet.prepare_input(img, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_config_round_trip_and_bad_options():
    net = CamNet("resnet18", n_blocks=2, aggregation="mean", mode="embedding", input_norm="imagenet")
    assert CamNet.from_config(net.config()).config() == net.config()
    with pytest.raises(UsageError):
        CamNet("vgg16")
    with pytest.raises(UsageError):
        CamNet(n_blocks=5)
    with pytest.raises(UsageError):
        CamNet(aggregation="softmax")


def test_imagenet_weights_absent_is_resource_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ResourceError) as err:
        load_backbone_weights(CamNet(n_blocks=1), "imagenet")
    assert err.value.exit_code == 4
    assert "resnet18-f37072fd.pth" in err.value.message
    assert "--weights PATH" in err.value.hint and "--weights none" in err.value.hint


def test_imagenet_weights_from_cache(tmp_path, monkeypatch):
    from torchvision.models import resnet18

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(1)
    ref = resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(ref.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    net = CamNet(n_blocks=2)
    n = load_backbone_weights(net, "imagenet")
    assert n == len(net.backbone.state_dict())
    torch.testing.assert_close(net.backbone.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)


def test_weights_path_round_trip(tmp_path):
    torch.manual_seed(0)
    src = CamNet(n_blocks=2).eval()
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = CamNet(n_blocks=2).eval()
    assert load_backbone_weights(dst, path) == len(src.state_dict())  # backbone + head
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x)[1], src(x)[1])
    # A uts checkpoint holding the state dict under "model" loads too.
    torch.save({"format": "uts-checkpoint", "model": src.state_dict()}, tmp_path / "ck.pt")
    assert load_backbone_weights(CamNet(n_blocks=2), tmp_path / "ck.pt") > 0
    assert load_backbone_weights(CamNet(n_blocks=2), "none") == 0


def test_weights_path_mismatch_errors(tmp_path):
    torch.save(CamNet("resnet50", n_blocks=1).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(InputDataError, match="shape"):
        load_backbone_weights(CamNet("resnet18", n_blocks=1), tmp_path / "r50.pt")
    torch.save(CamNet(n_blocks=1).state_dict(), tmp_path / "shallow.pt")
    with pytest.raises(InputDataError, match="lacks"):
        load_backbone_weights(CamNet(n_blocks=2), tmp_path / "shallow.pt")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(InputDataError, match="no resnet18 backbone"):
        load_backbone_weights(CamNet(n_blocks=1), tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputDataError, match="cannot load"):
        load_backbone_weights(CamNet(n_blocks=1), tmp_path / "junk.pt")
    with pytest.raises(InputDataError, match="not found"):
        load_backbone_weights(CamNet(n_blocks=1), tmp_path / "missing.pt")


def test_weights_of_the_other_norm_layer_are_refused(tmp_path):
    # BatchNorm and GroupNorm share parameter names; loading one into the other must not pass silently.
    torch.save(CamNet(n_blocks=2).state_dict(), tmp_path / "bn.pt")
    torch.save(CamNet(n_blocks=2, norm="group").state_dict(), tmp_path / "gn.pt")
    with pytest.raises(InputDataError, match="holds a BatchNorm backbone, the model uses GroupNorm"):
        load_backbone_weights(CamNet(n_blocks=2, norm="group"), tmp_path / "bn.pt")
    with pytest.raises(InputDataError, match="holds a GroupNorm backbone, the model uses BatchNorm"):
        load_backbone_weights(CamNet(n_blocks=2), tmp_path / "gn.pt")
    assert load_backbone_weights(CamNet(n_blocks=2, norm="group"), tmp_path / "gn.pt") > 0
