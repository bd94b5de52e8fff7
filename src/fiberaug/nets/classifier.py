"""A small CNN classifier: the downstream model that the utility task trains to ask whether generated images help."""

from __future__ import annotations

from torch import nn


class SmallClassifier(nn.Sequential):
    """Three 3×3 conv blocks (32, 64, 128 channels, BatchNorm, ReLU, 2×2 max-pooling but the last), global
    average pooling and a linear layer: enough to learn from a few images per class, quick on a CPU, and
    indifferent to the image size."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        layers: list[nn.Module] = []
        in_ch = channels
        for i, out_ch in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i < 2 else []
            in_ch = out_ch
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))
