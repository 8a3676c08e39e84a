"""augmentation.BatchAugment draws FaceAugmentation's random steps batch-wise (--gpu_aug): the same distributions,
checked over 2,000 draws of each, and the same pixels when nothing is random."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms

import augmentation
import train

N = 2000
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def as_batch(image: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].repeat(n, 1, 1, 1)


def dot_positions(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of a bright dot in each image: the centroid of what rises above the image's median."""
    c = images[:, 0]
    weight = (c - c.flatten(1).median(1).values[:, None, None]).clamp(min=0)
    total = weight.sum((1, 2))
    rows = (weight.sum(2) * torch.arange(c.shape[1])).sum(1) / total
    columns = (weight.sum(1) * torch.arange(c.shape[2])).sum(1) / total
    return rows, columns


def test_flip_shift_and_zoom_match_the_per_image_preset_over_2000_draws():
    resize = (32, 24)
    face = augmentation.FaceAugmentation(resize, MEAN, STD)
    image = np.zeros((*face.load_size, 3), np.uint8)
    image[14:17, 20:23] = 255  # a dot 1 row above and 3 columns right of the centre of the face crop (rows 10-41)
    torch.manual_seed(0)
    per_image = torch.stack([face.train_transform(Image.fromarray(image)) for _ in range(N)])
    batch = augmentation.BatchAugment(resize, MEAN, STD, face.crop_fraction)(as_batch(image, N))
    assert batch.shape == per_image.shape == (N, 3, *resize)
    found = {}
    for name, images in (("per image", per_image), ("batch", batch)):
        rows, columns = dot_positions(images)
        flipped = columns < (resize[1] - 1) / 2  # the dot sits right of the centre unless flipped
        unflipped = torch.where(flipped, resize[1] - 1 - columns, columns)  # mirrored back
        found[name] = {"flip": flipped.float().mean(), "rows": rows, "columns": unflipped}
    for name in found:  # a flip in half the draws: 0.5 +- 3.5 standard errors
        assert abs(float(found[name]["flip"]) - 0.5) < 3.5 * (0.25 / N) ** 0.5, (name, found[name]["flip"])
    for key in ("rows", "columns"):  # shift (whole pixels, up to 6% of a side) and zoom (0.9 to 1.1) move the dot
        a, b = found["per image"][key], found["batch"][key]
        assert abs(float(a.mean() - b.mean())) < 0.15, (key, a.mean(), b.mean())
        assert 0.93 < float(b.std() / a.std()) < 1.07, (key, a.std(), b.std())
        assert abs(float(a.min() - b.min())) < 0.5 and abs(float(a.max() - b.max())) < 0.5, (key, a, b)


def test_the_shifted_or_zoomed_out_crop_leaves_black_where_the_per_image_preset_does():
    """RandomAffine fills with black what the moved crop no longer covers, even where the photo goes on: the
    share of black pixels has the same distribution over 2,000 draws (an all-white photo, so anything of it
    shown outside the crop would be white)."""
    face = augmentation.FaceAugmentation((32, 24), (0, 0, 0), (1, 1, 1))
    geometry = transforms.Compose(
        [s for s in face.train_transform.transforms if not isinstance(s, transforms.ColorJitter)]
    )
    image = np.full((*face.load_size, 3), 255, np.uint8)
    torch.manual_seed(0)
    per_image = torch.stack([geometry(Image.fromarray(image)) for _ in range(N)])
    batch = augmentation.BatchAugment((32, 24), (0, 0, 0), (1, 1, 1), face.crop_fraction, jitter=0)(as_batch(image, N))
    black = [(images < 0.5).all(1).float().mean((1, 2)) for images in (per_image, batch)]
    assert 0.04 < float(black[0].mean()) < 0.1  # the preset shows black in about 7% of a face on average
    assert ks_2samp(*black).pvalue > 0.01
    assert abs(float(black[0].mean() - black[1].mean())) < 0.005
    assert set(batch.unique().tolist()) == {0.0, 1.0}  # nearest pixels: nothing blended with the black


