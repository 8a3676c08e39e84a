"""Label parsing and the 18-class encoding of the mask competition."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import dataset
import labels
from utils import UserError


def test_encode_decode_round_trip_covers_all_18_classes():
    classes = [labels.encode(m, g, a) for m in range(3) for g in range(2) for a in range(3)]
    assert sorted(classes) == list(range(18))
    for label in range(18):
        assert labels.encode(*labels.decode(label)) == label
    arr = np.arange(18)
    assert np.array_equal(labels.encode(*labels.decode(arr)), arr)


def test_tasks_are_the_fields_of_the_encoding_in_order():
    # A multi-head model's class is the row-major index into the grid of its task sizes (model.combine_tasks).
    assert list(labels.TASKS) == ["mask", "gender", "age"]
    sizes = tuple(labels.TASKS.values())
    assert sizes == (len(labels.MASK_NAMES), len(labels.GENDER_NAMES), len(labels.age_names()))
    every = np.arange(18)
    assert np.array_equal(np.ravel_multi_index(labels.decode(every), sizes), every)
    assert labels.model_kwargs() == {"tasks": labels.TASKS}
    labels.model_kwargs()["tasks"]["mask"] = 5  # a caller's copy: the rule itself cannot be changed through it
    assert labels.TASKS["mask"] == 3


def test_class_names_follow_the_encoding():
    names = labels.mask_class_names()
    assert names[0] == "wear/male/<30"
    assert names[labels.encode(1, 1, 2)] == "incorrect/female/>=60"
    assert names[17] == "not wear/female/>=60"


@pytest.mark.parametrize(("age", "band"), [(18, 0), (29, 0), (30, 1), (59, 1), (60, 2), (75, 2)])
def test_age_bands(age, band):
    assert labels.age_band(age) == band


def test_age_bounds_are_configurable():
    assert labels.age_band(58, (30, 58)) == 2
    assert labels.age_band(57, (30, 58)) == 1


def test_parse_profile():
    assert labels.parse_profile("000004_female_Asian_54") == ("000004", 1, "Asian", 54)
    assert labels.parse_profile("006959_MALE_Asian_19")[1] == 0
    for bad in ("000004_female_Asian", "000004_woman_Asian_54", "000004_female_Asian_old"):
        with pytest.raises(ValueError):
            labels.parse_profile(bad)


def _write(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)


def test_indexing_reads_labels_any_extension_case_and_skips_hidden(tmp_path):
    person = tmp_path / "000001_female_Asian_61"
    for name in ("mask1.jpg", "mask2.JPG", "mask3.jpeg", "mask4.png", "mask5.PNG", "incorrect_mask.jpg", "normal.jpg"):
        _write(person / name)
    _write(person / "._mask1.jpg")  # macOS resource fork
    _write(person / ".hidden.jpg")
    (person / "notes.txt").write_text("not an image")
    _write(tmp_path / ".ipynb_checkpoints" / "mask1.jpg")
    data = dataset.MaskSplitByProfileDataset(tmp_path)
    assert len(data) == 7
    by_stem = {p.stem.lower(): int(lbl) for p, lbl in zip(data.image_paths, data.labels, strict=True)}
    assert by_stem["mask4"] == labels.encode(0, 1, 2)
    assert by_stem["incorrect_mask"] == labels.encode(1, 1, 2)
    assert by_stem["normal"] == labels.encode(2, 1, 2)


def test_instances_do_not_share_lists(tmp_path, demo_root):
    small = tmp_path / "one"
    _write(small / "000001_male_Asian_20" / "mask1.jpg")
    first = dataset.MaskSplitByProfileDataset(demo_root / "train/images")
    second = dataset.MaskSplitByProfileDataset(small)
    assert len(second) == 1
    assert len(first) == 12 * 7
    assert first.image_paths is not second.image_paths


def test_malformed_folder_names_are_reported_together(tmp_path):
    _write(tmp_path / "000001_male_Asian_20" / "mask1.jpg")
    _write(tmp_path / "bad_folder" / "mask1.jpg")
    _write(tmp_path / "000002_robot_Asian_20" / "mask1.jpg")
    with pytest.raises(UserError, match=r"2 folder name\(s\).*000002_robot_Asian_20.*bad_folder"):
        dataset.MaskSplitByProfileDataset(tmp_path)


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no images found"):
        dataset.MaskSplitByProfileDataset(tmp_path)
