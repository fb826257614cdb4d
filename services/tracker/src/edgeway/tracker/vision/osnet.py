"""OSNet x1.0 (Zhou et al., ICCV 2019, "Omni-Scale Feature Learning for Person Re-ID") in torch.

Written from the paper's architecture table so that a torchreid ``osnet_x1_0`` state dict loads
into it with every key matching (module names follow torchreid's checkpoint layout, which is the
file format, e.g. ``conv2.0.conv2b.1.conv1.weight``). Imported only once torch is known to be
there: ``embedding.py`` reports a missing torch before it gets here.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional

_CHANNELS = (64, 256, 384, 512)  # osnet_x1_0, paper Table 1
_FEATURE_DIM = 512


class _ConvBnRelu(nn.Module):
    """conv (no bias) + BatchNorm + optional ReLU: torchreid's ``ConvLayer``/``Conv1x1`` keys."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return functional.relu(y) if self.relu else y


class _LiteConv(nn.Module):
    """Pointwise (linear) then depthwise 3x3, BatchNorm, ReLU: the paper's "Lite 3x3"."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.relu(self.bn(self.conv2(self.conv1(x))))


class _Gate(nn.Module):
    """The unified aggregation gate: a per-channel sigmoid weight from a squeezed descriptor."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(functional.relu(self.fc1(w))))


class _OmniBlock(nn.Module):
    """Four streams of 1-4 Lite 3x3 layers (receptive fields 3..9), gated and summed."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 4
        self.conv1 = _ConvBnRelu(cin, mid, 1)
        self.conv2a = _LiteConv(mid)
        self.conv2b = nn.Sequential(*(_LiteConv(mid) for _ in range(2)))
        self.conv2c = nn.Sequential(*(_LiteConv(mid) for _ in range(3)))
        self.conv2d = nn.Sequential(*(_LiteConv(mid) for _ in range(4)))
        self.gate = _Gate(mid)
        self.conv3 = _ConvBnRelu(mid, cout, 1, relu=False)
        self.downsample = _ConvBnRelu(cin, cout, 1, relu=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        streams = (self.conv2a(h), self.conv2b(h), self.conv2c(h), self.conv2d(h))
        merged = sum((self.gate(s) for s in streams), torch.zeros_like(streams[0]))
        shortcut = x if self.downsample is None else self.downsample(x)
        return functional.relu(self.conv3(merged) + shortcut)


def _stage(cin: int, cout: int, reduce: bool) -> nn.Sequential:
    layers: list[nn.Module] = [_OmniBlock(cin, cout), _OmniBlock(cout, cout)]
    if reduce:  # transition: 1x1 conv then 2x2 average pooling
        layers.append(nn.Sequential(_ConvBnRelu(cout, cout, 1), nn.AvgPool2d(2, stride=2)))
    return nn.Sequential(*layers)


class OSNet(nn.Module):
    """OSNet x1.0 feature extractor: 3 x 256 x 128 person crop in, 512-d vector out."""

    def __init__(self) -> None:
        super().__init__()
        c = _CHANNELS
        self.conv1 = _ConvBnRelu(3, c[0], 7, stride=2)
        self.conv2 = _stage(c[0], c[1], reduce=True)
        self.conv3 = _stage(c[1], c[2], reduce=True)
        self.conv4 = _stage(c[2], c[3], reduce=False)
        self.conv5 = _ConvBnRelu(c[3], c[3], 1)
        self.fc = nn.Sequential(
            nn.Linear(c[3], _FEATURE_DIM), nn.BatchNorm1d(_FEATURE_DIM), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.max_pool2d(self.conv1(x), 3, stride=2, padding=1)
        x = self.conv5(self.conv4(self.conv3(self.conv2(x))))
        v = functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return cast(torch.Tensor, self.fc(v))


def load_torchreid_state(model: OSNet, state: dict[str, torch.Tensor]) -> None:
    """Load a torchreid checkpoint: drop ``module.`` prefixes and the identity classifier
    (it is sized for the training set and unused for features); every other key must match."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    cleaned = {
        k.removeprefix("module."): v
        for k, v in state.items()
        if not k.removeprefix("module.").startswith("classifier.")
    }
    model.load_state_dict(cleaned, strict=True)
