"""The decoded-image caches: same tensors as decoding, built once, reused across runs, invalidated by edits."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from PIL import Image

import augmentation
import cache
import dataset
import imaging
import subset as subset_module
import train

SIZE = (64, 48)


@pytest.fixture()
def data(demo_root):
    return dataset.MaskSplitByProfileDataset(demo_root / "train/images")


def decode_at(size=SIZE):
    return functools.partial(imaging.decode_fixed, size=size)


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_cached_and_uncached_eval_tensors_are_identical(data, tmp_path, kind):
    paths = [str(p) for p in data.image_paths]
    aug = augmentation.CustomAugmentation(resize=(40, 24), mean=dataset.SEED_MEAN, std=dataset.SEED_STD)
    size = aug.load_size
    store = cache.build_cache(kind, paths, size, decode_at(size), workers=2, cache_dir=tmp_path / "cache")
    assert not store.bad and len(store) == len(paths)
    indices = np.arange(len(data))
    cached = subset_module.ImageSubset(data, indices, aug.eval_transform, aug.load_size, store)
    plain = subset_module.ImageSubset(data, indices, aug.eval_transform, aug.load_size)
    for i in (0, 7, len(data) - 1):
        assert torch.equal(cached[i][0], plain[i][0])
        assert cached[i][1] == plain[i][1]


def test_disk_cache_is_reused_and_a_changed_file_is_decoded_again(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (96, 128), (10, 200, 30)).save(path)
    first = cache.DiskCache([str(path)], SIZE, decode_at(), tmp_path / "cache")
    assert "(0 reused)" in first.report
    again = cache.DiskCache([str(path)], SIZE, decode_at(), tmp_path / "cache")
    assert "(1 reused)" in again.report and again.files == first.files
    Image.new("RGB", (96, 128), (250, 0, 0)).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a later edit
    changed = cache.DiskCache([str(path)], SIZE, decode_at(), tmp_path / "cache")
    assert "(0 reused)" in changed.report and changed.files != first.files
    assert changed[0][0, 0, 0] > 200 and first[0][0, 0, 1] > 150  # new pixels; the old entry is untouched


@pytest.mark.parametrize("workers", [1, 3])  # 3: forked processes, which write into shared memory
def test_unreadable_images_are_reported_by_the_cache_build(tmp_path, workers):
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", (96, 128), (30 * i, 0, 0)).save(paths[-1])
    paths[4].write_bytes(b"not a jpeg")
    store = cache.RamCache([str(p) for p in paths], SIZE, decode_at(), workers=workers)
    assert list(store.bad) == [str(paths[4])]
    assert [int(store[i][0, 0, 0]) // 10 for i in range(7)] == [0, 3, 6, 9, 0, 15, 18]  # rows in path order
    kept = store.kept(np.arange(7) != 4)
    assert len(kept) == 6 and len(store) == 7  # the cache itself stays whole, for a sweep's next trial
    assert [int(kept[i][0, 0, 0]) // 10 for i in range(6)] == [0, 3, 6, 9, 15, 18]
    # Over the same memory, not a copy (under torchrun, a copy per rank): a batch is one gather of kept rows.
    assert kept.images is store.images
    assert [int(v) // 10 for v in kept.take(np.array([5, 0, 4]))[:, 0, 0, 0]] == [18, 0, 15]
    again = kept.kept(np.arange(6) != 0)  # kept twice: rows of rows
    assert len(again) == 5 and [int(again[i][0, 0, 0]) // 10 for i in range(5)] == [3, 6, 9, 15, 18]


def test_two_workers_draw_different_augmentations_from_the_same_cached_image(data, tmp_path):
    paths = [str(p) for p in data.image_paths]
    aug = augmentation.AlbumentationsAugmentation(resize=SIZE, mean=dataset.SEED_MEAN, std=dataset.SEED_STD)
    store = cache.RamCache(paths, aug.load_size, decode_at(aug.load_size))
    same = subset_module.ImageSubset(data, [3] * 8, aug.train_transform, aug.load_size, store)
    loader = torch.utils.data.DataLoader(same, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0))
    images = torch.cat([x for x, _ in loader])
    assert not torch.equal(images[0::2], images[1::2])  # worker 0 and worker 1


def test_the_cache_is_built_once_per_run(demo_root, tmp_path, monkeypatch):
    calls = []
    real = imaging.decode_fixed

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(imaging, "decode_fixed", counting)
    args = train.get_parser().parse_args(
        [
            "--data_dir",
            str(demo_root / "train/images"),
            "--epochs",
            "2",
            "--resize",
            "64",
            "48",
            "--num_workers",
            "0",
            "--cache",
            "ram",
            "--model_dir",
            str(tmp_path / "model"),
        ]
    )
    train.main(args)
    assert len(calls) == 12 * 7  # every image once: not again for the second epoch, validation or figures
    assert len(set(calls)) == 12 * 7


def test_training_with_the_disk_cache_reuses_it_in_the_next_run(demo_root, tmp_path):
    from conftest import run_script, tiny_run_args

    args = tiny_run_args(demo_root, "--cache", "disk", "--cache_dir", str(tmp_path / "cache"))
    first = run_script("train.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "84 images (0 reused)" in first.stdout
    second = run_script("train.py", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "84 images (84 reused)" in second.stdout


def test_auto_chooses_ram_when_it_fits():
    assert cache.choose_kind("auto", 100, (128, 96)) == "ram"
    assert cache.choose_kind("auto", 10**9, (512, 384)) == "disk"
    assert cache.choose_kind("none", 100, (128, 96)) == "none"


@pytest.mark.parametrize("preset", ["BaseAugmentation", "CustomAugmentation"])
def test_batches_copied_out_of_the_ram_cache_equal_image_by_image_batches(data, preset):
    """When the loader only hands over pixels, a batch is one copy out of the RAM cache: the same batch as
    decoding and transforming image by image. A transform that changes the pixels stays per image."""
    aug = augmentation.augmentation_classes()[preset](resize=SIZE, mean=dataset.SEED_MEAN, std=dataset.SEED_STD)
    store = cache.RamCache([str(p) for p in data.image_paths], aug.load_size, decode_at(aug.load_size))
    loader_part, device_part = augmentation.split_for_device(aug.eval_transform)
    indices = np.arange(5, len(data))
    fast = subset_module.ImageSubset(data, indices, loader_part, aug.load_size, store)
    plain = subset_module.ImageSubset(data, indices, loader_part, aug.load_size)  # no cache: decoded every time
    assert fast.gather == (preset == "BaseAugmentation") and not plain.gather
    for order in ([0, 1, 2, 3], [9, 0, 3]):  # the val loader reads through a Subset, in any order
        one_by_one = [plain[i] for i in order]  # __getitem__: every step of the transform, image by image
        for d in (fast, plain):
            x, y = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(d, order), batch_size=4)))
            assert x.dtype == torch.uint8 and x.shape == (len(order), 3, *SIZE)
            assert torch.equal(x, torch.stack([p for p, _ in one_by_one]))
            assert y.tolist() == [t for _, t in one_by_one] == plain.targets[order].tolist()
        expected = torch.stack([aug.eval_transform(Image.fromarray(plain.pixels(i))) for i in order])
        assert torch.equal(device_part(x), expected)
