"""Every augmentation preset: train and eval output (3, H, W) for H != W; eval is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import augmentation
import dataset
import imaging

H, W = 40, 24


@pytest.fixture()
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (512, 384, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", augmentation.augmentation_classes())
def test_preset_shapes_and_eval_determinism(name, photo):
    aug = augmentation.augmentation_classes()[name](resize=(H, W), mean=dataset.SEED_MEAN, std=dataset.SEED_STD)
    assert len(aug.load_size) == 2 and aug.load_size[0] >= H and aug.load_size[1] >= W
    for transform in (aug.train_transform, aug.eval_transform):
        out = transform(photo)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert tuple(out.shape) == (3, H, W)
    assert torch.equal(aug.eval_transform(photo), aug.eval_transform(photo))


def test_presets_include_the_seed_names_and_albumentations():
    assert {"BaseAugmentation", "CustomAugmentation", "AlbumentationsAugmentation"} <= set(
        augmentation.augmentation_classes()
    )


def test_custom_training_transform_is_random_and_eval_is_not(photo):
    aug = augmentation.CustomAugmentation(resize=(H, W), mean=dataset.SEED_MEAN, std=dataset.SEED_STD)
    torch.manual_seed(0)
    assert not torch.equal(aug.train_transform(photo), aug.train_transform(photo))


def test_add_gaussian_noise():
    torch.manual_seed(0)
    x = torch.zeros(3, 64, 64)
    y = augmentation.AddGaussianNoise(std=0.5)(x)
    assert y.std().item() == pytest.approx(0.5, rel=0.05)


def test_normalize_uses_the_given_mean_std(photo):
    flat = Image.new("RGB", (384, 512), (128, 128, 128))
    aug = augmentation.BaseAugmentation(resize=(H, W), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.allclose(aug.eval_transform(flat), torch.full((3, H, W), (128 / 255 - 0.5) / 0.25), atol=1e-5)


def test_normalized_tensor_equals_torchvision_to_tensor_then_normalize(photo):
    from torchvision import transforms

    mean, std = (0.2, 0.5, 0.7), (0.1, 0.3, 0.25)
    expected = transforms.Normalize(mean, std)(transforms.ToTensor()(photo))
    out = augmentation.ToNormalizedTensor(mean, std)(photo)
    assert out.shape == expected.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.equal(out[0], out[1])  # channels keep their own mean and std


def test_draft_decoding_matches_full_decoding_after_resize(tmp_path):
    yy, xx = np.mgrid[0:512, 0:384]
    smooth = np.stack([yy / 2, xx / 1.5, 128 + 100 * np.sin(yy / 40) * np.cos(xx / 30)], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    full = imaging.load_image(tmp_path / "a.jpg")
    fast = imaging.load_image(tmp_path / "a.jpg", min_size=(128, 96))
    assert full.size == (384, 512) and fast.size == (96, 128)
    a = np.asarray(full.resize((96, 128), Image.BILINEAR), dtype=np.float32)
    b = np.asarray(fast.resize((96, 128), Image.BILINEAR), dtype=np.float32)
    assert np.abs(a - b).mean() < 2  # the same picture, up to resampling


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert imaging.load_image(tmp_path / "r.jpg").size == (20, 40)
    assert imaging.load_image(tmp_path / "r.jpg", min_size=(10, 5)).size[1] >= 10


def test_mean_std_computed_over_pooled_pixels(tmp_path):
    Image.new("RGB", (10, 10), (0, 0, 0)).save(tmp_path / "black.png")
    Image.new("RGB", (10, 10), (255, 255, 255)).save(tmp_path / "white.png")
    mean, std = imaging.compute_mean_std([tmp_path / "black.png", tmp_path / "white.png"], None)
    assert mean == pytest.approx((0.5, 0.5, 0.5))
    assert std == pytest.approx((0.5, 0.5, 0.5))  # per-image stds are 0: averaging them would give 0


def test_albumentations_draws_differ_between_workers_and_epochs(photo):
    aug = augmentation.AlbumentationsAugmentation(resize=(H, W), mean=dataset.SEED_MEAN, std=dataset.SEED_STD)

    class Same(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return aug.train_transform(photo)

    loader = torch.utils.data.DataLoader(
        Same(), batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0)
    )
    first, second = torch.cat(list(loader)), torch.cat(list(loader))
    assert not torch.equal(first[0::2], first[1::2])  # worker 0 and worker 1 draw different augmentations
    assert not torch.equal(first, second)  # and a new epoch draws new ones
    again = torch.utils.data.DataLoader(Same(), batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, torch.cat(list(again)))  # repeatable for a seed


@pytest.mark.parametrize("name", augmentation.augmentation_classes())
def test_loader_part_and_device_part_give_the_eval_tensors(name, photo):
    """Every preset built on ToNormalizedTensor hands over uint8 and normalizes on the device, exactly."""
    aug = augmentation.augmentation_classes()[name](resize=(H, W), mean=dataset.SEED_MEAN, std=dataset.SEED_STD)
    loader_part, device_part = augmentation.split_for_device(aug.eval_transform)
    if name == "AlbumentationsAugmentation":  # normalizes inside albumentations: kept whole, in the workers
        assert device_part is None and loader_part is aug.eval_transform
        return
    pixels = loader_part(photo)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, H, W)
    batch = torch.stack([pixels, loader_part(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    expected = torch.stack([aug.eval_transform(photo), aug.eval_transform(photo.transpose(0))])
    assert torch.equal(device_part(batch), expected)


def test_random_tensor_steps_move_to_the_device_only_when_batch_safe(photo):
    from torchvision import transforms

    aug = augmentation.CustomAugmentation(resize=(H, W), mean=dataset.SEED_MEAN, std=dataset.SEED_STD)
    loader_part, device_part = augmentation.split_for_device(aug.train_transform)
    assert [type(s) for s in device_part.steps] == [augmentation.AddGaussianNoise]
    torch.manual_seed(0)
    batch = device_part(torch.stack([loader_part(photo)] * 2))
    assert batch.dtype == torch.float32 and not torch.equal(batch[0], batch[1])  # noise drawn per image

    # RandomErasing on a batch would erase the same box in every image: such a transform stays whole.
    erasing = transforms.Compose(
        [augmentation.ToNormalizedTensor((0.5,) * 3, (0.2,) * 3), transforms.RandomErasing(p=1.0)]
    )
    assert augmentation.split_for_device(erasing) == (erasing, None)
    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.2,) * 3)])
    assert augmentation.split_for_device(plain) == (plain, None)
