"""BaseModel's width, depth and dropout as `--backbone` files, for issue 23's recipe experiments (README, Results):

    .venv/bin/python bench/bench_recipe.py --data ../shared/data/maskdev --seeds 1 -- \
        --backbone bench/recipe_backbones.py:Wide

Each class is a backbone in timm's convention (built with num_classes=0, it returns pooled features and says how
many in `num_features`), so MultiHeadModel puts its mask, gender and age heads on it. `Plain` has BaseModel's
layers exactly; the others change one thing each.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class Plain(nn.Module):
    """BaseModel's six conv-BN-ReLU layers, 2x2 average pool and dropout, ending at the pooled features."""

    widths: tuple[int, ...] = (24, 48, 96, 96, 192, 192)
    strides: tuple[int, ...] = (2, 2, 2, 1, 2, 1)
    dropout = 0.2

    def __init__(self, num_classes: int = 0) -> None:
        super().__init__()
        assert num_classes == 0, "a backbone: MultiHeadModel adds the heads"
        layers, c_in = [], 3
        for width, stride in zip(self.widths, self.strides, strict=True):
            layers.append(conv_bn_relu(c_in, width, stride))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(self.dropout)
        self.num_features = c_in * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.pool(self.features(x)).flatten(1))


class Wide(Plain):
    """4/3 of the channels (about 1.8x the compute)."""

    widths = (32, 64, 128, 128, 256, 256)


class Narrow(Plain):
    """2/3 of the channels (about 0.45x the compute)."""

    widths = (16, 32, 64, 64, 128, 128)


class Deep(Plain):
    """One more 3x3 layer at each of the two deepest resolutions (about 1.6x the compute)."""

    widths = (24, 48, 96, 96, 96, 192, 192, 192)
    strides = (2, 2, 2, 1, 1, 2, 1, 1)


class Dropout5(Plain):
    """BaseModel's layers with dropout 0.5 on the pooled features."""

    dropout = 0.5
