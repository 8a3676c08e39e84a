"""Where a model looks: Grad-CAM maps (the grad-cam package) for any model of model.py or timm, with the target
layer chosen automatically, and figures of each image beside its map.

    python train.py                       # worst_val.png: the highest-loss validation images beside their maps
    python runs.py --cam model/exp        # model/exp/cam/: per class, images the run gets right and wrong

The target layer is the last feature map before pooling: for a timm model the last entry of its `feature_info`
(ViT-like token outputs use that block's `norm1`, reshaped to the patch grid, as grad-cam's docs do); for any
other model (BaseModel, a model from a file) the last module whose output is a 4-D map larger than 1x1 that is
not a pooling layer. A multi-head model's backbone is searched the same way, and its map is for the task that
decides the class: the first task where the prediction differs from the truth, else its least confident task.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import utils

POOLING = (
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
)


class NoCamLayer(Exception):
    """The model has no layer whose output is a spatial feature map (an MLP, say): no map can be drawn."""


@dataclass
class CamLayer:
    """The layer Grad-CAM reads, its name in the model, and how its output becomes an NCHW map (None: it is one)."""

    module: nn.Module
    name: str
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None


def output_shapes(model: nn.Module, size: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """{module name: output shape} of one eval-mode forward pass of a (1, 3, H, W) input, in the order the modules
    finish (a container after its children). Only tensor outputs are recorded."""
    shapes: dict[str, tuple[int, ...]] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            shapes[names[module]] = tuple(output.shape)

    handles = [m.register_forward_hook(record) for m in names]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


def token_grid(tokens: int, size: Sequence[int], reduction: int | None, prefix: int | None) -> tuple[int, int, int]:
    """(prefix tokens, grid height, grid width) of a ViT-like (N, tokens, C) output of an (H, W) input."""
    candidates = [prefix] if prefix is not None else [0, 1, 2, 4, 5, 8]
    for p in candidates:
        n = tokens - p
        if reduction and (size[0] // reduction) * (size[1] // reduction) == n:
            return p, size[0] // reduction, size[1] // reduction
        side = math.isqrt(n) if n > 0 else 0
        if side * side == n and n > 0:
            return p, side, side
    raise NoCamLayer(f"its {tokens} tokens do not form a grid of patches")


def find_layer(model: nn.Module, size: Sequence[int]) -> CamLayer:
    """The layer Grad-CAM reads for `model` at input size `size` (H, W); `NoCamLayer` saying why when none fits."""
    model = utils.unwrap_model(model)
    search, prefix = (model.backbone, "backbone.") if isinstance(getattr(model, "backbone", None), nn.Module) else (
        model, "")  # fmt: skip
    shapes = output_shapes(model, size)
    info = getattr(search, "feature_info", None)
    if isinstance(info, Sequence) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        last = info[-1]
        name = prefix + last["module"]
        shape = shapes.get(name)
        channels = last.get("num_chs")
        if shape is not None and len(shape) == 4 and shape[1] == channels:
            return CamLayer(model.get_submodule(name), name)
        if shape is not None and len(shape) == 4 and shape[3] == channels:  # NHWC stages (Swin)
            return CamLayer(model.get_submodule(name), name, lambda x: x.permute(0, 3, 1, 2))
        if shape is not None and len(shape) == 3:  # tokens (ViT): the block's norm1, as grad-cam's docs advise
            block = model.get_submodule(name)
            if isinstance(getattr(block, "norm1", None), nn.Module):
                name, block = f"{name}.norm1", block.norm1
            skip, h, w = token_grid(shape[1], size, last.get("reduction"), getattr(search, "num_prefix_tokens", None))

            def tokens_to_map(x: torch.Tensor, skip: int = skip, h: int = h, w: int = w) -> torch.Tensor:
                return x[:, skip:].reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)

            return CamLayer(block, name, tokens_to_map)
    maps = [n for n, s in shapes.items() if n.startswith(prefix) and n and len(s) == 4 and s[2] * s[3] > 1
            and not isinstance(model.get_submodule(n), POOLING)]  # fmt: skip
    if not maps:
        raise NoCamLayer(f"no layer of {type(model).__name__} outputs a spatial feature map (N, C, H, W)")
    return CamLayer(model.get_submodule(maps[-1]), maps[-1])


class ClassLogits(nn.Module):
    """A model whose forward returns (N, num_classes) class scores (its `class_logits` applied when it has one)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convert = getattr(self.model, "class_logits", None)
        outputs = self.model(x)
        return convert(outputs) if convert is not None else outputs


@dataclass
class Maps:
    """Grad-CAM maps (N, H, W) in [0, 1] at the input's size, and what each map is for (a class, or a task's value)."""

    maps: np.ndarray
    targets: list[str]


