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
import train

SIZE = (64, 48)


@pytest.fixture()
def data(demo_root):
    return dataset.MaskSplitByProfileDataset(demo_root / "train/images")


def decode_at(size=SIZE):
    return functools.partial(dataset.decode_fixed, size=size)


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_cached_and_uncached_eval_tensors_are_identical(data, tmp_path, kind):
    paths = [str(p) for p in data.image_paths]
    aug = augmentation.CustomAugmentation(resize=(40, 24), mean=dataset.SEED_MEAN, std=dataset.SEED_STD)
    size = aug.load_size
    store = cache.build_cache(kind, paths, size, decode_at(size), workers=2, cache_dir=tmp_path / "cache")
    assert not store.bad and len(store) == len(paths)
    indices = np.arange(len(data))
    cached = dataset.ImageSubset(data, indices, aug.eval_transform, aug.load_size, store)
    plain = dataset.ImageSubset(data, indices, aug.eval_transform, aug.load_size)
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


def test_unreadable_images_are_reported_by_the_cache_build(tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    Image.new("RGB", (96, 128)).save(good)
    bad.write_bytes(b"not a jpeg")
    store = cache.RamCache([str(good), str(bad)], SIZE, decode_at())
    assert list(store.bad) == [str(bad)]
    store.keep(np.array([True, False]))
    assert len(store) == 1


def test_two_workers_draw_different_augmentations_from_the_same_cached_image(data, tmp_path):
    paths = [str(p) for p in data.image_paths]
    aug = augmentation.AlbumentationsAugmentation(resize=SIZE, mean=dataset.SEED_MEAN, std=dataset.SEED_STD)
    store = cache.RamCache(paths, aug.load_size, decode_at(aug.load_size))
    same = dataset.ImageSubset(data, [3] * 8, aug.train_transform, aug.load_size, store)
    loader = torch.utils.data.DataLoader(same, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0))
    images = torch.cat([x for x, _ in loader])
    assert not torch.equal(images[0::2], images[1::2])  # worker 0 and worker 1


def test_the_cache_is_built_once_per_run(demo_root, tmp_path, monkeypatch):
    calls = []
    real = dataset.decode_fixed

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(dataset, "decode_fixed", counting)
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
    assert first.returncode == 0, first.stderr and "(0 reused)" in first.stdout
    second = run_script("train.py", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "84 images (84 reused)" in second.stdout


def test_auto_chooses_ram_when_it_fits():
    assert cache.choose_kind("auto", 100, (128, 96)) == "ram"
    assert cache.choose_kind("auto", 10**9, (512, 384)) == "disk"
    assert cache.choose_kind("none", 100, (128, 96)) == "none"
