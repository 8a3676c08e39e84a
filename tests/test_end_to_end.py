"""Train -> inference -> submission on tiny generated data, as a user runs it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch

import augmentation
import dataset
import demo
import labels
import model
import predict
import subset as subset_module
import utils
from conftest import run_script

TRAIN_ARGS = ["--epochs", "2", "--resize", "64", "48", "--val_ratio", "0.25", "--batch_size", "16"]


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """One 2-epoch run on the tiny demo data; returns (working dir, run dir, training stdout)."""
    cwd = tmp_path_factory.mktemp("work")
    result = run_script("train.py", "--data_dir", str(demo_root / "train/images"), *TRAIN_ARGS, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, cwd / "model/exp", result.stdout


def test_run_directory_holds_everything(trained):
    _, run, stdout = trained
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "best.pth", "last.pth", "log.csv"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert not [n for n in names if n.endswith(".tmp")]
    assert "epoch   2/2" in stdout and "val loss" in stdout and "f1" in stdout


def test_config_records_what_inference_needs(trained):
    _, run, _ = trained
    config = json.loads((run / "config.json").read_text())
    assert config["resize"] == [64, 48] and config["num_classes"] == 18
    assert config["class_names"] == labels.mask_class_names()
    assert len(config["mean"]) == 3 and len(config["std"]) == 3
    assert config["model"] == "MultiHeadModel" and config["augmentation"] == "FaceAugmentation"  # mask-data defaults
    assert "torch" in config["versions"]
    assert config["val_images"] == 3 * 7  # 25% of 12 persons, every photo, no drop_last


def test_log_has_one_row_per_epoch_and_best_matches_checkpoint(trained):
    _, run, _ = trained
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    best = utils.load_checkpoint(run / "best.pth")
    last = utils.load_checkpoint(run / "last.pth")
    assert last["epoch"] == 2
    assert best["best_score"] == pytest.approx(max(float(r["val_f1"]) for r in rows))
    assert not any(k.startswith("module.") for k in best["model"])
    assert {"optimizer", "scheduler", "epoch", "config"} <= set(best)


def test_logged_validation_f1_is_over_every_validation_image(trained, demo_root):
    """Recompute the best epoch's validation macro F1 from best.pth over the whole person-level split."""
    _, run, _ = trained
    config = json.loads((run / "config.json").read_text())
    best = utils.load_checkpoint(run / "best.pth")
    net = model.build_model(config["model"], 18, backbone=config["backbone"], freeze_stages=config["freeze_stages"],
                            **labels.model_kwargs())  # fmt: skip
    net.load_state_dict(best["model"])
    data = dataset.MaskSplitByProfileDataset(config["data_dir"], config["val_ratio"], config["seed"])
    aug = getattr(augmentation, config["augmentation"])(config["resize"], config["mean"], config["std"])
    _, val_idx = data.split_dataset()
    val = subset_module.ImageSubset(data, val_idx, aug.eval_transform, aug.load_size)
    loader = torch.utils.data.DataLoader(val, batch_size=5)
    result = predict.evaluate(net, loader, torch.device("cpu"), targets=val.targets)
    assert result.probs.shape == (21, 18)  # the multi-head default's three heads -> 18 classes
    f1 = result.metrics["f1"]
    assert f1 == pytest.approx(utils.macro_f1(val.targets, result.probs.argmax(1).numpy(), 18))
    assert f1 == pytest.approx(best["best_score"], abs=1e-6)


