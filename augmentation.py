"""Augmentation presets, chosen by name with `--augmentation`, and the custom transforms they use.

    python train.py --augmentation CustomAugmentation
    python -c "import augmentation as A; print(A.BaseAugmentation((128, 96), (0.5,) * 3, (0.2,) * 3).eval_transform)"

To add a preset, define a class here whose name ends in `Augmentation`; it is then a choice and tested.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2

import utils


# Each preset gives `train_transform` (random) and `eval_transform` (deterministic, used by
# validation and inference), both PIL image -> normalized CHW float tensor of size `resize` = (H, W), and
# `load_size`, the smallest (H, W) an image must be decoded at for them (see `load_image`).
class AddGaussianNoise:
    """Add N(mean, std) noise to a tensor (after normalization, so `std` is in units of the data's std)."""

    batchwise = True  # on a batch it draws independent noise per image, as it would image by image

    def __init__(self, mean: float = 0.0, std: float = 0.05) -> None:
        self.mean, self.std = mean, std

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + torch.randn_like(tensor) * self.std + self.mean

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class DeviceConstant:
    """A constant tensor copied once to each device it is used on: a host-to-device copy every batch waits on
    the host and stalls the GPU's queue. Pickled (to loader workers) without its device copies."""

    def __init__(self, values: Any, shape: Sequence[int]) -> None:
        self.tensor, self.copies = torch.tensor(values, dtype=torch.float32).view(*shape), {}

    def to(self, device: torch.device) -> torch.Tensor:
        copy = self.copies.get(device)
        if copy is None:
            copy = self.copies[device] = self.tensor.to(device)
        return copy

    def __getstate__(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "copies": {}}


GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma


def gray(x: torch.Tensor) -> torch.Tensor:
    """The gray image (N, 1, H, W) of float RGB images: one pass over the channels, no (N, 3, H, W) temporary."""
    red, green, blue = GRAY_WEIGHTS
    return torch.add(x[:, 0:1], x[:, 1:2], alpha=green / red).add_(x[:, 2:3], alpha=blue / red).mul_(red)


class ToNormalizedTensor:
    """ToTensor then Normalize in one step: RGB PIL image -> CHW float32 (x / 255 - mean) / std. Several times
    cheaper than the two (one pass over the pixels, no intermediate tensor), the same values up to rounding."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale = DeviceConstant([1 / (255 * s) for s in self.std], (3, 1, 1))
        self.shift = DeviceConstant([m / s for m, s in zip(self.mean, self.std, strict=True)], (3, 1, 1))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.on_batch(to_uint8_tensor(image))

    def on_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same for uint8 CHW or NCHW tensors, on whatever device they are: the same values as image by
        image (one multiply and one subtract per value, in the same order)."""
        x = pixels.to(torch.float32, memory_format=torch.contiguous_format)
        return x.mul_(self.scale.to(x.device)).sub_(self.shift.to(x.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class DeviceSteps:
    """What `split_for_device` leaves to the training device: normalization, then batch-safe tensor steps."""

    def __init__(self, normalize: ToNormalizedTensor, steps: Sequence[Any]) -> None:
        self.normalize, self.steps = normalize, list(steps)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize.on_batch(images)
        for step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, [self.normalize, *self.steps]))})"


def split_for_device(transform: Any) -> tuple[Any, DeviceSteps | None]:
    """(loader transform, device steps) of a preset's transform.

    When it is a Compose ending in ToNormalizedTensor, followed only by steps marked `batchwise` (random per
    image even on a batch, like AddGaussianNoise), the loader workers stop before the normalization and hand
    over uint8 pixels (4x fewer bytes than float32), and the returned DeviceSteps normalizes whole batches on
    the device: the same tensors for a quarter of the hand-over. Any other transform is kept whole (None):
    a step such as RandomErasing would erase the same box in every image of a batch.
    """
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, transforms.Compose) or steps is None:
        return transform, None
    for k, step in enumerate(steps):
        if isinstance(step, ToNormalizedTensor):
            rest = steps[k + 1 :]
            if not all(getattr(s, "batchwise", False) for s in rest):
                break
            return transforms.Compose([*steps[:k], to_uint8_tensor]), DeviceSteps(step, rest)
    return transform, None


