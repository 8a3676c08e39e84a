"""Any data set: class folders, CSV labels, grouped and stratified splits, and person-level k-fold."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
import evaldata
import imaging
import labels
import splits
import subset as subset_module
import utils
from utils import UserError

DATASET_CLASSES = utils.module_classes(dataset, lambda c: hasattr(c, "split_dataset"))
GROUP_PATTERN = r"^(.+?)_\d+"  # "p07_2.png" -> group "p07"


def save_image(path: Path, shade: int = 0) -> None:
    """A 16x12 image; PIL picks PNG or JPEG from the extension (any case)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (shade % 256, 80, 160)).save(
        path, format="JPEG" if "jp" in path.suffix.lower() else "PNG"
    )


def make_class_folders(root: Path, files: dict[str, list[str]]) -> Path:
    """`root/<class>/<name>` for every class and file name given."""
    for name, stems in files.items():
        for i, stem in enumerate(stems):
            save_image(root / name / stem, i)
    return root


def grouped_files(n_groups: int = 24, rare_groups: int = 4) -> dict[str, list[str]]:
    """Photos of `n_groups` scenes with 1-3 faces each, spread over classes; the first `rare_groups` scenes each
    hold the one 'rare' face. Like facemask3: a scene's faces may have different classes."""
    files: dict[str, list[str]] = {"common": [], "other": [], "rare": []}
    for g in range(n_groups):
        for i in range(1 + g % 3):
            files["other" if (g + i) % 4 == 0 else "common"].append(f"s{g:02d}_{i}.png")
        if g < rare_groups:
            files["rare"].append(f"s{g:02d}_9.png")
    return files


def make_mask_folder(root: Path, n_persons: int = 24) -> Path:
    """The competition layout with tiny images: strata (gender x age band) of unequal size; the first four
    persons are the only men aged 60 or more."""
    for p in range(n_persons):
        gender, age = ("male", 60 + p) if p < 4 else ("female" if p % 3 else "male", 20 + p * 7 % 40)
        for stem in labels.MASK_FILES:
            save_image(root / f"{p:06d}_{gender}_Asian_{age}" / f"{stem}.jpg", p)
    return root


def make_csv(path: Path, rows: list[tuple[str, ...]], header: str = "file,label,source_image") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    return path


def csv_from_folders(root: Path) -> Path:
    """A facemask3-style metadata.csv beside `root`: file relative to `root`, label, source_image."""
    rows = [
        (p.relative_to(root).as_posix(), p.parent.name, p.name.split("_")[0] + ".png")
        for p in sorted(root.rglob("*.png"))
    ]
    return make_csv(root.parent / "metadata.csv", rows)


# A tiny instance of every dataset class, with groups; the k-fold tests run on each.
BUILDERS: dict[str, Callable[[Path], dataset.Dataset]] = {
    "MaskBaseDataset": lambda tmp: dataset.MaskBaseDataset(make_mask_folder(tmp / "masks")),
    "MaskSplitByProfileDataset": lambda tmp: dataset.MaskSplitByProfileDataset(make_mask_folder(tmp / "masks")),
    "ImageFolderDataset": lambda tmp: dataset.ImageFolderDataset(
        make_class_folders(tmp / "images", grouped_files()), group_pattern=GROUP_PATTERN
    ),
    "CSVDataset": lambda tmp: dataset.CSVDataset(
        csv_from_folders(make_class_folders(tmp / "images", grouped_files())),
        image_column="file",
        group_column="source_image",
        image_root=tmp / "images",
    ),
}


def fold_groups(data: dataset.Dataset) -> np.ndarray:
    """What no fold may split: the person for the mask datasets, else the dataset's group."""
    return np.asarray(data.persons if hasattr(data, "persons") else data.groups)


def test_every_dataset_class_is_covered_by_the_kfold_tests():
    assert set(BUILDERS) == set(DATASET_CLASSES)