class Explainer:
    """Grad-CAM for one model: `explain(images, preds, truths)` maps each image for its predicted class (for a
    multi-head model, for the task that decides it). Works on a copy in eval mode, so the model being trained, its
    gradients and its mode are untouched."""

    def __init__(self, model: nn.Module, size: Sequence[int], class_names: Sequence[str]) -> None:
        model = copy.deepcopy(utils.unwrap_model(model)).float().eval()
        for p in model.parameters():
            p.requires_grad_(True)
        self.layer = find_layer(model, size)
        self.class_names = list(class_names)
        tasks = getattr(model, "tasks", None)
        self.tasks = tuple(tasks) if tasks is not None and hasattr(model, "heads") else None
        self.task_names = list(getattr(model, "task_names", [])) or [f"task{k}" for k in range(len(self.tasks or []))]
        self.model = model if self.tasks is not None else ClassLogits(model)

    def targets(self, images: torch.Tensor, preds: Sequence[int], truths: Sequence[int] | None) -> tuple[list, list]:
        """(grad-cam targets, their labels): the predicted class's score; for a multi-head model the logit of the
        deciding task's predicted value."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if self.tasks is None:
            return [ClassifierOutputTarget(int(p)) for p in preds], [f"pred {self.class_names[p]}" for p in preds]
        with torch.no_grad():
            outputs = self.model(images)
        offsets = np.cumsum((0, *self.tasks))
        chosen, labels = [], []
        for i, pred in enumerate(preds):
            values = np.unravel_index(int(pred), self.tasks)
            wrong = [] if truths is None else [k for k, v in enumerate(np.unravel_index(int(truths[i]), self.tasks))
                                               if v != values[k]]  # fmt: skip
            if wrong:
                task = wrong[0]
            else:
                parts = [outputs[i, offsets[k] : offsets[k + 1]] for k in range(len(values))]
                task = int(np.argmin([part.softmax(0).max().item() for part in parts]))
            chosen.append(ClassifierOutputTarget(int(offsets[task] + values[task])))
            parts = self.class_names[pred].split("/")
            value = parts[task] if len(parts) == len(self.tasks) else str(values[task])
            labels.append(f"{self.task_names[task]} {value}")
        return chosen, labels

    def explain(self, images: torch.Tensor, preds: Sequence[int], truths: Sequence[int] | None = None) -> Maps:
        """Maps of normalized NCHW `images` (the network's input) for their predicted classes `preds`."""
        from pytorch_grad_cam import GradCAM

        device = next(self.model.parameters()).device
        images = images.to(device, torch.float32)
        targets, labels = self.targets(images, preds, truths)
        with GradCAM(model=self.model, target_layers=[self.layer.module], reshape_transform=self.layer.reshape) as cam:
            maps = cam(input_tensor=images, targets=targets)
        return Maps(np.asarray(maps, dtype=np.float32), labels)


def overlay(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """NHWC uint8 images with their (N, H, W) maps in [0, 1] laid over them as a heat map (grad-cam's
    show_cam_on_image: jet colours, half and half)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return np.stack([show_cam_on_image(img.astype(np.float32) / 255, m, use_rgb=True, image_weight=0.5)
                     for img, m in zip(images, maps, strict=True)])  # fmt: skip


def enlarge(image: np.ndarray, side: int = 208) -> np.ndarray:
    """A small HWC uint8 image scaled up so that its longer side is `side` (a 64x48 input's map stays readable)."""
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) >= side:
        return image
    scale = side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BILINEAR))


def pairs_grid(images: np.ndarray, maps: Maps, titles: Sequence[str], colors: Sequence[str], pairs_per_row: int = 4
               ) -> np.ndarray:  # fmt: skip
    """Each NHWC uint8 image under its title, beside its Grad-CAM overlay titled with what the map is for."""
    shown = overlay(images, maps.maps)
    cells = [enlarge(x) for pair in zip(images, shown, strict=True) for x in pair]
    cell_titles = [t for title, what in zip(titles, maps.targets, strict=True) for t in (title, f"Grad-CAM\n{what}")]
    cell_colors = [c for color in colors for c in (color, "black")]
    return utils.image_grid(cells, cell_titles, ncols=2 * pairs_per_row, colors=cell_colors)


class RunCam:
    """Grad-CAM in a run's reports (worst_val.png with each best.pth): maps for the weights best.pth takes. The first
    time no map can be drawn (no fitting layer, or grad-cam fails) prints one warning, and the run's figures go on
    without maps: a diagnostic figure never ends a run."""

    def __init__(self, size: Sequence[int], class_names: Sequence[str]) -> None:
        self.size, self.class_names, self.off = tuple(size), list(class_names), False

    def __call__(self, weights: nn.Module, images: torch.Tensor, preds: Sequence[int], truths: Sequence[int]
                 ) -> Maps | None:  # fmt: skip
        if self.off:
            return None
        try:
            return Explainer(weights, self.size, self.class_names).explain(images, preds, truths)
        except Exception as e:  # noqa: BLE001 (any model of the user's: warn and draw the figure without maps)
            self.off = True
            why = str(e) if isinstance(e, NoCamLayer) else f"grad-cam failed: {utils.reason(e)}"
            print(f"warning: no Grad-CAM maps for this run ({utils.one_line(why)}); worst_val.png shows the images "
                  "alone", file=sys.stderr)  # fmt: skip
            return None
