"""Models, found by name: every class below is a `--model` choice, and so is any timm architecture.

    python train.py --model BaseModel                  # small CNN, fast on a CPU
    python train.py --model resnet18                   # any name in timm.list_models()
    python train.py --model resnet18 --pretrained_path resnet18.safetensors   # local weights, head replaced

To add a model, define a class here taking `num_classes`; `--model YourClass` then works and the tests
check it automatically.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import utils
from utils import UserError


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BaseModel(nn.Module):
    """Small CNN (six conv-BN-ReLU layers, 0.5M parameters) that trains in seconds per epoch on a CPU."""

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(3, 24, stride=2),
            _conv_bn_relu(24, 48, stride=2),
            _conv_bn_relu(48, 96, stride=2),
            _conv_bn_relu(96, 96),
            _conv_bn_relu(96, 192, stride=2),
            _conv_bn_relu(192, 192),
        )
        # Pool to a 2x2 grid, not to one vector: where a thing is (a mask over or under the nose) is the label.
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(192 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def model_classes() -> dict[str, type]:
    """The model classes defined in this file, by name."""
    return utils.module_classes(sys.modules[__name__], lambda c: issubclass(c, nn.Module))


def check_model_name(name: str) -> None:
    """A `UserError` naming the valid choices unless `name` is a class here or a timm architecture."""
    import timm

    if name in model_classes() or timm.is_model(name):
        return
    extra = ", or any timm architecture (python -c 'import timm; print(timm.list_models())')"
    raise UserError(utils.unknown_name_message("--model", name, model_classes(), extra, more=timm.list_models()))


def build_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    pretrained_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The model `name` (a class in this file, else a timm architecture) with `num_classes` outputs.

    `pretrained` downloads timm's weights (needs a network); `pretrained_path` loads weights from a local file
    (timm .safetensors/.pth/.bin, or one of our checkpoints), re-initialising layers whose shape differs,
    such as a classifier head for another number of classes. kwargs that are None keep the model's defaults.
    """
    check_model_name(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    classes = model_classes()
    if name in classes:
        if pretrained:
            raise UserError(
                f"--model {name} has no published weights: drop --pretrained or pass --pretrained_path FILE"
            )
        model = classes[name](num_classes=num_classes, **utils.filter_kwargs(classes[name], kwargs))
    else:
        import timm

        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        except Exception as e:
            if not pretrained:
                raise
            raise UserError(
                f"could not get pretrained weights for {name} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "without a network, download them elsewhere and pass --pretrained_path FILE"
            ) from None
    if pretrained_path:
        load_pretrained(model, pretrained_path)
    return model


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load matching weights from `path` into `model`; returns the names of the tensors left as initialised."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pretrained_path {path} does not exist: give the path of a local weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--pretrained_path {path} cannot be read as weights ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict", "model_state_dict"):  # our checkpoints and common training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = utils.clean_state_dict(state)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    weights = [k for k, v in own.items() if v.dtype.is_floating_point and not k.endswith("num_batches_tracked")]
    if len(matched) < len(weights) // 2:
        raise UserError(
            f"--pretrained_path {path} does not fit --model: only {len(matched)} of {len(weights)} tensors match "
            "by name and shape (weights of another architecture?)"
        )
    model.load_state_dict(matched, strict=False)
    fresh = [k for k in own if k not in matched]
    print(f"Loaded {len(matched)} tensors from {path}; newly initialised: {', '.join(fresh) or 'none'}")
    return fresh