# --- ImageFolderDataset ----------------------------------------------------------------------------------
def test_image_folder_classes_are_sorted_and_labels_follow_the_folders(tmp_path, capsys):
    root = make_class_folders(tmp_path, {"zebra": ["a.png", "b.JPG"], "ant": ["c.jpeg"], "cat": ["d.PNG", "e.png"]})
    save_image(root / "cat" / "nested" / "f.png")  # a subfolder of a class folder still belongs to the class
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    save_image(root / "cat" / "._d.png")  # a macOS resource fork, never an image
    (root / "empty").mkdir()
    (root / ".hidden").mkdir()
    save_image(root / ".hidden" / "x.png")
    data = dataset.ImageFolderDataset(root)
    assert data.class_names == ["ant", "cat", "zebra"] and data.num_classes == 3
    by_name = {p.name: data.label_text(label) for p, label in zip(data.image_paths, data.labels, strict=True)}
    assert by_name == {
        "a.png": "zebra",
        "b.JPG": "zebra",
        "c.jpeg": "ant",
        "d.PNG": "cat",
        "e.png": "cat",
        "f.png": "cat",
    }
    assert data.labels.dtype.kind == "i" and len(data) == 6
    assert len(set(data.groups)) == 6 and not data.has_groups  # without a pattern, every image is its own group
    err = capsys.readouterr().err
    assert "notes.txt" in err and "empty" in err and "DS_Store" not in err


def test_image_folder_groups_come_from_the_pattern_and_stay_on_one_side(tmp_path):
    data = dataset.ImageFolderDataset(
        make_class_folders(tmp_path, grouped_files()), val_ratio=0.25, seed=3, group_pattern=GROUP_PATTERN
    )
    assert data.has_groups and len(set(data.groups)) == 24
    assert {g for p, g in zip(data.image_paths, data.groups, strict=True) if p.name.startswith("s05_")} == {"s05"}
    train, val = data.split_dataset()
    groups = np.asarray(data.groups)
    assert not set(groups[train]) & set(groups[val])
    assert len(set(groups[val])) == 6  # 25% of 24 groups
    assert sorted([*train, *val]) == list(range(len(data)))
    # The four groups holding the rare class are a stratum: exactly one of them is held out.
    assert (data.labels[val] == data.class_names.index("rare")).sum() == 1


def test_split_modes_choose_between_image_and_group_level(tmp_path):
    root = make_class_folders(tmp_path, grouped_files())
    groups = lambda d, idx: set(np.asarray(d.groups)[idx])  # noqa: E731
    for split in ("auto", "grouped", "both"):
        data = dataset.ImageFolderDataset(root, val_ratio=0.5, seed=0, split=split, group_pattern=GROUP_PATTERN)
        train, val = data.split_dataset()
        assert not groups(data, train) & groups(data, val), split
    data = dataset.ImageFolderDataset(root, val_ratio=0.5, seed=0, split="stratified", group_pattern=GROUP_PATTERN)
    train, val = data.split_dataset()
    assert groups(data, train) & groups(data, val)  # image-level: a scene's faces land on both sides
    assert abs(np.bincount(data.labels[val]) - np.bincount(data.labels[train])).max() <= 1  # stratified by class


def test_image_folder_mistakes_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        dataset.ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        dataset.ImageFolderDataset(tmp_path)
    save_image(tmp_path / "a" / "x_1.png")
    with pytest.raises(UserError, match="one class only"):
        dataset.ImageFolderDataset(tmp_path)
    save_image(tmp_path / "b" / "y_1.png")
    save_image(tmp_path / "b" / "odd.png")
    with pytest.raises(UserError, match=r"--group_pattern .* does not match 1 file name\(s\): odd.png"):
        dataset.ImageFolderDataset(tmp_path, group_pattern=GROUP_PATTERN)
    with pytest.raises(UserError, match="not a valid regular expression"):
        dataset.ImageFolderDataset(tmp_path, group_pattern="([")
    with pytest.raises(UserError, match="--split grouped needs a group per image: pass --group_pattern"):
        dataset.ImageFolderDataset(tmp_path, split="grouped")
    with pytest.raises(UserError, match="--split 'group' is unknown"):
        dataset.ImageFolderDataset(tmp_path, split="group")


