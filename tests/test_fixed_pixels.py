"""Deterministic passes decode once: validation reads its images made once at their final size, and inference
decodes every eval image once, whatever the TTA views and ensemble members (issue 21, items 3 and 4)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import augmentation
import dataset
import imaging
import subset
from conftest import run_script, tiny_run_args


@pytest.fixture
def counted(monkeypatch):
    """Counts of the decodes (imaging.decode_fixed) and face crops (the eval and training transforms' first step)
    made in this process; the runs below use --num_workers 0, so no work leaves it."""
    counts = {"decode": 0, "crop": 0}
    decode, crop = imaging.decode_fixed, augmentation.CenterCropFraction.__call__

    def counting_decode(*args, **kwargs):
        counts["decode"] += 1
        return decode(*args, **kwargs)

    def counting_crop(self, image):
        counts["crop"] += 1
        return crop(self, image)

    monkeypatch.setattr(imaging, "decode_fixed", counting_decode)
    monkeypatch.setattr(augmentation.CenterCropFraction, "__call__", counting_crop)
    return counts


def test_fixed_pixels_are_the_transform_of_every_image(demo_root):
    data = dataset.MaskSplitByProfileDataset(demo_root / "train/images")
    aug = augmentation.FaceAugmentation(resize=(64, 48), mean=(0.5,) * 3, std=(0.2,) * 3)
    transform, device_steps = augmentation.split_for_device(aug.eval_transform)
    view = subset.ImageSubset(data, np.arange(0, len(data), 3), transform, aug.load_size)
    fixed = subset.fixed_once(view, transform, workers=2, batch_size=16)
    assert isinstance(fixed, subset.FixedPixels) and len(fixed) == len(view) and fixed.gather
    for i in (0, len(view) // 2, len(view) - 1):
        assert torch.equal(fixed[i][0], view[i][0]) and fixed[i][1] == view[i][1]
    batches = list(fixed.batches(4))  # in order, the last one short
    assert len(batches) == len(fixed.batches(4)) == -(-len(view) // 4)
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.stack([view[i][0] for i in range(len(view))]))
    assert torch.cat([t for _, t in batches]).tolist() == [view[i][1] for i in range(len(view))]
    # A transform that does not end in uint8 pixels (normalized floats, random steps) is read as it is.
    assert subset.fixed_once(view, aug.eval_transform, workers=0) is None
    assert device_steps is not None


@pytest.mark.parametrize("gpu_aug", [[], ["--no-gpu_aug"]])
def test_validation_crops_each_image_once_whatever_the_epochs(demo_root, tmp_path, counted, gpu_aug):
    flags = tiny_run_args(demo_root, "--epochs", "3", "--num_workers", "0", "--cache", "ram", *gpu_aug)
    result = run_script("train.py", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "model/exp/config.json").read_text())
    assert config["augmentation"] == "FaceAugmentation"
    n_train, n_val = config["train_images"], config["val_images"]
    if gpu_aug:  # per-image training steps: FaceAugmentation's transform crops every training image every epoch
        assert not config["gpu_aug"] and counted["crop"] == 3 * n_train + n_val
    else:  # the default: training crops batch-wise on the device (BatchAugment), validation once per image
        assert config["gpu_aug"] and counted["crop"] == n_val
    assert counted["decode"] == n_train + n_val  # the cache: once each


def test_inference_decodes_each_eval_image_once_with_tta_and_an_ensemble(demo_root, tmp_path, counted):
    trained = run_script("train.py", *tiny_run_args(demo_root, "--num_workers", "0"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    n_eval = len(pd.read_csv(demo_root / "eval/info.csv"))
    run = str(tmp_path / "model/exp")
    copy = str(shutil.copytree(run, tmp_path / "model/copy"))  # a second member (one run twice is refused)
    for members, tta in (([run], "none"), ([run, copy], "flip")):
        counted["decode"] = counted["crop"] = 0
        flags = ["--model_dir", *members, "--data_dir", str(demo_root / "eval"), "--tta", tta, "--num_workers", "0"]
        result = run_script("inference.py", *flags, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert counted["decode"] == n_eval and counted["crop"] == n_eval, (members, tta, counted)
