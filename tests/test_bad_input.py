"""Bad input and faults: one clear line, exit code 2, and nothing already written is lost."""

from __future__ import annotations

import errno
import functools
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cache
import dataset
import evaldata
import imaging
import inference
import train
import utils
from conftest import ROOT, one_error_line, run_script
from utils import UserError

FAST = ["--epochs", "1", "--resize", "64", "48", "--val_ratio", "0.25", "--batch_size", "16"]


@pytest.fixture()
def images(demo_root, tmp_path):
    """A private, writable copy of the tiny training folder."""
    return shutil.copytree(demo_root / "train/images", tmp_path / "train/images")


def persons(images):
    return sorted(p for p in images.iterdir() if p.is_dir())


# --- image files ----------------------------------------------------------------------------------------
def corrupt(images) -> list[str]:
    folders = persons(images)
    truncated, empty, text = folders[0] / "mask1.jpg", folders[1] / "mask2.jpg", folders[2] / "normal.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty.write_bytes(b"")
    text.write_text("this is not a picture")
    return [str(truncated), str(empty), str(text)]


def odd_modes(images) -> None:
    """Readable images in unusual modes, replacing shots of the fourth to eighth persons."""
    folders = persons(images)
    base = Image.open(folders[3] / "mask1.jpg").convert("RGB")
    (folders[3] / "mask1.jpg").unlink()
    base.convert("L").save(folders[3] / "mask1.jpg")  # grayscale
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    (folders[4] / "mask2.jpg").unlink()
    rgba.save(folders[4] / "mask2.png")
    (folders[5] / "mask3.jpg").unlink()
    base.convert("P").save(folders[5] / "mask3.png")  # palette
    base.convert("CMYK").save(folders[6] / "mask4.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    base.rotate(90, expand=True).save(folders[7] / "mask5.jpg", exif=exif)


def test_unreadable_images_are_all_listed_before_training(images, tmp_path):
    bad = corrupt(images)
    odd_modes(images)
    line = one_error_line(run_script("train.py", "--data_dir", str(images), *FAST, cwd=tmp_path))
    assert line.startswith("error: 3 image(s) cannot be read: ")
    assert all(path in line for path in bad) and "--skip_bad_images" in line
    assert not (tmp_path / "model").exists()  # stopped before the first epoch, no run directory


def test_skip_bad_images_trains_without_them_and_records_them(images, tmp_path):
    bad = corrupt(images)
    odd_modes(images)
    result = run_script("train.py", "--data_dir", str(images), *FAST, "--skip_bad_images", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: skipping 3 unreadable image(s)" in result.stderr
    run = tmp_path / "model/exp"
    recorded = pd.read_csv(run / "bad_images.tsv", sep="\t")
    assert sorted(recorded["path"]) == sorted(bad)
    config = json.loads((run / "config.json").read_text())
    assert sorted(config["skipped_images"]) == sorted(bad)
    assert config["train_images"] + config["val_images"] == 12 * 7 - 3  # odd modes are used, not skipped


def test_odd_modes_decode_to_rgb_with_orientation_and_white_transparency(tmp_path):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    base.convert("L").save(tmp_path / "gray.jpg")
    base.convert("CMYK").save(tmp_path / "cmyk.jpg")
    base.convert("P").save(tmp_path / "palette.png")
    clear = base.convert("RGBA")
    clear.putalpha(0)
    clear.save(tmp_path / "clear.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    base.save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("gray.jpg", "cmyk.jpg", "palette.png", "clear.png", "rotated.jpg"):
        image = imaging.load_image(tmp_path / name, min_size=(32, 24))
        assert image.mode == "RGB", name
    assert imaging.load_image(tmp_path / "gray.jpg").size == (48, 64)
    assert imaging.load_image(tmp_path / "rotated.jpg").size == (64, 48)
    assert np.asarray(imaging.load_image(tmp_path / "clear.png")).min() == 255  # fully transparent -> white


def test_huge_images_are_decoded_small_and_bombs_are_reported(tmp_path, monkeypatch):
    Image.new("RGB", (6000, 8000), (90, 120, 150)).save(tmp_path / "huge.jpg", quality=80)
    small = imaging.load_image(tmp_path / "huge.jpg", min_size=(128, 96))
    assert small.size == (750, 1000)  # decoded at 1/8 scale, never at 48 megapixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for a decompression bomb
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    decode = functools.partial(imaging.decode_fixed, size=(128, 96))
    found = cache.find_unreadable([tmp_path / "bomb.png", tmp_path / "huge.jpg"], decode)
    assert str(tmp_path / "bomb.png") in found
    assert "decompression bomb" in found[str(tmp_path / "bomb.png")]


# --- layout ---------------------------------------------------------------------------------------------
def test_missing_and_empty_data_directories(tmp_path):
    line = one_error_line(run_script("train.py", "--data_dir", str(tmp_path / "nope"), *FAST, cwd=tmp_path))
    assert f"--data_dir {tmp_path / 'nope'} does not exist" in line
    (tmp_path / "empty").mkdir()
    line = one_error_line(run_script("train.py", "--data_dir", str(tmp_path / "empty"), *FAST, cwd=tmp_path))
    assert f"no images found in {tmp_path / 'empty'}" in line


def test_folder_names_that_do_not_parse_are_listed_together(images, tmp_path):
    first = persons(images)[0]
    for name in ("000999_female_Asian", "000998_woman_Asian_40", "000997_male_Asian_old"):
        shutil.copytree(first, images / name)
    line = one_error_line(run_script("train.py", "--data_dir", str(images), *FAST, cwd=tmp_path))
    assert "3 folder name(s)" in line
    assert "000999_female_Asian (expected" in line
    assert "gender 'woman' is not male or female" in line and "age 'old' is not a whole number" in line


def test_missing_extra_shots_duplicate_ids_and_train_csv_are_warned(images):
    folders = persons(images)
    (folders[0] / "normal.jpg").unlink()
    shutil.copy(folders[1] / "mask1.jpg", folders[1] / "mask6.jpg")
    shutil.copy(folders[1] / "mask1.jpg", folders[1] / "mask1.png")
    pid = folders[2].name.split("_")[0]
    twin = images / f"{pid}_male_Asian_70"
    shutil.copytree(folders[3], twin)
    rows = [
        {"id": f.name.split("_")[0], "gender": "female", "race": "Asian", "age": "99", "path": f.name}
        for f in folders[:6]
    ] + [{"id": "777777", "gender": "male", "race": "Asian", "age": "20", "path": "777777_male_Asian_20"}]
    pd.DataFrame(rows).to_csv(images.parent / "train.csv", index=False)
    warnings = dataset.index_mask_folder(images).warnings
    text = "\n".join(warnings)
    assert f"{folders[0].name} (normal)" in text and "training uses the rest" in text
    assert str(folders[1] / "mask6.jpg") in text and str(folders[1] / "mask1.png") in text
    assert f"{pid} ({folders[2].name}, {twin.name})" in text
    assert "777777_male_Asian_20" in text  # listed in train.csv, absent from the folders
    assert "disagree with their folder name" in text
    data = dataset.MaskSplitByProfileDataset(images, val_ratio=0.5)
    groups = np.asarray(data.persons)
    for seed in range(10):
        data.seed = seed
        train_idx, val_idx = data.split_dataset()
        same = {folders[2].name, twin.name}
        assert same <= set(groups[train_idx]) or same <= set(groups[val_idx])  # never split apart


# --- inference ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(demo_root, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    result = run_script("train.py", "--data_dir", str(demo_root / "train/images"), *FAST, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "model/exp"


@pytest.fixture()
def eval_dir(demo_root, tmp_path):
    return shutil.copytree(demo_root / "eval", tmp_path / "eval")


def infer(run_dir, eval_dir, tmp_path, *extra):
    return run_script(
        "inference.py",
        "--model_dir",
        str(run_dir),
        "--data_dir",
        str(eval_dir),
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
        cwd=tmp_path,
    )


def test_inference_input_errors(run_dir, eval_dir, tmp_path):
    (eval_dir / "info.csv").rename(eval_dir / "info.bak")
    assert f"{eval_dir / 'info.csv'} does not exist" in one_error_line(infer(run_dir, eval_dir, tmp_path))
    (eval_dir / "info.bak").rename(eval_dir / "info.csv")
    lost = sorted((eval_dir / "images").iterdir())[:2]
    for path in lost:
        path.unlink()
    line = one_error_line(infer(run_dir, eval_dir, tmp_path))
    assert "2 ImageID(s)" in line and all(str(p) in line for p in lost)
    assert not (tmp_path / "out/output.csv").exists()


@pytest.mark.parametrize("header_only", ["ImageID,ans\n", "ImageID,ans\n\n", "ImageID\n"])
def test_an_info_csv_that_lists_no_images_is_one_line_and_writes_nothing(run_dir, eval_dir, tmp_path, header_only):
    """It was a numpy broadcasting traceback: an empty submission would otherwise score zero in silence."""
    (eval_dir / "info.csv").write_text(header_only)
    line = one_error_line(infer(run_dir, eval_dir, tmp_path))
    assert line == f"error: {eval_dir / 'info.csv'} lists no images (a header only): restore the competition's info.csv"
    assert not (tmp_path / "out").exists()


def test_unreadable_eval_image(run_dir, eval_dir, tmp_path):
    broken = sorted((eval_dir / "images").iterdir())[0]
    broken.write_bytes(b"")
    line = one_error_line(infer(run_dir, eval_dir, tmp_path))
    assert line.startswith("error: 1 eval image(s) cannot be read") and str(broken) in line


def test_run_directory_without_best_checkpoint(run_dir, eval_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run_dir / "config.json", partial / "config.json")
    line = one_error_line(infer(partial, eval_dir, tmp_path))
    assert f"{partial / 'best.pth'} does not exist" in line


def test_output_directory_that_cannot_be_written(run_dir, eval_dir, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    line = one_error_line(infer(run_dir, eval_dir, tmp_path))
    assert f"--output_dir {blocker} cannot be created ({blocker} is a file, not a folder)" in line


def test_output_csv_is_replaced_atomically(tmp_path, monkeypatch):
    out = tmp_path / "output.csv"
    out.write_text("ImageID,ans\nold.jpg,3\n")

    def half_then_fail(self, f, **kwargs):
        f.write("ImageID,ans\n")
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError):
        inference.write_submission(out, ["a.jpg"], np.array([1]), 18)
    assert out.read_text() == "ImageID,ans\nold.jpg,3\n"


# --- faults ---------------------------------------------------------------------------------------------
def test_disk_full_while_saving_keeps_the_previous_checkpoint(demo_root, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # epoch 1 saved best.pth and last.pth; epoch 2's first save finds the disk full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    args = train.get_parser().parse_args(
        [
            "--data_dir",
            str(demo_root / "train/images"),
            *FAST,
            "--epochs",
            "3",
            "--num_workers",
            "0",
            "--model_dir",
            str(tmp_path / "model"),
        ]
    )
    with pytest.raises(UserError, match=r"no space left on the device to write .*(best|last)\.pth: free some space"):
        train.main(args)
    monkeypatch.setattr(torch, "save", real_save)
    run = tmp_path / "model/exp"
    assert utils.load_checkpoint(run / "best.pth")["epoch"] == 1
    assert utils.load_checkpoint(run / "last.pth")["epoch"] == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_sigkill_at_any_moment_never_leaves_a_truncated_checkpoint(demo_root, tmp_path):
    rng = np.random.default_rng(0)
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data_dir",
        str(demo_root / "train/images"),
        *FAST,
        "--epochs",
        "50",
        "--num_workers",
        "0",
        "--resize",
        "32",
        "24",
    ]
    for attempt in range(3):
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = tmp_path / "model" / ("exp" if attempt == 0 else f"exp{attempt + 1}")
        deadline = time.time() + 120
        while not (run / "last.pth").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in a later epoch, maybe mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for name in ("best.pth", "last.pth"):
            assert utils.load_checkpoint(run / name)["epoch"] >= 1  # loadable, whole
    assert len(list((tmp_path / "model").iterdir())) == 3  # each run got its own directory


def test_damaged_config_json(run_dir, eval_dir, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    shutil.copy(run_dir / "best.pth", damaged / "best.pth")
    (damaged / "config.json").write_text('{"model": "BaseModel", "num_cl')  # cut off mid-write by hand-editing
    line = one_error_line(infer(damaged, eval_dir, tmp_path))
    assert f"{damaged / 'config.json'} is damaged" in line


# --- a path of the wrong kind: a file where a folder is wanted, or a folder where a file is ------------------------
WRONG_KIND = {
    "train --data_dir file": (["train.py", "--data_dir", "FILE"], "--data_dir FILE is a file, not a folder"),
    "runs.py file": (["runs.py", "FILE"], "FILE is a file, not a folder"),
    "csv --image_root file": (
        ["train.py", "--dataset", "CSVDataset", "--data_dir", "labels.csv", "--image_root", "FILE"],
        "--image_root FILE is a file, not a folder",
    ),
    "train --config folder": (["train.py", "--config", "DIR"], "--config DIR is a folder, not a file"),
    "train --label_fixes folder": (["train.py", "--label_fixes", "DIR"], "--label_fixes DIR is a folder, not a file"),
    "train --pretrained_path folder": (
        ["train.py", "--pretrained_path", "DIR"],
        "--pretrained_path DIR is a folder, not a file",
    ),
    "train --pseudo_labels folder": (["train.py", "--pseudo_labels", "DIR"], "DIR is a folder, not a file"),
    "runs.py --csv folder": (["runs.py", "--csv", "DIR", "DIR"], "--csv DIR is a folder, not a file"),
    "runs.py --csv under a file": (["runs.py", "--csv", "FILE/x.csv", "DIR"], "FILE is a file, not a folder"),
    "train --backbone folder": (["train.py", "--backbone", "DIR.py:Net"], "the file DIR.py is a folder, not a file"),
}


@pytest.mark.parametrize("case", sorted(WRONG_KIND))
def test_a_path_of_the_wrong_kind_says_which_kind_it_is(case, tmp_path):
    """'does not exist' sent users looking for a typo in a path that is there: the line says what it is instead."""
    (tmp_path / "FILE").write_text("x\n")
    (tmp_path / "DIR").mkdir()
    (tmp_path / "DIR.py").mkdir()
    (tmp_path / "labels.csv").write_text("path,label\na.png,x\n")
    script, *args = WRONG_KIND[case][0]
    line = one_error_line(run_script(script, *args, cwd=tmp_path))
    assert WRONG_KIND[case][1] in line, line
    assert "does not exist" not in line


def test_no_writer_replaces_a_folder(tmp_path):
    """Every file the project writes goes through atomic_write: a folder in the file's place is one line, and the
    folder and its files stay."""
    (tmp_path / "out.csv").mkdir()
    (tmp_path / "out.csv/keep.txt").write_text("kept")
    with pytest.raises(UserError, match=r"out.csv is a folder, not a file: move it away or write the file elsewhere"):
        utils.atomic_write(tmp_path / "out.csv", lambda f: f.write("x"))
    assert (tmp_path / "out.csv/keep.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temporary file left


def test_an_eval_folder_whose_info_csv_is_a_folder_says_so(tmp_path):
    (tmp_path / "eval/info.csv").mkdir(parents=True)
    (tmp_path / "eval/images").mkdir()
    with pytest.raises(UserError, match=r"eval/info.csv is a folder, not a file: pass the eval directory"):
        evaldata.find_eval_images(tmp_path / "eval", None, {})
