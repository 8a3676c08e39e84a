"""runs.py: the table of runs (one row per run, k-fold included; the flags that differ) and the label suspects found
in out-of-fold predictions (a synthetic oof.csv: no training)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import labels
import runs
import utils
from conftest import run_script, tiny_run_args

SHOTS = [*(f"mask{i}" for i in range(1, 6)), "incorrect_mask", "normal"]


@pytest.fixture(scope="module")
def model_dir(demo_root, tmp_path_factory):
    """Three tiny runs in one model folder: the defaults, --lr 0.01, and a 2-fold k-fold run."""
    cwd = tmp_path_factory.mktemp("runs")
    for name, extra in (("base", []), ("lr", ["--lr", "0.01"]), ("kfold", ["--fold", "all", "--n_splits", "2"])):
        args = tiny_run_args(demo_root, "--num_workers", "0", "--name", name, *extra)
        done = run_script("train.py", *args, cwd=cwd)
        assert done.returncode == 0, done.stderr
    return cwd / "model"


def best_f1(run_dir):
    return pd.read_csv(run_dir / "log.csv")["val_f1"].max()


def test_table_lists_every_run_and_only_the_flags_that_differ(model_dir, tmp_path):
    out = tmp_path / "tables/runs.csv"
    done = run_script("runs.py", str(model_dir), "--csv", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(table["name"]) == ["base", "kfold", "lr"]
    assert all(name in done.stdout for name in ("base", "kfold", "lr"))
    first = ["name", "date", "best_f1", "epoch", "folds", "oof_f1", "model", "size"]
    assert list(table.columns[:8]) == first
    assert set(table.columns[8:]) == {"n_splits", "fold", "lr"}  # the flags that differ; epochs, seed, ... do not
    rows = table.set_index("name")
    assert rows.loc["base", "lr"] == "0.001" and rows.loc["lr", "lr"] == "0.01"
    assert rows.loc["base", "size"] == "64x48" and rows.loc["base", "model"] == "MultiHeadModel"
    assert rows.loc["kfold", "fold"] == "all" and rows.loc["base", "fold"] == "None"
    f1 = table["best_f1"].astype(float)
    assert list(f1) == sorted(f1, reverse=True)
    assert float(rows.loc["base", "best_f1"]) == pytest.approx(best_f1(model_dir / "base"))
    assert rows.loc["base", "epoch"] == "1"


def test_kfold_run_is_one_row_with_mean_fold_f1_and_oof_f1(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", str(model_dir))  # the default MODEL_DIR
    table = runs.main(runs.get_parser().parse_args([]))
    assert not any(name.startswith("kfold/") for name in table["name"])
    row = table.set_index("name").loc["kfold"]
    folds = [model_dir / "kfold/fold0", model_dir / "kfold/fold1"]
    assert row["best_f1"] == pytest.approx(np.mean([best_f1(f) for f in folds]))
    oof = pd.read_csv(model_dir / "kfold/oof.csv")
    assert row["oof_f1"] == pytest.approx(utils.macro_f1(oof["truth"], oof["pred"], 18))
    assert row["folds"] == "2/2" and row["epoch"] == "1/1"


def test_unreadable_run_is_skipped_with_a_warning(model_dir, tmp_path):
    root = tmp_path / "model"
    shutil.copytree(model_dir / "base", root / "good")
    shutil.copytree(model_dir / "lr", root / "bad_config")
    (root / "bad_config/config.json").write_text("{ not json")
    shutil.copytree(model_dir / "lr", root / "bad_log")
    (root / "bad_log/log.csv").write_text("")
    done = run_script("runs.py", str(root), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = done.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: skipping") for w in warnings)
    assert "config.json" in done.stderr and "log.csv" in done.stderr
    assert "good" in done.stdout and "bad_" not in done.stdout


def test_a_flag_missing_from_an_older_config_counts_as_its_default(model_dir, tmp_path):
    root = tmp_path / "model"
    for name in ("base", "lr"):
        shutil.copytree(model_dir / name, root / name)
    config = json.loads((root / "base/config.json").read_text())
    del config["ema"], config["lr"]  # a run from before these flags existed
    (root / "base/config.json").write_text(json.dumps(config))
    table = runs.run_table(root).set_index("name")
    assert "ema" not in table.columns  # the other run has the default
    assert table.loc["base", "lr"] == "-" and table.loc["lr", "lr"] == "0.01"


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_no_runs_found_exits_2_with_one_line(tmp_path, folder):
    (tmp_path / "empty/some/dir").mkdir(parents=True)
    (tmp_path / "empty/some/dir/config.json").write_text("{}")  # no log.csv: not a run
    done = run_script("runs.py", str(tmp_path / folder), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and folder in lines[0]
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------------
# Label suspects, on synthetic predictions.
FLIPPED = {"000003": 0.95, "000008": 0.7}  # persons whose gender label is wrong: the models' confidence
PARTLY = "000005"  # 3 of 7 photos predicted as the other gender


def write_predictions(path, class_names=None):
    """12 persons x 7 photos: each photo's probability mass on the labelled class (0.8, the rest spread evenly),
    except FLIPPED persons (every photo: on the class of the other gender) and PARTLY (3 photos flipped)."""
    class_names = class_names or labels.mask_class_names()
    rows, probs = [], []
    for person in range(1, 13):
        pid, gender, age = f"{person:06d}", person % 2, person % 3
        for shot_index, shot in enumerate(SHOTS):
            mask = labels.MASK_FILES[shot]
            truth = labels.encode(mask, gender, age)
            flipped = pid in FLIPPED or (pid == PARTLY and shot_index < 3)
            top = FLIPPED.get(pid, 0.8)
            p = np.full(18, (1 - top) / 17)
            p[labels.encode(mask, 1 - gender, age) if flipped else truth] = top
            probs.append(p)
            folder = f"{pid}_{labels.GENDER_NAMES[gender]}_Asian_{[20, 40, 70][age]}"
            rows.append({"path": f"images/{folder}/{shot}.jpg", "group": pid, "truth": truth, "pred": p.argmax()})
    table = pd.DataFrame(rows)
    probs = np.array(probs)
    table["prob_truth"] = probs[np.arange(len(table)), table["truth"]]
    table["loss"] = -np.log(table["prob_truth"])
    table = pd.concat([table, pd.DataFrame(probs, columns=[f"prob_{c}" for c in class_names])], axis=1)
    table.assign(fold=np.arange(len(table)) % 5).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("method", runs.METHODS)
@pytest.mark.parametrize("file", ["oof.csv", "val_predictions.csv"])
def test_suspects_rank_persons_whose_gender_label_the_models_contradict(tmp_path, capsys, file, method):
    write_predictions(tmp_path / file)
    runs.main(runs.get_parser().parse_args(["--suspects", str(tmp_path), "--method", method]))
    suspects = pd.read_csv(tmp_path / "label_suspects.csv", dtype={"group": str})
    assert list(suspects.columns) == runs.SUSPECT_COLUMNS
    assert suspects["group"].tolist() == ["000003", "000008"]  # most confident contradiction first
    assert suspects["field"].tolist() == ["gender", "gender"]
    assert suspects["label"].tolist() == ["female", "male"] and suspects["predicted"].tolist() == ["male", "female"]
    assert suspects["photos"].tolist() == [7, 7] and suspects["share_disagree"].tolist() == [1.0, 1.0]
    assert suspects["mean_prob_label"].iloc[0] == pytest.approx(9 * 0.05 / 17)  # P(female): 9 classes of 0.05/17
    assert suspects["example_path"].iloc[0].startswith("images/000003_female")
    template = pd.read_csv(tmp_path / "label_fixes_template.csv", comment="#", dtype=str)
    assert template[["id", "field", "value"]].values.tolist() == [
        ["000003", "gender", "male"],
        ["000008", "gender", "female"],
    ]
    out = capsys.readouterr().out
    assert "candidates for a human to look at, never applied" in out and "000003" in out


def test_seven_photos_against_a_persons_label_outrank_one_photo_against_its_mask(tmp_path):
    """One photo of person 000001 is confidently another mask (p 0.99): its mask label's mean probability (about
    0.003, x 3 values) is lower than the flipped persons' gender labels' (0.026 and 0.16, x 2), but it is one photo
    against seven: ranked by the evidence summed over the photos, the two persons come first."""
    path = write_predictions(tmp_path / "oof.csv")
    table = pd.read_csv(path, dtype={"group": str})
    row = table.index[(table["group"] == "000001") & table["path"].str.endswith("/normal.jpg")][0]
    truth = int(table.loc[row, "truth"])
    mask, gender, age = labels.decode(truth)
    p = np.full(18, 0.01 / 17)
    p[labels.encode((mask + 1) % 3, gender, age)] = 0.99
    table.loc[row, [f"prob_{c}" for c in labels.mask_class_names()]] = p
    table.to_csv(path, index=False)
    suspects = runs.main(runs.get_parser().parse_args(["--suspects", str(tmp_path), "--method", "cleanlab"]))
    assert suspects[["group", "field"]].values.tolist() == [["000003", "gender"], ["000008", "gender"],
                                                            ["000001", "mask"]]  # fmt: skip
    chance_ratio = suspects["mean_prob_label"] * suspects["field"].map({"gender": 2, "mask": 3})
    assert chance_ratio.iloc[2] < chance_ratio.iloc[0]  # the old ranking (mean probability) put the photo first
    assert suspects["evidence"].iloc[0] == pytest.approx(7 * np.log(2 * 9 * 0.05 / 17))
    assert suspects["evidence"].iloc[2] == pytest.approx(np.log(3 * 6 * 0.01 / 17))


@pytest.mark.parametrize("method", runs.METHODS)
def test_a_person_with_few_disagreeing_photos_is_a_candidate_only_below_min_share(tmp_path, method):
    write_predictions(tmp_path / "oof.csv")
    default = runs.main(runs.get_parser().parse_args(["--suspects", str(tmp_path), "--method", method]))
    assert PARTLY not in set(default["group"])
    lenient = runs.main(runs.get_parser().parse_args(["--suspects", str(tmp_path), "--min_share", "0.4",
                                                      "--method", method]))  # fmt: skip
    row = lenient.set_index("group").loc[PARTLY]
    assert row["field"] == "gender" and row["share_disagree"] == pytest.approx(3 / 7)
    assert lenient["group"].tolist()[:2] == ["000003", "000008"]


def test_age_bands_come_from_the_runs_config(tmp_path):
    names = labels.mask_class_names((30, 58))
    assert runs.mask_fields(names, (30, 58))["age"] == ["<30", "30-57", ">=58"]
    write_predictions(tmp_path / "oof.csv", names)
    args = runs.get_parser().parse_args(["--suspects", str(tmp_path)])  # either method
    with pytest.raises(utils.UserError, match="needs mask-competition predictions .* --age_bounds 30 60"):
        runs.main(args)  # without a config.json the default bounds apply, and they name other classes
    (tmp_path / "fold0").mkdir()  # a k-fold run: oof.csv beside the folds, each with its config.json
    config = {"model": "BaseModel", "num_classes": 18, "augmentation": "BaseAugmentation", "age_bounds": [30, 58]}
    (tmp_path / "fold0/config.json").write_text(json.dumps(config))
    assert runs.run_age_bounds(tmp_path) == (30, 58)
    assert len(runs.main(args)) == 2


def test_disagreement_refuses_data_that_is_not_the_mask_competition(tmp_path):
    rows = {"path": ["a.png", "b.png"], "group": ["g1", "g2"], "truth": [0, 1], "pred": [0, 1]}
    pd.DataFrame({**rows, "prob_cat": [0.9, 0.2], "prob_dog": [0.1, 0.8]}).to_csv(tmp_path / "oof.csv", index=False)
    done = run_script("runs.py", "--suspects", str(tmp_path), "--method", "disagreement", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --suspects needs mask-competition predictions")
    assert not (tmp_path / "label_suspects.csv").exists()


def write_color_persons(root, n_persons: int = 24, seed: int = 0):
    """Persons in the competition layout whose gender is the image's red/blue tint, age band its green level and
    mask status a dark lower part (from half the height when worn, the lowest third when worn wrong): easy enough
    that a 3-fold run of a few epochs learns all three, so contradicted labels stand out (with the mask left
    unlearnable, its one-photo labels came out as confidently 'wrong' as the flipped genders)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for p in range(n_persons):
        gender, band = p % 2, (p // 2) % 3
        age = (20, 45, 70)[band]
        folder = root / f"{p:06d}_{('male', 'female')[gender]}_Asian_{age}"
        folder.mkdir(parents=True)
        for stem, mask in labels.MASK_FILES.items():
            base = np.array([60 + 140 * gender, 40 + 80 * band, 200 - 140 * gender], dtype=np.float64)
            pixels = base + rng.normal(0, 12, (32, 24, 3))
            pixels[(16, 22, 32)[mask] :] *= 0.3  # the mask: wear, incorrect, not wear (nothing)
            pixels = np.clip(pixels, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{stem}.png")
    return root


def test_persons_with_flipped_gender_labels_top_the_suspects_after_a_short_k_fold_run(tmp_path):
    write_color_persons(tmp_path / "train/images")
    (tmp_path / "flips.csv").write_text("id,field,value\n000004,gender,female\n000011,gender,male\n")
    # Batches of 16: 7 steps per epoch, not 2; with them seeds 1-4 and 42 all ranked the two flips first.
    trained = run_script(
        "train.py", "--data_dir", str(tmp_path / "train/images"), "--label_fixes", "flips.csv", "--fold", "all",
        "--n_splits", "3", "--epochs", "4", "--resize", "32", "24", "--num_workers", "0", "--batch_size", "16",
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    for method in runs.METHODS:
        found = run_script("runs.py", "--suspects", "model/exp", "--method", method, cwd=tmp_path)
        assert found.returncode == 0, found.stderr
        suspects = pd.read_csv(tmp_path / "model/exp/label_suspects.csv", dtype={"group": str})
        top = suspects.head(2)
        assert sorted(top["group"]) == ["000004", "000011"] and (top["field"] == "gender").all(), method
        # The template proposes undoing the flips: the original genders.
        template = pd.read_csv(tmp_path / "model/exp/label_fixes_template.csv", comment="#", dtype={"id": str})
        proposed = dict(zip(template["id"], template["value"], strict=False))
        assert proposed["000004"] == "male" and proposed["000011"] == "female"


def test_cleanlab_reports_its_estimate_of_wrong_labels_per_field_and_value(tmp_path, capsys):
    write_predictions(tmp_path / "oof.csv")
    suspects = runs.main(runs.get_parser().parse_args(["--suspects", str(tmp_path), "--method", "cleanlab"]))
    estimates = pd.read_csv(tmp_path / "label_issue_estimates.csv").set_index(["field", "label"])
    # Two persons' genders are wrong (7 photos each: one labelled female, one male), and PARTLY's 3 photos.
    assert estimates.loc[("gender", "female"), "estimated_wrong"] == 7 + 3 * (int(PARTLY) % 2)
    assert estimates.loc[("gender", "male"), "estimated_wrong"] == 7 + 3 * (1 - int(PARTLY) % 2)
    assert estimates.loc[("gender", "female"), "photos"] + estimates.loc[("gender", "male"), "photos"] == 84
    assert (estimates.xs("age", level="field")["estimated_wrong"] == 0).all()
    assert set(estimates.index.get_level_values("field")) == {"gender", "age", "mask"}
    assert suspects.attrs["estimates"]["estimated_wrong"].sum() == 17
    out = capsys.readouterr().out
    assert "cleanlab estimates these labels are wrong" in out and "gender: " in out


def test_cleanlab_checks_the_class_of_any_data_by_image(tmp_path):
    """Folder data (two classes, groups of two images): the one image whose label the models contradict is the
    suspect, and its template row fixes that image's label by path."""
    rng = np.random.default_rng(0)
    truth = np.arange(40) % 2
    p_dog = np.where(truth == 1, rng.uniform(0.75, 0.95, 40), rng.uniform(0.05, 0.25, 40))
    p_dog[6] = 0.97  # labelled cat (6 is even), looks like a dog
    table = pd.DataFrame({"path": [f"data/{'cat dog'.split()[t]}/g{i // 2:02d}_{i}.png" for i, t in enumerate(truth)],
                          "group": [f"g{i // 2:02d}" for i in range(40)], "truth": truth,
                          "pred": (p_dog > 0.5).astype(int), "prob_cat": 1 - p_dog, "prob_dog": p_dog})  # fmt: skip
    table.to_csv(tmp_path / "oof.csv", index=False)
    suspects = runs.main(runs.get_parser().parse_args(["--suspects", str(tmp_path), "--method", "cleanlab"]))
    assert suspects[["group", "field", "label", "predicted"]].values.tolist()[0] == ["g03", "label", "cat", "dog"]
    template = pd.read_csv(tmp_path / "label_fixes_template.csv", comment="#")
    assert template[["id", "field", "value"]].values.tolist()[0] == ["data/cat/g03_6.png", "label", "dog"]
