"""--label_fixes: hand-made corrections of gender, age, mask or class labels, applied while indexing."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from test_datasets import GROUP_PATTERN, csv_from_folders, grouped_files, make_class_folders, make_mask_folder

import dataset
import utils
from utils import UserError

DATASET_CLASSES = utils.module_classes(dataset, lambda c: hasattr(c, "split_dataset"))


def write_fixes(path: Path, *rows: str, header: str = "id,field,value") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def person_rows(data: dataset.MaskBaseDataset, pid: str) -> np.ndarray:
    return np.asarray(data.groups) == pid


@pytest.mark.parametrize("name", sorted(DATASET_CLASSES))
def test_every_dataset_class_takes_label_fixes(name):
    # train.py passes only the flags a class's signature names, so the keyword must be exactly this.
    assert "label_fixes" in inspect.signature(DATASET_CLASSES[name]).parameters


def test_gender_and_age_fixes_change_exactly_the_named_persons(tmp_path, capsys):
    root = make_mask_folder(tmp_path / "masks", n_persons=8)
    before = dataset.MaskSplitByProfileDataset(root)
    fixes = write_fixes(
        tmp_path / "fixes.csv",
        "# person 5 is a man; person 6 was typed as 22",
        "000005,gender,Male",
        "",
        "000006,age,61",
        "000007,age,29",  # already 29: a row that changes nothing
        header="id,field,value,note",
    )
    capsys.readouterr()
    after = dataset.MaskSplitByProfileDataset(root, label_fixes=fixes)
    assert capsys.readouterr().out.strip() == (
        f"Label fixes from {fixes}: 3 row(s), 14 image label(s) changed (2 persons)"
    )
    five, six = person_rows(after, "000005"), person_rows(after, "000006")
    assert (np.asarray(before.gender_labels)[five] == 1).all() and (np.asarray(after.gender_labels)[five] == 0).all()
    assert (np.asarray(after.ages)[six] == 61).all()
    # 18 classes: male is 3 below female, and 22 -> 61 moves the age band from 0 to 2.
    expected = before.labels.copy()
    expected[five] -= 3
    expected[six] += 2
    assert np.array_equal(after.labels, expected)
    assert after.persons == before.persons and after.image_paths == before.image_paths  # the files stay as they are
    assert after.label_fix_report == {
        "file": str(fixes),
        "rows": 3,
        "images_changed": 14,
        "groups_changed": 2,
        "changes": [["000005", "gender", "female", "male"], ["000006", "age", "22", "61"]],
    }
    assert before.label_fix_report is None


def test_mask_fix_by_path_changes_that_image_only(tmp_path):
    root = make_mask_folder(tmp_path / "masks", n_persons=8)
    before = dataset.MaskSplitByProfileDataset(root)
    shot = root / "000003_male_Asian_63" / "mask2.jpg"
    normal = root / "000004_female_Asian_48" / "normal.jpg"
    fixes = write_fixes(
        tmp_path / "fixes.csv",
        "000003_male_Asian_63/mask2.jpg,mask,incorrect",  # relative to the data folder
        f"{normal},mask,mask1",  # absolute; a shot's name means its mask value
    )
    after = dataset.MaskSplitByProfileDataset(root, label_fixes=fixes)
    expected = before.labels.copy()
    expected[before.image_paths.index(shot)] += 6  # wear -> incorrect
    expected[before.image_paths.index(normal)] -= 12  # not wear -> wear
    assert np.array_equal(after.labels, expected)
    assert after.label_fix_report["images_changed"] == 2 and after.label_fix_report["groups_changed"] == 2


@pytest.mark.parametrize(("name", "group_id"), [("ImageFolderDataset", "s02"), ("CSVDataset", "s02.png")])
def test_class_label_fix_by_path_and_by_group(name, group_id, tmp_path, capsys):
    root = make_class_folders(tmp_path / "images", grouped_files())
    if name == "ImageFolderDataset":
        build = lambda **kw: dataset.ImageFolderDataset(root, group_pattern=GROUP_PATTERN, **kw)  # noqa: E731
    else:
        table = csv_from_folders(root)
        build = lambda **kw: dataset.CSVDataset(  # noqa: E731
            table, image_column="file", group_column="source_image", image_root=root, **kw
        )
    before = build()
    fixes = write_fixes(tmp_path / "fixes.csv", "common/s01_0.png,label,other", f"{group_id},label,rare")
    after = build(label_fixes=fixes)
    names = [p.relative_to(root).as_posix() for p in after.image_paths]
    expected = before.labels.copy()
    expected[names.index("common/s01_0.png")] = before.class_names.index("other")
    in_group = np.asarray(after.groups) == group_id
    expected[in_group] = before.class_names.index("rare")  # s02_9.png was rare already
    assert np.array_equal(after.labels, expected) and after.labels.dtype == np.int64
    assert (before.labels != after.labels).sum() == 4 and in_group.sum() == 4
    assert after.label_fix_report["changes"] == [
        ["common/s01_0.png", "label", "common", "other"],
        [group_id, "label", "common|other", "rare"],
    ]
    assert capsys.readouterr().out.strip().endswith("2 row(s), 4 image label(s) changed (2 groups)")


GOOD_MASK_ROW = "000001,gender,female"  # row 2 of every bad file: valid, and never applied
BAD_ROWS = {
    "unknown id": ("mask", "000999,gender,male", r"id 000999 is not a person in .*masks; correct the id"),
    "zeros lost": ("mask", "3,age,40", r"id 3 is not a person in .*\(did you mean 000003\?"),
    "unknown path": ("mask", "000001_male_Asian_61/mask9.jpg,mask,wear", r"\S+/mask9.jpg names no image .*masks;"),
    "unknown field": ("mask", "000001,race,Asian", r"field 'race' cannot be fixed; use one of gender, age, mask"),
    "bad gender": ("mask", "000002,gender,x", r"gender 'x' is not male or female; correct the value"),
    "age not a number": ("mask", "000002,age,old", r"age 'old' is not a whole number of years"),
    "negative age": ("mask", "000002,age,-4", r"age '-4' is not a whole number of years"),
    "bad mask": ("mask", "000001_male_Asian_61/mask1.jpg,mask,half", r"mask 'half' is not wear, incorrect or normal"),
    "mask by id": ("mask", "000001,mask,wear", r"mask is a label of one image, not of 000001: give the image's path"),
    "no value": ("mask", "000002,age,", r"no value; write id,field,value"),
    "conflict": ("mask", "000001,gender,male", r"000001 gender is set to female on row 2 already"),
    "unknown class": ("folder", "common/s01_0.png,label,dog", r"class 'dog' is not one of common, other, rare"),
    "field of masks": ("folder", "common/s01_0.png,gender,male", r"field 'gender' cannot be fixed; use one of label"),
    "no groups": ("folder", "s01,label,rare", r"s01 is not an image under .*no group ids \(pass --group_pattern\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_is_named_and_nothing_changes(case, tmp_path):
    kind, row, message = BAD_ROWS[case]
    if kind == "mask":
        data = dataset.MaskSplitByProfileDataset(make_mask_folder(tmp_path / "masks", n_persons=8))
        good = GOOD_MASK_ROW
    else:
        data = dataset.ImageFolderDataset(make_class_folders(tmp_path / "images", grouped_files()))
        good = "other/s00_0.png,label,common"
    labels = data.labels.copy()
    # Comments and blank lines count as rows, as a spreadsheet shows them: the bad row is row 5.
    fixes = write_fixes(tmp_path / "fixes.csv", good, "# checked by hand", "", row)
    with pytest.raises(UserError, match=rf"^--label_fixes {re.escape(str(fixes))} row 5: {message}"):
        data.fix_labels(fixes)
    assert np.array_equal(data.labels, labels)  # every row is checked before the first is applied
    with pytest.raises(UserError, match="row 5"):
        type(data)(data.data_dir, label_fixes=fixes)


def test_a_file_that_is_not_a_fix_list_is_named(tmp_path):
    root = make_mask_folder(tmp_path / "masks", n_persons=4)
    with pytest.raises(UserError, match=r"fixes.csv does not exist"):
        dataset.MaskBaseDataset(root, label_fixes=tmp_path / "fixes.csv")
    bad_header = write_fixes(tmp_path / "fixes.csv", "000001,male", header="# fixes\nid,gender")
    with pytest.raises(UserError, match=r"fixes.csv row 2: the header must name the columns id,field,value"):
        dataset.MaskBaseDataset(root, label_fixes=bad_header)
    # Every row deleted (the template with none confirmed) would train as if the file had not been given.
    header_only = write_fixes(tmp_path / "fixes.csv", "# none confirmed", "")
    with pytest.raises(UserError, match=r"fixes.csv has a header and no fixes: add one id,field,value row"):
        dataset.MaskBaseDataset(root, label_fixes=header_only)
    with pytest.raises(UserError, match=r"fixes.csv is empty"):
        dataset.MaskBaseDataset(root, label_fixes=write_fixes(tmp_path / "fixes.csv", header=""))


def test_the_split_follows_the_fixed_gender(tmp_path):
    """Persons 0-3 are the only men aged 60+; two of them fixed to women form a stratum of their own."""
    root = make_mask_folder(tmp_path / "masks")
    fixes = write_fixes(tmp_path / "fixes.csv", "000000,gender,female", "000001,gender,female")
    data = dataset.MaskSplitByProfileDataset(root, val_ratio=0.5, label_fixes=fixes)
    groups, strata, _ = data.split_arrays()
    old_men = np.isin(groups, ["000002", "000003"])
    assert (strata[np.isin(groups, ["000000", "000001"])] == 1 * 3 + 2).all()  # female x 60+
    assert (strata[old_men] == 0 * 3 + 2).all()
    # Half the persons of every two-person stratum are held out: one of the fixed women, one of the old men.
    for seed in range(6):
        data.seed = seed
        held_out = set(groups[data.split_dataset()[1]])
        assert len(held_out & {"000000", "000001"}) == 1 and len(held_out & {"000002", "000003"}) == 1, seed