def test_remove_drops_an_image_from_every_list_and_subsets_read_any_dataset(tmp_path):
    data = BUILDERS["ImageFolderDataset"](tmp_path)
    gone = data.image_paths[3]
    expected = [(p, label, g) for p, label, g in zip(data.image_paths, data.labels, data.groups, strict=True)]
    data.remove({str(gone)})
    assert list(zip(data.image_paths, data.labels, data.groups, strict=True)) == [e for e in expected if e[0] != gone]
    subset = subset_module.ImageSubset(data, [0, 5], np.asarray, size=(12, 16))
    pixels, target = subset[1]
    assert pixels.shape == (12, 16, 3) and target == data.labels[5]


def test_dataset_re_exports_nothing_of_labels_splits_or_imaging():
    # One home per name: callers import the label rules, the splits and the decoding from the modules that own them.
    owned = {
        name: module.__name__
        for module in (labels, splits, imaging)
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and getattr(value, "__module__", module.__name__) == module.__name__  # defined there, or a constant
    }
    assert {"decode", "encode", "MASK_FILES", "SPLITS", "check_split_args", "compute_mean_std"} <= set(owned)
    assert {name: home for name, home in owned.items() if hasattr(dataset, name)} == {}


def test_inference_and_the_folder_dataset_accept_the_same_files(tmp_path):
    root = tmp_path / "photos"
    kept = ["a.JPG", "b.png", "c.jpeg", "sub/d.Png"]
    for name in ("cat", "dog"):
        for file in kept:
            save_image(root / name / file)
        (root / name / "notes.txt").write_text("not an image")
        for hidden in (".hidden.jpg", "._x.jpg", ".cache/e.jpg"):  # hidden files, macOS forks, hidden folders
            (root / name / hidden).parent.mkdir(parents=True, exist_ok=True)
            (root / name / hidden).write_bytes(b"")
    save_image(root / ".trash" / "f.jpg")  # a hidden folder is no class either
    folders = dataset.ImageFolderDataset(root)
    found = evaldata.find_eval_images(root, None, {})
    expected = sorted(f"{name}/{file}" for name in ("cat", "dog") for file in kept)
    assert sorted(p.relative_to(root).as_posix() for p in folders.image_paths) == expected
    assert found.image_ids == expected and sorted(found.image_paths) == sorted(folders.image_paths)
    assert not dataset.is_image(root / "cat/notes.txt") and dataset.is_image(Path("x/y.TIFF"), Path("x"))
    assert not dataset.is_image(root / "cat/.cache/e.jpg", root) and dataset.is_image(root / "cat/.cache/e.jpg")


# --- CSVDataset ------------------------------------------------------------------------------------------
def test_csv_paths_are_relative_to_the_csv_and_string_labels_become_sorted_classes(tmp_path):
    for name in ("a.png", "b.jpg", "sub/c.png", "d.png"):
        save_image(tmp_path / "data" / name)
    rows = [("a.png", "dog"), ("b.jpg", "cat"), ("sub/c.png", "bird"), ("d.png", "cat")]
    data = dataset.CSVDataset(make_csv(tmp_path / "data" / "labels.csv", rows, "path,label"))
    assert data.class_names == ["bird", "cat", "dog"] and data.num_classes == 3
    assert data.image_paths == [tmp_path / "data" / name for name, _ in rows]
    assert [data.label_text(label) for label in data.labels] == ["dog", "cat", "bird", "cat"]
    assert not data.has_groups
    # The same data found through its folder (a SageMaker channel is a folder), with the image column found too.
    assert dataset.CSVDataset(tmp_path / "data").image_paths == data.image_paths


