"""The architectures a cohort can mix, by (case-insensitive) name:

- ``resnet20/32/44/56/110``: CIFAR ResNets of He et al. 2016 (section 4.2): three stages of 16/32/64
  channels, ``n`` basic blocks each (depth = 6n + 2), parameter-free "option A" shortcuts;
- ``wrn<depth>_<width>``: Wide ResNets of Zagoruyko & Komodakis 2016 (pre-activation blocks, 16/32/64 x
  width channels, depth = 6n + 4), e.g. ``wrn28_10``, ``wrn16_4``, ``wrn28_2``;
- ``mobilenet``: MobileNet v1 (Howard et al. 2017) with a stride-1 stem for 32x32 inputs;
- ``mobilenetv2``: torchvision's MobileNetV2 with a stride-1 stem for 32x32 inputs;
- ``torchvision.<name>``: any torchvision classification builder (``image_size`` >= 64), with
  ``num_classes`` from the data; torchvision's weights when ``pretrained`` (classifier replaced);
- ``timm.<name>``: any timm model (``pip install 'dml-dist[timm]'``), ``num_classes`` from the data, timm's
  weights from its cache when ``pretrained``.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DMLError


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = _PadShortcut(planes - in_planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                # Zero-init the last BN of each block (Goyal et al. 2017): every block starts as the
                # identity, which keeps lr=0.1 from the first step stable on small data.
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class WideBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv twice); a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, bias=False) if stride != 1 or in_planes != planes else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return o + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6 or depth < 10 or width < 1:
            raise DMLError(f"Wide ResNet depth must be 6n+4 (>= 10) and width >= 1, got wrn{depth}_{width}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers, in_planes = [], 16
        for planes, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for i in range(n):
                layers.append(WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MobileNetV1(nn.Module):
    """Depthwise-separable stack of MobileNet v1; stride 1 in the stem for 32x32 inputs."""

    CFG = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]
        c = 32
        for item in self.CFG:
            out, stride = item if isinstance(item, tuple) else (item, 1)
            layers += [
                nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, out, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            c = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _mobilenet_v2(num_classes: int) -> nn.Module:
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    model.features[0][0].stride = (1, 1)  # 32x32 inputs: keep the stem's resolution
    return model


def _torchvision(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as e:  # no network: URLError, OSError, ...
        raise DMLError(
            f"pretrained weights for torchvision.{name} are not in torchvision's cache "
            f"({torch.hub.get_dir()}/checkpoints) and could not be downloaded ({type(e).__name__}); "
            f"download them where there is a network, or set pretrained: false"
        ) from None
    # A new classifier for this data's classes: the last Linear layer.
    parent, attr, last = None, None, None
    for _, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, attr, last = module, child_name, child
    if last is not None and last.out_features != num_classes:
        setattr(parent, attr, nn.Linear(last.in_features, num_classes))
    return model


TIMM_MISSING = "timm is not installed; pip install 'dml-dist[timm]' (or pip install timm)"


def _timm():
    try:
        import timm
    except ImportError:
        raise DMLError(f"model timm.<name>: {TIMM_MISSING}") from None
    return timm


def _timm_model(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    timm = _timm()
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except Exception as e:  # no network and not in the cache: OSError, LocalEntryNotFoundError, ...
        if not pretrained:
            raise
        raise DMLError(
            f"pretrained weights for timm.{name} are not in timm's cache (the Hugging Face hub cache) and could "
            f"not be downloaded ({type(e).__name__}); download them where there is a network, or set pretrained: false"
        ) from None


def pretrained_meta(name: str) -> dict | None:
    """What ``name``'s pretrained weights say about themselves, from their own metadata (torchvision's weights'
    transforms and categories, timm's ``pretrained_cfg``): ``mean`` and ``std`` of their inputs (None when not
    given) and ``classes``, their classifier's class count; None for models without pretrained weights."""
    if name.startswith("torchvision."):
        import torchvision

        weights = torchvision.models.get_model_weights(name.split(".", 1)[1]).DEFAULT
        preset = weights.transforms()
        mean, std, classes = preset.mean, preset.std, len(weights.meta["categories"])
    elif name.startswith("timm."):
        cfg = _timm().models.get_pretrained_cfg(name.split(".", 1)[1])
        if cfg is None:
            return None
        mean, std, classes = getattr(cfg, "mean", None), getattr(cfg, "std", None), getattr(cfg, "num_classes", None)
    else:
        return None
    if mean is None or std is None:
        return {"mean": None, "std": None, "classes": classes}
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "classes": classes}


