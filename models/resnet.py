"""ResNet-18/34/50/101, written like torchvision's so its ImageNet checkpoints load strictly.

torchvision cannot be installed on the trainer, but its published weights are the standard
ResNet starting point. Module names and the order of layers therefore follow torchvision's
`models/resnet.py` exactly (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0, fc, ...);
`tests/test_nets.py` rebuilds the key list independently to catch any drift.
"""

from __future__ import annotations

import socket
from urllib.error import URLError

import torch
from torch import Tensor, nn

from models.weights import WeightsError, load_state_dict, one_line

# torchvision's IMAGENET1K_V1 weights; the hex suffix is the sha256 prefix that
# torch.hub checks (check_hash=True) before anything is unpickled.
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}

# The normalisation these checkpoints were trained with, RGB, in 0..255 pixel units.
INPUT_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
INPUT_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation: a blackholed network fails instead of hanging


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's "ResNet v1.5"), 1x1 expand (ResNet-50/101)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The ResNet trunk and classifier; `forward_features` gives the pooled embedding."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():  # torchvision's initialisation, for training from scratch
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] -> [N, num_features] globally pooled features, before `fc`."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))

    def stages(self) -> list[list[nn.Module]]:
        """The trunk in input order, a stage at a time (the stem first), so training can
        freeze a leading part of it."""
        return [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3],
                [self.layer4]]


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def resnet101(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes)


def load_imagenet(model: ResNet, arch: str) -> None:
    """Load torchvision's ImageNet weights for `arch` (cached under $TORCH_HOME/hub).

    The model must have the 1000-class head; replace `model.fc` afterwards to fine-tune.
    """
    if arch not in IMAGENET_URLS:
        raise ValueError(f"no ImageNet weights for {arch!r}; known: {', '.join(IMAGENET_URLS)}")
    url = IMAGENET_URLS[arch]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            url, progress=True, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as exc:  # URLError, timeouts, hash mismatch, a corrupt cached file
        reason = one_line(exc.reason if isinstance(exc, URLError) else exc)
        raise WeightsError(
            f"cannot download ImageNet weights for {arch} from {url}: {reason}; "
            f"pass --weights PATH to a local checkpoint"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    load_state_dict(model, state_dict, url)