def test_class_names_written_two_ways_are_kept_apart_with_a_warning(tmp_path, capsys):
    """'Cat' and 'cat', '7' and '07', folders 'Dog' and 'dog ': one class written two ways trains as two."""
    names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    for name in names:
        save_image(tmp_path / "data" / name)
    rows = list(zip(names, ["cat", "Cat", "dog", "7", "07", "bird"], strict=True))
    data = dataset.CSVDataset(make_csv(tmp_path / "data" / "labels.csv", rows, "path,label"))
    assert data.num_classes == 6  # nothing merged behind the user's back
    err = capsys.readouterr().err
    assert "warning: classes 'Cat', 'cat' of " in err and "warning: classes '07', '7' of " in err
    assert err.count("warning: classes") == 2 and "train as 2 classes; if they are one class" in err
    folders = make_class_folders(tmp_path / "folders", {"Dog": ["a.png"], "dog ": ["b.png"], "owl": ["c.png"]})
    dataset.ImageFolderDataset(folders)
    assert "warning: classes 'Dog', 'dog ' of " in capsys.readouterr().err
    dataset.CSVDataset(make_csv(tmp_path / "data" / "ok.csv", rows[2:4] + rows[5:], "path,label"))
    assert "warning" not in capsys.readouterr().err


def test_csv_image_root_and_whole_number_labels_sort_as_numbers(tmp_path):
    for i in range(4):
        save_image(tmp_path / "pictures" / f"{i}.png")
    csv = make_csv(
        tmp_path / "meta" / "train.csv", [("0.png", "10"), ("1.png", "2"), ("2.png", "0"), ("3.png", "2")], "img,y"
    )
    data = dataset.CSVDataset(csv, image_column="img", label_column="y", image_root=tmp_path / "pictures")
    assert data.class_names == ["0", "2", "10"]
    assert data.labels.tolist() == [2, 1, 0, 1]


def test_csv_group_column_keeps_groups_together_like_facemask3(tmp_path):
    root = make_class_folders(tmp_path / "images", grouped_files())
    data = dataset.CSVDataset(
        csv_from_folders(root), val_ratio=0.25, image_column="file", group_column="source_image", image_root=root
    )
    assert data.has_groups and len(set(data.groups)) == 24 and data.class_names == ["common", "other", "rare"]
    train, val = data.split_dataset()
    groups = np.asarray(data.groups)
    assert not set(groups[train]) & set(groups[val])
    # The folder dataset with the file-name pattern sees the same images, labels and groups.
    folders = dataset.ImageFolderDataset(root, val_ratio=0.25, group_pattern=GROUP_PATTERN)
    seen_by_folders = zip(folders.image_paths, folders.labels, [g + ".png" for g in folders.groups], strict=True)
    seen_by_csv = zip(data.image_paths, data.labels, data.groups, strict=True)
    assert sorted(seen_by_folders) == sorted(seen_by_csv)


def test_csv_mistakes_are_one_clear_line(tmp_path):
    save_image(tmp_path / "a.png")
    with pytest.raises(UserError, match="CSV file .*nope.csv does not exist"):
        dataset.CSVDataset(tmp_path / "nope.csv")
    csv = make_csv(tmp_path / "t.csv", [("a.png", "x", "s")], "file,label,source")
    with pytest.raises(UserError, match=r"has no column 'kind' \(--label_column\); its columns: file, label, source"):
        dataset.CSVDataset(csv, label_column="kind")
    with pytest.raises(UserError, match=r"no column 'scene' \(--group_column\)"):
        dataset.CSVDataset(csv, group_column="scene")
    with pytest.raises(UserError, match="pass --image_column"):
        dataset.CSVDataset(make_csv(tmp_path / "u.csv", [("a.png", "x")], "picture,label"))
    rows = [(f"missing{i}.png", "x") for i in range(12)] + [("a.png", "y")]
    with pytest.raises(UserError, match=r"12 image\(s\) listed in .* missing0.png, .*missing9.png, and 2 more") as e:
        dataset.CSVDataset(make_csv(tmp_path / "v.csv", rows, "path,label"))
    assert "\n" not in str(e.value) and "--image_root" in str(e.value)
    with pytest.raises(UserError, match="no label"):
        dataset.CSVDataset(make_csv(tmp_path / "w.csv", [("a.png", "")], "path,label"))
    with pytest.raises(UserError, match=r"is a folder with 4 CSV files \(t.csv, u.csv, v.csv, w.csv\)"):
        dataset.CSVDataset(tmp_path)


