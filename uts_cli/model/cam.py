"""The CAM network: a truncated torchvision ResNet with a bias-free 1x1 convolution head.

The backbone is the ResNet stem plus the first ``n_blocks`` residual stages, kept under their
torchvision names (``backbone.conv1``, ``backbone.layer1`` ...) so ImageNet state dicts load by
prefixing keys. A plain ``nn.Sequential`` is used rather than ``create_feature_extractor``: the
truncation is a prefix of the network, and the FX graph would add nothing but tracing time.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from uts_cli.choices import (AGGREGATIONS, ARCHS, CAM_UPSAMPLINGS, INPUT_NORMS, MODES, NORM_GROUPS, NORM_LAYERS,
                             RESNET_WIDTH, width_problem)
from uts_cli.errors import InputDataError, ResourceError, UsageError, first_line

STAGE_CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet50": (256, 512, 1024, 2048)}
# Residual blocks per stage.
STAGE_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# r of the "lse" aggregation, (1/r) log mean exp(r * cam): at r = 2 a cell 1 logit below the top
# gets exp(-2) (0.14) of its gradient weight: the top cells share it, not the arg-max alone.
LSE_SHARPNESS = 2.0
# GroupNorm groups (Wu & He's default; every stage width of both archs divides by it, and
# choices.width_problem keeps --width to multiples of it under --norm group).
GROUPS = NORM_GROUPS
# torchvision's file names for the ImageNet weights (what torch.hub would have cached).
IMAGENET_FILES = {
    "resnet18": ("resnet18-f37072fd.pth",),
    "resnet50": ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"),
}
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UsageError(f"unknown {name} {value!r}", hint=f"use one of: {', '.join(allowed)}")
    return value


class CamNet(nn.Module):
    """ResNet up to ``layer{n_blocks}`` + 1x1 CAM head.

    Args:
        arch: ``"resnet18"`` or ``"resnet50"``.
        n_blocks: residual stages kept (1-4; default 3 as in the method).
        aggregation: ``"max"``, ``"mean"`` or ``"lse"`` (log-mean-exp, sharpness
            ``LSE_SHARPNESS``) pooling to the image logit.
        mode: ``"instance"`` pools the CAM; ``"embedding"`` pools the features, then applies the
            same 1x1 classifier. The CAM is computed in both modes.
        input_norm: ``"unit"`` (pixels / 255, the original) or ``"imagenet"`` (then mean/std).
        upsample: how :meth:`upsample` maps CAM cells to input pixels: ``"exact"`` (cell ``n`` on
            pixel ``stride * n``, the centre of its receptive field) or ``"method"`` (bilinear with
            ``align_corners=True`` over the patch, as the original; off by up to one stride).
        norm: ``"batch"`` (BatchNorm, the method) or ``"group"`` (GroupNorm, ``GROUPS`` groups).
        width: channels of the stem and the first stage (torchvision's: 64); every later stage
            doubles them. Narrower networks train faster from random weights; only width 64 can
            load the ImageNet weights.

    ``forward(x)`` takes the normalised float batch ``(B, 3, H, W)`` from :meth:`prepare_input`
    and returns ``(image_logit (B,), cam_logits (B, 1, h, w))`` at feature resolution.
    """

    def __init__(self, arch: str = "resnet18", n_blocks: int = 3, aggregation: str = "max",
                 mode: str = "instance", input_norm: str = "unit", upsample: str = "exact",
                 norm: str = "batch", width: int = RESNET_WIDTH):
        super().__init__()
        self.arch = _choice("architecture", arch, ARCHS)
        self.aggregation = _choice("aggregation", aggregation, AGGREGATIONS)
        self.mode = _choice("mode", mode, MODES)
        self.input_norm = _choice("input normalisation", input_norm, INPUT_NORMS)
        self.upsample_mode = _choice("CAM upsampling", upsample, CAM_UPSAMPLINGS)
        self.norm = _choice("normalisation layer", norm, NORM_LAYERS)
        if not 1 <= int(n_blocks) <= 4:
            raise UsageError(f"n_blocks must be 1..4 (got {n_blocks})", hint="the method uses 3")
        self.n_blocks = int(n_blocks)
        self.width = check_width(width, self.norm)
        self.backbone = resnet_prefix(arch, self.n_blocks, self.norm, self.width)
        self.out_channels = STAGE_CHANNELS[arch][self.n_blocks - 1] * self.width // RESNET_WIDTH
        self.classifier = nn.Conv2d(self.out_channels, 1, kernel_size=1, bias=False)
        if self.input_norm == "unit":
            scale, shift = [1 / 255.0] * 3, [0.0] * 3
        else:
            scale = [1 / (255.0 * s) for s in IMAGENET_STD]
            shift = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
        # Not persistent: derived from input_norm, so state dicts stay the same for both options.
        self.register_buffer("_scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    @property
    def stride(self) -> int:
        """Input pixels per feature-map cell."""
        return 4 * 2 ** (self.n_blocks - 1)

    def config(self) -> dict:
        """JSON-safe constructor arguments (stored in checkpoints and ``config.json``)."""
        config = {"arch": self.arch, "n_blocks": self.n_blocks, "aggregation": self.aggregation,
                  "mode": self.mode, "input_norm": self.input_norm, "upsample": self.upsample_mode}
        # Absent = the default, so runs saved before these options existed compare equal.
        if self.norm != "batch":
            config["norm"] = self.norm
        if self.width != RESNET_WIDTH:
            config["width"] = self.width
        return config

    @classmethod
    def from_config(cls, config: dict) -> "CamNet":
        """Build a model from :meth:`config` output (unknown keys are ignored)."""
        keys = ("arch", "n_blocks", "aggregation", "mode", "input_norm")
        # Runs saved before the option existed were trained and scored with the original mapping.
        return cls(**{k: config[k] for k in keys if k in config}, upsample=config.get("upsample", "method"),
                   norm=config.get("norm", "batch"), width=config.get("width", RESNET_WIDTH))

    def prepare_input(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Turn pixels into the network input.

        Args:
            images: uint8 ``(B, H, W, 3)`` or float ``(B, 3, H, W)`` with values in 0..255, on the
                model's device.
            channels_last: return NHWC memory format (faster convolutions on CUDA and on CPU).

        Returns:
            A new float32 ``(B, 3, H, W)`` tensor scaled as ``input_norm`` says.
        """
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if images.dtype == torch.uint8:
            b, h, w, c = images.shape
            x = torch.empty((b, c, h, w), dtype=torch.float32, device=images.device, memory_format=fmt)
            x.copy_(images.permute(0, 3, 1, 2))  # dtype and layout change in one pass
        else:
            x = images.to(dtype=torch.float32, memory_format=fmt, copy=True)
        # In place, and no shift pass for "unit": every full-batch pass costs memory bandwidth.
        x.mul_(self._scale)
        if self.input_norm != "unit":
            x.add_(self._shift)
        return x

    def fill_value(self) -> torch.Tensor:
        """White (255) as :meth:`prepare_input` scales it, ``(1, 3, 1, 1)`` (padding colour)."""
        return 255.0 * self._scale + self._shift

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.flatten(2)
        if self.aggregation == "max":
            return flat.amax(dim=2)
        if self.aggregation == "lse":
            # log-mean-exp: between the mean (r -> 0) and the max (r -> inf); every cell near the
            # top shares the gradient, not the arg-max cell alone.
            r = LSE_SHARPNESS
            return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r
        return flat.mean(dim=2)

    @property
    def upsample_stride(self) -> int | None:
        """The ``stride`` argument of :func:`upsample_cam` for this model's mapping (None: the original's)."""
        return self.stride if self.upsample_mode == "exact" else None

    def upsample(self, cam: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
        """CAM maps ``(B, 1, h, w)`` at input resolution ``size``, as ``upsample`` says (see the class)."""
        return upsample_cam(cam, size, stride=self.upsample_stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        cam = self.classifier(features)
        if self.mode == "instance":
            logit = self._pool(cam)[:, 0]
        else:
            pooled = self._pool(features)
            logit = F.linear(pooled, self.classifier.weight.flatten(1))[:, 0]
        return logit, cam


def check_width(width, norm: str) -> int:
    """``width`` as an int, or UsageError when no network can be built with it."""
    problem = width_problem(width, norm)
    if problem is not None:
        raise UsageError(problem[0], hint=problem[1])
    return int(width)


def resnet_prefix(arch: str, n_blocks: int, norm: str, width: int = RESNET_WIDTH) -> nn.Sequential:
    """The ResNet stem and its first ``n_blocks`` stages, under torchvision's module names.

    Width 64 is torchvision's own network (its initialisation, ImageNet state dicts load); other
    widths are built from torchvision's residual blocks with the same layout and initialisation.
    """
    from torchvision import models
    from torchvision.models.resnet import BasicBlock, Bottleneck

    norm_layer = nn.BatchNorm2d if norm == "batch" else (lambda c: nn.GroupNorm(GROUPS, c))
    if width == RESNET_WIDTH:
        resnet = getattr(models, arch)(weights=None, norm_layer=norm_layer)
        parts = [("conv1", resnet.conv1), ("bn1", resnet.bn1), ("relu", resnet.relu), ("maxpool", resnet.maxpool)]
        parts += [(f"layer{i}", getattr(resnet, f"layer{i}")) for i in range(1, n_blocks + 1)]
        return nn.Sequential(OrderedDict(parts))
    block = BasicBlock if arch == "resnet18" else Bottleneck
    parts = [("conv1", nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)),
             ("bn1", norm_layer(width)), ("relu", nn.ReLU(inplace=True)),
             ("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
    channels = width
    for i in range(n_blocks):
        planes, stride = width * 2 ** i, 1 if i == 0 else 2
        out = planes * block.expansion
        down = None
        if stride != 1 or channels != out:
            down = nn.Sequential(nn.Conv2d(channels, out, kernel_size=1, stride=stride, bias=False), norm_layer(out))
        blocks = [block(channels, planes, stride, down, norm_layer=norm_layer)]
        blocks += [block(out, planes, norm_layer=norm_layer) for _ in range(STAGE_BLOCKS[arch][i] - 1)]
        parts.append((f"layer{i + 1}", nn.Sequential(*blocks)))
        channels = out
    stages = nn.Sequential(OrderedDict(parts))
    # torchvision's ResNet initialisation, so a width is the only thing that differs.
    for m in stages.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return stages


def batch_norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model`` (none in a ``--norm group`` network)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def upsample_cam(cam: torch.Tensor, size: int | tuple[int, int], stride: int | None = None) -> torch.Tensor:
    """Bilinear upsampling of CAM maps ``(B, 1, h, w)`` to ``size``.

    Without ``stride``: ``align_corners=True`` over the whole output, as the original method: the
    first cell lands on pixel 0 and the last on pixel ``size - 1``. A ResNet cell ``n`` is centred
    on pixel ``stride * n`` instead (the stem and every stage pad symmetrically), so that mapping
    is off by up to one stride near the far edges (15 px at 128 px with stride 16), a bias that
    moves every detection. With ``stride``: cell ``n`` lands on pixel ``stride * n``, bilinear in
    between, and the pixels past the last cell centre repeat the edge value.
    """
    if isinstance(size, int):
        size = (size, size)
    height, width = size
    if stride is None:
        return F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=True)
    h, w = cam.shape[-2:]
    full_h, full_w = (h - 1) * stride + 1, (w - 1) * stride + 1   # first to last cell centre
    span_h, span_w = min(full_h, height), min(full_w, width)
    up = F.interpolate(cam, size=(full_h, full_w), mode="bilinear", align_corners=True)[..., :span_h, :span_w]
    return F.pad(up, (0, width - span_w, 0, height - span_h), mode="replicate")


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision's cache would hold the ImageNet weights for ``arch`` (the first name)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES[arch][0]


def _find_imagenet_file(arch: str) -> Path:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in IMAGENET_FILES[arch]:
        if (folder / name).is_file():
            return folder / name
    raise ResourceError(
        f"ImageNet weights for {arch} are not in the torch cache: {folder / IMAGENET_FILES[arch][0]} "
        "(uts never downloads)",
        hint=f"download {IMAGENET_URLS[arch]} into {folder}, or pass --weights PATH / --weights none")


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise InputDataError(f"weights file not found: {path}",
                             hint="pass an existing .pt/.pth file, --weights imagenet or --weights none")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise InputDataError(f"cannot load weights from {path}: {type(exc).__name__}: {first_line(exc)}",
                             hint="the file must be a state dict saved with torch.save (tensors only)") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a uts checkpoint
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputDataError(f"{path} does not hold a state dict of tensors",
                             hint="save the weights with torch.save(model.state_dict(), PATH)")
    return obj


def _strip(key: str) -> str:
    for prefix in ("module.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _check_same_norm(state: dict, target: dict, path: Path) -> None:
    """Refuse BatchNorm weights for a GroupNorm backbone and the reverse.

    The two share parameter names (``bn1.weight``...), so the affine parameters would load
    silently, but BatchNorm's scale and shift are fitted to its running statistics, which a
    GroupNorm layer has no use for: the network would start from the wrong features.
    """
    def has_bn(keys) -> bool:  # both dicts' keys are already stripped of "module."/"backbone."
        return any(k.endswith("running_mean") for k in keys)

    in_file, in_model = has_bn(state), has_bn(target)
    if in_file != in_model:
        file_norm, model_norm = ("BatchNorm", "GroupNorm") if in_file else ("GroupNorm", "BatchNorm")
        raise InputDataError(f"{path} holds a {file_norm} backbone, the model uses {model_norm}",
                             hint=f"train with --norm {'batch' if in_file else 'group'} to start from these weights")


def load_backbone_weights(model: CamNet, weights: str | os.PathLike) -> int:
    """Initialise the backbone (and the head, when the file has a matching one).

    Args:
        model: the network to initialise in place.
        weights: ``"none"`` (keep random init), ``"imagenet"`` (torchvision's cached file only;
            nothing is downloaded) or a path to a state dict: a torchvision ResNet, a ``CamNet``
            state dict or a uts checkpoint. Keys beyond the truncated backbone (``layer4``,
            ``fc``) are ignored; every backbone tensor of ``model`` must be present.

    Returns:
        The number of tensors loaded.

    Raises:
        ResourceError: ``"imagenet"`` and the file is not in the torch cache.
        InputDataError: the file is missing, unreadable, or does not fit the model.
    """
    if str(weights) == "none":
        return 0
    if str(weights) == "imagenet":
        path = _find_imagenet_file(model.arch)
    else:
        path = Path(weights)
    state = {_strip(k): v for k, v in _read_state_dict(path).items()}
    target = model.backbone.state_dict()
    # Older torchvision files predate BatchNorm's num_batches_tracked counter; it is not a weight.
    required = [k for k in target if not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in state]
    if len(missing) == len(required):
        raise InputDataError(f"no {model.arch} backbone weights found in {path}",
                             hint=f"expected keys like {next(iter(target))!r}; check --arch and the file")
    _check_same_norm(state, target, path)
    if missing:
        raise InputDataError(
            f"{path} lacks {len(missing)} backbone tensors of {model.arch} with n_blocks={model.n_blocks}"
            f" (first: {missing[0]!r})", hint="use weights of the same architecture and depth")
    present = [k for k in target if k in state]
    bad = [k for k in present if tuple(state[k].shape) != tuple(target[k].shape)]
    if bad:
        k = bad[0]
        raise InputDataError(
            f"{path}: tensor {k!r} has shape {tuple(state[k].shape)}, the model expects "
            f"{tuple(target[k].shape)}", hint="use weights of the same architecture and width (--arch, --width)")
    model.backbone.load_state_dict({k: state[k] for k in present}, strict=False)
    loaded = len(present)
    head = state.get("classifier.weight")
    if head is not None and tuple(head.shape) == tuple(model.classifier.weight.shape):
        with torch.no_grad():
            model.classifier.weight.copy_(head)
        loaded += 1
    return loaded