MODEL_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
EXAMPLE_NAMES = (
    *MODEL_DEPTHS, "wrn16_4", "wrn28_2", "wrn28_10", "mobilenet", "mobilenetv2", "torchvision.resnet18", "timm.resnet18"
)  # fmt: skip


def available_models() -> list[str]:
    return list(EXAMPLE_NAMES)


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def canonical_model_name(name: str) -> str:
    """'ResNet32' -> 'resnet32', 'WRN-28-10' -> 'wrn28_10', 'torchvision.ResNet18' -> 'torchvision.resnet18';
    unknown names raise a DMLError listing the valid ones."""
    raw = str(name).strip()
    if raw.lower().startswith("torchvision."):
        tv = raw.split(".", 1)[1].lower()
        if tv not in _torchvision_names():
            raise DMLError(
                f"unknown model {name!r}: torchvision has no classification model {tv!r} "
                f"(see torchvision.models.list_models())"
            )
        return f"torchvision.{tv}"
    if raw.lower().startswith("timm."):
        name = raw.split(".", 1)[1]
        if not _timm().is_model(name):
            raise DMLError(f"unknown model {name!r}: timm has no model {name!r} (see timm.list_models())")
        return f"timm.{name}"
    key = raw.lower().replace("-", "_")
    wrn = re.fullmatch(r"wrn_?(\d+)_(\d+)", key)
    if wrn:
        return f"wrn{int(wrn.group(1))}_{int(wrn.group(2))}"
    key = key.replace("_", "")
    if key in MODEL_DEPTHS or key in ("mobilenet", "mobilenetv2"):
        return key
    raise DMLError(
        f"unknown model {name!r}; choose one of: {', '.join(MODEL_DEPTHS)}, wrn<depth>_<width> "
        f"(e.g. wrn28_10), mobilenet, mobilenetv2, torchvision.<name> (e.g. torchvision.resnet18), "
        f"timm.<name> (e.g. timm.resnet18)"
    )


def build_model(name: str, num_classes: int, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """Build a model by (case-insensitive) name, e.g. ``build_model('ResNet32', 10)``."""
    if int(num_classes) < 1:
        raise DMLError(f"num_classes must be >= 1, got {num_classes}")
    key, n = canonical_model_name(name), int(num_classes)
    if pretrained and not key.startswith(("torchvision.", "timm.")):
        raise DMLError(
            f"pretrained weights exist only for torchvision.<name> and timm.<name> models, not {key}; "
            f"set pretrained: false, or start it from a checkpoint with init_from"
        )
    if key.startswith("timm."):
        return _timm_model(key.split(".", 1)[1], n, pretrained)
    if key.startswith("torchvision."):
        if image_size < 64:
            raise DMLError(
                f"{key} expects images of at least 64x64 (image_size={image_size}); set image_size: 64 "
                f"or more, or use a CIFAR model (resnet20, wrn28_10, mobilenet, ...)"
            )
        return _torchvision(key.split(".", 1)[1], n, pretrained)
    if key.startswith("wrn"):
        depth, width = (int(v) for v in key[3:].split("_"))
        return WideResNet(depth, width, n)
    if key == "mobilenet":
        return MobileNetV1(n)
    if key == "mobilenetv2":
        return _mobilenet_v2(n)
    return CifarResNet(MODEL_DEPTHS[key], n)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def channels_last_choice(setting, model: nn.Module, device: torch.device, amp: str) -> tuple[bool, str]:
    """``channels_last`` as it runs, and why. Never on CPU (its conv kernels would change the results).
    ``auto``: on for a convolutional model (most of its weights in 2-D convolutions: not a ViT, whose patch
    embedding is its only one) under AMP on CUDA, where tensor-core convolutions take NHWC."""
    if device.type != "cuda":
        return False, "off on CPU"
    if setting != "auto":
        return bool(setting), f"channels_last={str(setting).lower()}"
    total = sum(p.numel() for p in model.parameters())
    conv = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    if amp == "off":
        return False, "auto: off without AMP"
    if 2 * conv <= total:
        return False, "auto: off, not a convolutional model"
    return True, f"auto: on, a convolutional model under {amp} on CUDA"