# --- k-fold, for every dataset class -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DATASET_CLASSES))
def test_kfold_keeps_groups_whole_covers_each_image_once_and_matches_split_dataset(name, tmp_path):
    data = BUILDERS[name](tmp_path)
    folds = data.fold_ids(4)
    assert folds.shape == (len(data),) and set(folds.tolist()) == {0, 1, 2, 3}
    groups = fold_groups(data)
    assert all(len(set(folds[groups == g])) == 1 for g in set(groups))  # no group in two folds
    seen = []
    for k in range(4):
        train, val = data.split_dataset(fold=k, n_splits=4)
        assert np.array_equal(val, np.flatnonzero(folds == k))
        assert sorted([*train, *val]) == list(range(len(data)))
        seen += val.tolist()
    assert sorted(seen) == list(range(len(data)))  # every image in exactly one validation fold


@pytest.mark.parametrize("name", sorted(DATASET_CLASSES))
def test_kfold_is_balanced_and_deterministic_per_seed(name, tmp_path):
    data = BUILDERS[name](tmp_path)
    folds = data.fold_ids(4)
    _, group_sizes = np.unique(fold_groups(data), return_counts=True)
    assert np.abs(np.bincount(folds) - len(data) / 4).max() <= group_sizes.max()  # within one group of even
    # Stratified: the four persons of the rarest stratum, or the four scenes holding the rare class, one per fold.
    if hasattr(data, "persons"):
        rare = np.asarray(data.gender_labels) * 3 + [labels.age_band(a) for a in data.ages] == 2
    else:
        rare = data.labels == data.class_names.index("rare")
    assert np.bincount(folds[rare], minlength=4).tolist() == [rare.sum() // 4] * 4
    assert np.array_equal(BUILDERS[name](tmp_path / "again").fold_ids(4), folds)
    data.seed += 1
    assert not np.array_equal(data.fold_ids(4), folds)


@pytest.mark.parametrize("name", sorted(DATASET_CLASSES))
def test_kfold_mistakes_name_the_flag(name, tmp_path):
    data = BUILDERS[name](tmp_path)
    with pytest.raises(UserError, match=r"--n_splits 500 needs at least 500 .*; found \d+: lower --n_splits"):
        data.fold_ids(500)
    with pytest.raises(UserError, match="--fold 5 does not exist with --n_splits 5: use 0 to 4"):
        data.split_dataset(fold=5)
    with pytest.raises(UserError, match="--n_splits 1"):
        data.split_dataset(fold=0, n_splits=1)


def test_mask_kfold_is_by_person_even_where_the_holdout_is_by_image(tmp_path):
    data = BUILDERS["MaskBaseDataset"](tmp_path)
    train, val = data.split_dataset()
    persons = np.asarray(data.persons)
    assert set(persons[train]) & set(persons[val])  # the seed baseline's leaky holdout is kept
    folds = data.fold_ids(3)
    assert all(len(set(folds[persons == p])) == 1 for p in set(persons))
    assert np.array_equal(folds, dataset.MaskSplitByProfileDataset(data.data_dir).fold_ids(3))
    # Asked for explicitly, the image-level split applies to the folds too.
    image_level = dataset.MaskBaseDataset(data.data_dir, split="stratified").fold_ids(3)
    assert any(len(set(image_level[persons == p])) > 1 for p in set(persons))


def test_kfold_ids_share_every_stratum_evenly():
    rng = np.random.default_rng(0)
    strata = rng.choice(6, size=200, p=[0.3, 0.25, 0.05, 0.2, 0.15, 0.05])
    groups, item_strata = np.repeat(np.arange(200), 7), np.repeat(strata, 7)
    folds = splits.kfold_ids(groups, item_strata, 5, seed=1, noun="persons")[::7]
    for level in range(6):
        per_fold = np.bincount(folds[strata == level], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (level, per_fold)


def test_a_group_is_stratified_by_the_rarest_class_it_holds():
    groups = ["a", "a", "b", "b", "c", "d"]
    labels = np.array([1, 0, 1, 1, 2, 1])  # class 0 once, class 2 once, class 1 four times
    assert splits.rarest_class_strata(groups, labels).tolist() == [0, 0, 1, 1, 2, 1]