def test_inference_writes_a_valid_submission_in_info_order(trained, demo_root):
    cwd, run, _ = trained
    result = run_script(
        "inference.py",
        "--model_dir",
        str(run),
        "--data_dir",
        str(demo_root / "eval"),
        "--output_dir",
        str(cwd / "out"),
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    info = pd.read_csv(demo_root / "eval/info.csv")
    out = pd.read_csv(cwd / "out/output.csv")
    assert list(out.columns) == ["ImageID", "ans"]
    assert out["ImageID"].tolist() == info["ImageID"].tolist()
    assert out["ans"].between(0, 17).all() and len(out) == 14
    assert "macro F1" in result.stdout  # the demo eval set carries its truth


def test_inference_defaults_find_the_newest_run_and_its_eval_data(trained, demo_root):
    cwd, _, _ = trained
    result = run_script("inference.py", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "Using the newest run" in result.stdout and str(demo_root / "eval") in result.stdout
    assert len(pd.read_csv(cwd / "output/output.csv")) == 14


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_classes": 3}, "only for the 18 mask classes"),  # the multi-head default cannot have 3 classes
        ({"model": "BaseModel", "backbone": None, "freeze_stages": 0, "num_classes": 3}, "does not match the model"),
    ],
)
def test_inference_rejects_a_checkpoint_with_another_class_count(trained, tmp_path, change, message):
    _, run, _ = trained
    broken = tmp_path / "run"
    broken.mkdir()
    config = json.loads((run / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **change}))
    (broken / "best.pth").write_bytes((run / "best.pth").read_bytes())
    result = run_script("inference.py", "--model_dir", str(broken), cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "output").exists()


def test_a_second_run_never_overwrites_the_first(trained, demo_root):
    cwd, run, _ = trained
    before = (run / "best.pth").read_bytes()
    result = run_script(
        "train.py",
        "--data_dir",
        str(demo_root / "train/images"),
        *TRAIN_ARGS,
        "--epochs",
        "1",
        "--model",
        "resnet10t",
        "--augmentation",
        "CustomAugmentation",
        "--criterion",
        "focal",
        "--mean_std",
        "compute",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    assert (cwd / "model/exp2/best.pth").is_file()
    assert (run / "best.pth").read_bytes() == before
    config = json.loads((cwd / "model/exp2/config.json").read_text())
    assert config["model"] == "resnet10t" and config["augmentation"] == "CustomAugmentation"
    assert config["mean"] != list(dataset.SEED_MEAN) and "Computed mean" in result.stdout


def test_training_is_repeatable_for_a_seed(demo_root, tmp_path):
    args = ["--data_dir", str(demo_root / "train/images"), *TRAIN_ARGS, "--epochs", "1", "--num_workers", "0"]
    for _ in range(2):
        assert run_script("train.py", *args, cwd=tmp_path).returncode == 0
    a = utils.load_checkpoint(tmp_path / "model/exp/last.pth")["model"]
    b = utils.load_checkpoint(tmp_path / "model/exp2/last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_data_has_the_competition_layout(demo_root):
    train_csv = pd.read_csv(demo_root / "train/train.csv", dtype={"id": str})
    assert list(train_csv.columns) == ["id", "gender", "race", "age", "path"]
    folders = sorted(p.name for p in (demo_root / "train/images").iterdir())
    assert folders == sorted(train_csv["path"])
    for folder in folders:
        stems = sorted(p.stem for p in (demo_root / "train/images" / folder).iterdir())
        assert stems == sorted([*(f"mask{i}" for i in range(1, 6)), "incorrect_mask", "normal"])
    from PIL import Image

    with Image.open(next((demo_root / "train/images" / folders[0]).iterdir())) as im:
        assert im.size == (384, 512)  # W x H: the competition's portrait photos
    info = pd.read_csv(demo_root / "eval/info.csv")
    truth = pd.read_csv(demo_root / "eval/truth.csv")
    assert list(info.columns) == ["ImageID", "ans"] and info["ImageID"].tolist() == truth["ImageID"].tolist()
    assert all((demo_root / "eval/images" / i).is_file() for i in info["ImageID"])


def test_demo_data_is_deterministic(tmp_path):
    a = demo.make_demo_data(tmp_path / "a", n_train=2, n_eval=1, seed=4)
    b = demo.make_demo_data(tmp_path / "b", n_train=2, n_eval=1, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert np.asarray(dataset.MaskBaseDataset(a / "train/images").labels).size == 14