def passes_pixels_through(transform: Any, size: Sequence[int]) -> bool:
    """True when `transform` returns an image of `size` (H, W) as its own pixels in a CHW uint8 tensor:
    to_uint8_tensor, after at most Resizes to that same size (the loader part of BaseAugmentation from
    split_for_device, or --gpu_aug's). A loader can then skip it and copy whole batches out of a RAM cache."""
    steps = transform.transforms if isinstance(transform, transforms.Compose) else [transform]
    *head, last = steps
    return last is to_uint8_tensor and all(
        isinstance(step, transforms.Resize) and isinstance(step.size, list | tuple) and list(step.size) == list(size)
        for step in head
    )


class CenterCropFraction:
    """Keep the central `fraction` (H, W) of a PIL image, whatever size it was decoded at."""

    def __init__(self, fraction: Sequence[float]) -> None:
        self.fraction = tuple(fraction)

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        return transforms.functional.center_crop(image, [round(h * self.fraction[0]), round(w * self.fraction[1])])


class BaseAugmentation:
    """Resize, to tensor, normalize (the seed's preset); train and eval transforms are the same."""

    crop_fraction = (1.0, 1.0)  # central share (H, W) of the decoded image the network sees
    batch_equivalent = False  # whether BatchAugment reproduces train_transform (then --gpu_aug is on by default)

    def __init__(self, resize: Sequence[int], mean: Sequence[float], std: Sequence[float], **kwargs: Any) -> None:
        self.load_size = tuple(resize)
        self.train_transform = self.eval_transform = transforms.Compose(
            [
                transforms.Resize(tuple(resize), interpolation=transforms.InterpolationMode.BILINEAR),
                ToNormalizedTensor(mean, std),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.train_transform(image)


class CustomAugmentation(BaseAugmentation):
    """Center crop (the seed's 320x256 of 512x384), resize, color jitter and Gaussian noise for training."""

    crop_fraction = (320 / 512, 256 / 384)

    def __init__(self, resize: Sequence[int], mean: Sequence[float], std: Sequence[float], **kwargs: Any) -> None:
        h, w = resize
        self.load_size = (math.ceil(h / self.crop_fraction[0]), math.ceil(w / self.crop_fraction[1]))
        crop_resize = [
            CenterCropFraction(self.crop_fraction),
            transforms.Resize((h, w), interpolation=transforms.InterpolationMode.BILINEAR),
        ]
        normalize = ToNormalizedTensor(mean, std)
        self.train_transform = transforms.Compose(
            [*crop_resize, *self.random_image_steps(), normalize, *self.random_tensor_steps()]
        )
        self.eval_transform = transforms.Compose([*crop_resize, normalize])

    def random_image_steps(self) -> list[Any]:
        """Training-only transforms of the cropped, resized PIL image."""
        return [transforms.ColorJitter(0.1, 0.1, 0.1, 0.1)]

    def random_tensor_steps(self) -> list[Any]:
        """Training-only transforms of the normalized tensor."""
        return [AddGaussianNoise(std=0.05)]


class FaceAugmentation(CustomAugmentation):
    """CustomAugmentation's face crop, then flips, small shifts/zooms and color jitter (cheap, in loader workers).
    BatchAugment makes the same draws batch-wise on the training device: --gpu_aug, on by default for it."""

    batch_equivalent = True  # BatchAugment's defaults reproduce the training steps

    def random_image_steps(self) -> list[Any]:
        return [
            transforms.RandomHorizontalFlip(),  # faces are left-right symmetric; labels do not change
            transforms.RandomAffine(degrees=0, translate=(0.06, 0.06), scale=(0.9, 1.1)),
            transforms.ColorJitter(0.2, 0.2, 0.2),
        ]

    def random_tensor_steps(self) -> list[Any]:
        return []


class AlbumentationsAugmentation(BaseAugmentation):
    """Albumentations: flips, small shifts/scales/rotations, brightness/contrast and hue for training."""

    def __init__(self, resize: Sequence[int], mean: Sequence[float], std: Sequence[float], **kwargs: Any) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network
        import albumentations as A
        from albumentations.pytorch import ToTensorV2

        h, w = resize
        self.load_size = (h, w)
        tail = [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
        train = A.Compose(
            [
                A.Resize(h, w),
                A.HorizontalFlip(p=0.5),
                A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-10, 10), p=0.7),
                A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
                A.HueSaturationValue(10, 15, 10, p=0.3),
                *tail,
            ]
        )
        evaluate = A.Compose([A.Resize(h, w), *tail])
        self.train_transform = _AlbumentationsCall(train)
        self.eval_transform = _AlbumentationsCall(evaluate)


class _AlbumentationsCall:
    """PIL image -> tensor through an albumentations pipeline, seeded from torch in each process.

    Albumentations keeps its own random state, which loader workers would otherwise all copy from the main
    process: every worker, and every epoch of non-persistent workers, would repeat the same augmentations.
    torch gives each worker a distinct seed per epoch (derived from the loader's seeded generator), so
    re-seeding from it makes augmentation both varied and repeatable.
    """

    def __init__(self, compose: Any) -> None:
        self.compose = compose
        self.seeded_for: tuple[int, int] | None = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        key = (os.getpid(), torch.initial_seed())
        if key != self.seeded_for:
            self.compose.set_random_seed(torch.initial_seed() % 2**32)
            self.seeded_for = key
        return self.compose(image=np.asarray(image))["image"]


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> CHW uint8 tensor: what the loaders hand over when the normalization (and with
    --gpu_aug the augmentation) runs on the device, 4x fewer bytes than float32."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # a CHW view of HWC memory: one copy


def crop_in_grid(side: int, fraction: float) -> tuple[float, float]:
    """(half-size, centre) in grid_sample's [-1, 1] units of the crop CenterCropFraction takes of a `side`-pixel
    side: round(side x fraction) pixels from torchvision's center_crop offset."""
    crop = round(side * fraction)
    start = int(round((side - crop) / 2.0))
    return crop / side, (2 * start + crop) / side - 1


def nearest_source(slope: torch.Tensor, offset: torch.Tensor, out: int, size: int, centre: float, half: float):
    """For an axis of `out` output pixels, each image's source pixel index on an axis of `size` pixels (the
    nearest, as grid_sample finds it with align_corners=False) and whether it lies inside the crop (centre +- half,
    grid units), where the grid coordinate is slope x (the output pixel's own) + offset."""
    base = (torch.arange(out, device=slope.device) * 2 + 1) / out - 1
    grid = slope[:, None] * base + offset[:, None]
    index = ((grid + 1) * size - 1).div_(2).round_().long().clamp_(0, size - 1)
    return index, (grid - centre).abs() < half


class BatchAugment:
    """FaceAugmentation's training steps on whole uint8 NCHW batches, on the training device (--gpu_aug): the
    preset's central crop and resize, a horizontal flip, a shift and zoom (one gather of pixels for the four), then
    brightness, contrast and saturation jitter in a random order per image, then normalization.

    Each random draw has torchvision's distribution for the per-image steps (RandomHorizontalFlip, RandomAffine
    with whole-pixel shifts, ColorJitter clamping after each step; tests/test_device_augmentation.py compares them
    over 2,000 draws), down to RandomAffine's nearest-pixel sampling and the black it shows where the shifted or
    zoomed-out crop does not reach (a bilinear version that showed the photo around the crop scored 0.470 on
    maskdev against the per-image steps' 0.499, 3 seeds). Random numbers come from torch on that device, so runs
    repeat per seed."""

    def __init__(
        self,
        resize: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        crop_fraction: Sequence[float] = (1.0, 1.0),
        flip: float = 0.5,
        scale: float = 0.1,
        shift: float = 0.06,
        jitter: float = 0.2,
    ) -> None:
        self.resize, self.crop_fraction = tuple(resize), tuple(crop_fraction)
        self.mean, self.std = DeviceConstant(mean, (1, 3, 1, 1)), DeviceConstant(std, (1, 3, 1, 1))
        self.flip, self.scale, self.shift, self.jitter = flip, scale, shift, jitter

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.geometry(images)  # float pixel values 0..255 from here on: no pass to scale them
        if self.jitter:
            x = self.color(x)
        return x.sub_(self.mean.to(x.device) * 255).div_(self.std.to(x.device) * 255)

    def uniform(self, n: int, device: torch.device, low: float, high: float) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(low, high)

    def geometry(self, images: torch.Tensor) -> torch.Tensor:
        """Crop, resize, flip (probability `flip`), zoom s ~ U(1 - scale, 1 + scale) about the centre and shift by
        round(U(-shift, shift) x side) pixels, as RandomHorizontalFlip then RandomAffine: output pixel p shows
        flipped-crop pixel (p - centre - shift) / s + centre, the nearest one, and black outside the crop.

        No step rotates, so each output row reads one input row and each column one input column: the whole
        step is one gather of uint8 pixels (the pixels grid_sample picks in nearest mode)."""
        n, device = len(images), images.device
        (h, w), (height, width) = self.resize, images.shape[-2:]
        (fy, cy), (fx, cx) = map(crop_in_grid, (height, width), self.crop_fraction)  # in [-1, 1] grid units
        flip = torch.where(torch.rand(n, device=device) < self.flip, -1.0, 1.0)
        tx = self.uniform(n, device, -self.shift * w, self.shift * w).round() * 2 / w  # in grid units (2 = a side)
        ty = self.uniform(n, device, -self.shift * h, self.shift * h).round() * 2 / h
        zoom = self.uniform(n, device, 1 - self.scale, 1 + self.scale)
        columns, columns_inside = nearest_source(fx * flip / zoom, cx - fx * flip * tx / zoom, w, width, cx, fx)
        rows, rows_inside = nearest_source(fy / zoom, cy - fy * ty / zoom, h, height, cy, fy)
        index = (rows[:, :, None] * width + columns[:, None, :]).view(n, 1, h * w)
        x = images.flatten(2).gather(2, index.expand(-1, images.shape[1], -1)).view(n, -1, h, w).float()
        return x.mul_((rows_inside[:, :, None] & columns_inside[:, None, :])[:, None])  # RandomAffine's black fill

    def color(self, x: torch.Tensor) -> torch.Tensor:
        """ColorJitter(brightness, contrast, saturation = jitter) on 0..255 images, in place: factors ~ U(1 - jitter,
        1 + jitter), the three steps in a random order per image, each clamped to 0..255 as torchvision's are. Each
        step blends the image with a reference: black (brightness), its mean gray (contrast), its gray (saturation);
        all images take their step in one pass."""
        n, device, j = len(x), x.device, self.jitter
        factors = torch.empty(n, 3, device=device).uniform_(1 - j, 1 + j)
        order = torch.rand(n, 3, device=device).argsort(1)  # a random permutation per image
        for r in range(3):
            step = order[:, r].view(n, 1, 1, 1)
            factor = factors.gather(1, order[:, r : r + 1]).view(n, 1, 1, 1)
            gray_image = gray(x)
            reference = torch.where(step == 2, gray_image, gray_image.mean((2, 3), keepdim=True) * (step == 1))
            x.lerp_(reference, 1 - factor).clamp_(0, 255)  # factor x image + (1 - factor) x reference
        return x


def cutmix_box(height: int, width: int, lam: float, mode: str) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the patch pasted from the other image; its area is 1 - lam (rounded).

    `vertical` cuts at a random column: the left part from one face, the right from another, so each part
    keeps its eyes and mask region (a box would often paste someone's mouth over a mask). The `box` patch is
    torchvision's CutMix's own, drawn inside it (see `mix_batch`)."""
    if mode != "vertical":
        raise ValueError(f"cutmix_box: mode {mode!r} is not ours; the box mode is torchvision's v2.CutMix")
    left = round(width * lam)
    return 0, height, left, width


class VerticalCutMix(v2.CutMix):
    """torchvision's CutMix with our patch: everything right of a random column, pasted from the partner."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        height, width = flat_inputs[0].shape[-2:]
        top, bottom, left, right = cutmix_box(height, width, lam, "vertical")
        return {"box": (left, top, right, bottom), "lam_adjusted": left / width}  # v2.CutMix's (x1, y1, x2, y2)

    _get_params = make_params  # its name before torchvision 0.21 (pytorch/vision#8787)


@functools.lru_cache(maxsize=8)
def batch_mixer(num_classes: int, mixup: float, cutmix: float, cutmix_mode: str) -> v2.Transform:
    """torchvision's MixUp (alpha `mixup`) and CutMix (alpha `cutmix`, patch `cutmix_mode`), one of the two
    picked per batch when both are on; each (images, labels) -> (images, soft labels (N, num_classes)).

    Each image is mixed with the one before it in the batch (torchvision rolls the batch by one; the loader
    shuffles). Every draw (which one, lam from Beta(alpha, alpha), the box) comes from torch's global CPU
    generator, which checkpoints save and restore, so a resumed run mixes as an uninterrupted one."""
    chosen = []
    if mixup > 0:
        chosen.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        cls = VerticalCutMix if cutmix_mode == "vertical" else v2.CutMix
        chosen.append(cls(alpha=cutmix, num_classes=num_classes))
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    cutmix_mode: str = "box",
    prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (alpha `mixup`) or cutmix (alpha `cutmix`; one of the two at random when both are set) on a batch
    with probability `prob`, by `batch_mixer`. Returns the images and soft targets (N, num_classes) that sum to 1
    per row (one-hot when the batch is not mixed)."""
    if (mixup <= 0 and cutmix <= 0) or float(torch.rand(())) >= prob:
        return images, F.one_hot(targets, num_classes).to(torch.float32)
    return batch_mixer(num_classes, float(mixup), float(cutmix), cutmix_mode)(images, targets)


# ---------------------------------------------------------------------------------------------------
# Test-time augmentation (inference.py --tta): views of a batch of normalized (N, C, H, W) tensors, after the
# run's eval transform, so they work whatever that transform is. Portrait face photos are left-right symmetric
# and roughly centred: mirrors, small shifts and a slight zoom keep the face whole; vertical flips and rotations
# would not.
def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`x` moved down by `dy` and right by `dx` pixels (negative: up/left); the uncovered edge repeats the border."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def _step(size: int) -> int:
    return max(1, round(size * 0.05))  # 5% of the side: a few pixels, as far as faces sit off-centre


def _zoom(x: torch.Tensor, scale: float = 1.1) -> torch.Tensor:
    """The central 1/scale of `x`, resized back to its size (the face seen 10% closer)."""
    h, w = x.shape[-2:]
    ch, cw = round(h / scale), round(w / scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    return F.interpolate(x[..., top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False)


VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "up": lambda x: _shift(x, -_step(x.shape[-2]), 0),
    "down": lambda x: _shift(x, _step(x.shape[-2]), 0),
    "left": lambda x: _shift(x, 0, -_step(x.shape[-1])),
    "right": lambda x: _shift(x, 0, _step(x.shape[-1])),
    "zoom": _zoom,
    "zoom_hflip": lambda x: _zoom(x).flip(-1),
}
TTA = {
    "none": ("identity",),
    "flip": ("identity", "hflip"),
    "flip_shift": ("identity", "hflip", "up", "down", "left", "right"),
    "flip_zoom": ("identity", "hflip", "zoom", "zoom_hflip"),
}


def tta_views(presets: Sequence[str]) -> tuple[str, ...]:
    """The views of the `--tta` presets, each once, in order."""
    return tuple(dict.fromkeys(view for preset in presets for view in TTA[preset]))


def augmentation_classes() -> dict[str, type]:
    """The presets defined here, by name."""
    return utils.module_classes(sys.modules[__name__], lambda c: c.__name__.endswith("Augmentation"))