def test_the_gather_reads_the_pixels_grid_sample_reads_in_nearest_mode():
    """BatchAugment.geometry gathers rows and columns itself: for flips, shifts and zooms, each output pixel is
    the one torch's grid_sample picks in nearest mode (align_corners=False), zero where it falls off the image."""
    torch.manual_seed(0)
    n, (h, w), (height, width) = 64, (32, 24), (51, 36)
    source = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width).expand(n, 1, -1, -1) + 1
    slope = torch.empty(2, n).uniform_(0.5, 1.2) * torch.tensor([[1.0], [-1.0]]).repeat(1, n)[:, torch.randperm(n)]
    offset = torch.empty(2, n).uniform_(-0.3, 0.3)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = slope[0], offset[0], slope[1], offset[1]
    grid = torch.nn.functional.affine_grid(theta, [n, 1, h, w], align_corners=False)
    expected = torch.nn.functional.grid_sample(source, grid, mode="nearest", align_corners=False)[:, 0]
    columns, _ = augmentation.nearest_source(slope[0], offset[0], w, width, 0.0, 1.0)
    rows, _ = augmentation.nearest_source(slope[1], offset[1], h, height, 0.0, 1.0)
    on_image = expected > 0
    assert 0.5 < float(on_image.float().mean()) < 1  # some of the grid falls off the image: the zero padding
    assert torch.equal((rows[:, :, None] * width + columns[:, None, :] + 1)[on_image].float(), expected[on_image])


def jitter_statistics(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: the red and blue means of the left and right halves (brightness), their summed difference
    (contrast) and the left half's channel spread (saturation)."""
    left, right = images[..., :8].mean((2, 3)), images[..., 8:].mean((2, 3))
    return {
        "red left": left[:, 0],
        "blue left": left[:, 2],
        "red right": right[:, 0],
        "blue right": right[:, 2],
        "contrast": (left - right).abs().sum(1),
        "saturation": left.max(1).values - left.min(1).values,
    }


def test_color_jitter_matches_torchvisions_over_2000_draws():
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :8], image[:, 8:] = (200, 120, 60), (60, 90, 150)  # two tones: a contrast to change, colours to fade
    jitter = transforms.ColorJitter(0.2, 0.2, 0.2)  # FaceAugmentation's
    torch.manual_seed(0)
    pil = torch.stack([augmentation.to_uint8_tensor(jitter(Image.fromarray(image))) for _ in range(N)]).float() / 255
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    exact = torch.stack([jitter(tensor) for _ in range(N)])  # torchvision's steps without PIL's rounding
    batch = augmentation.BatchAugment((16, 16), (0, 0, 0), (1, 1, 1), flip=0, scale=0, shift=0)(as_batch(image, N))
    pil, exact, batch = map(jitter_statistics, (pil, exact, batch))
    for key in batch:
        assert ks_2samp(exact[key], batch[key]).pvalue > 0.01, key  # the same distribution
        # PIL rounds to whole levels after each step: within 3 of 255 on average, the same spread within 10%.
        assert abs(float(pil[key].mean() - batch[key].mean())) < 3 / 255 * (1 + (key == "contrast")), key
        assert 0.9 < float(batch[key].std() / pil[key].std()) < 1.1, key


def test_with_nothing_random_it_gives_the_eval_transforms_pixels():
    face = augmentation.FaceAugmentation((32, 24), MEAN, STD)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, *face.load_size, 3), dtype=np.uint8)
    fixed = augmentation.BatchAugment((32, 24), MEAN, STD, face.crop_fraction, flip=0, scale=0, shift=0, jitter=0)
    batch = fixed(torch.from_numpy(images).permute(0, 3, 1, 2))
    expected = torch.stack([face.eval_transform(Image.fromarray(image)) for image in images])
    torch.testing.assert_close(batch, expected, atol=1e-4, rtol=0)  # the crop lands on whole pixels, unresized
    torch.testing.assert_close(fixed(torch.from_numpy(images).permute(0, 3, 1, 2)), batch, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("flag", "preset", "expected"),
    [
        (None, "FaceAugmentation", True),  # the mask data's default preset runs batch-wise on the device
        (None, "BaseAugmentation", False),  # BatchAugment would add steps BaseAugmentation does not have
        (None, "CustomAugmentation", False),
        (None, "AlbumentationsAugmentation", False),
        (False, "FaceAugmentation", False),  # --no-gpu_aug: the per-image path, by name
        (True, "BaseAugmentation", True),
    ],
)
def test_gpu_aug_defaults_to_on_for_the_preset_it_reproduces(flag, preset, expected):
    aug_cls = augmentation.augmentation_classes()[preset]
    assert train.augment_on_device(flag, aug_cls) is expected
