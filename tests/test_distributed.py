"""torchrun launches the same train.py as DistributedDataParallel: a 2-process gloo run on the CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import augmentation
import dataset
import labels
import model as model_module
import predict
import subset as subset_module
import utils
from conftest import tiny_run_args


@pytest.fixture(scope="module")
def ddp_run(demo_root, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    # 12 persons x 7 photos at --val_ratio 0.25: 3 persons, 21 validation images, odd for 2 processes.
    args = [*tiny_run_args(demo_root, "--val_ratio", "0.25", "--num_workers", "0"), "--model_dir", str(cwd / "model"),
            "--mlflow", f"sqlite:///{cwd / 'mlflow.db'}"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(utils_root() / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, done


def utils_root():
    from conftest import ROOT

    return ROOT


def test_two_processes_write_exactly_one_run_directory(ddp_run):
    cwd, done = ddp_run
    runs = sorted(p.name for p in (cwd / "model").iterdir())
    assert runs == ["exp"]
    config = pd.read_json(cwd / "model/exp/config.json", typ="series")
    assert config["world_size"] == 2 and config["global_batch_size"] == 2 * config["batch_size"]
    assert done.stdout.count("Run directory:") == 1  # only rank 0 prints


def test_the_two_processes_share_one_ram_cache_built_by_local_rank_0(ddp_run):
    _, done = ddp_run
    shared = r"(?m)^RAM cache: \d+ images, .*, shared by the 2 processes of this machine$"
    assert re.search(shared, done.stdout), done.stdout


def test_only_rank_0_logs_to_the_tracker_and_to_train_log(ddp_run):
    import mlflow

    cwd, _ = ddp_run
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["baseline"])
    assert list(runs["tags.mlflow.runName"]) == ["exp"] and list(runs["status"]) == ["FINISHED"]
    assert len(mlflow.MlflowClient().get_metric_history(runs["run_id"][0], "Val/f1")) == 1
    log = (cwd / "model/exp/train.log").read_text()
    assert log.count("Run directory:") == 1 and log.count("epoch   1/1") == 1


def test_gathered_validation_covers_every_image_once_and_equals_a_single_process_evaluation(ddp_run, demo_root):
    cwd, _ = ddp_run
    run = cwd / "model/exp"
    config = pd.read_json(run / "config.json", typ="series")
    data = dataset.MaskSplitByProfileDataset(demo_root / "train/images", val_ratio=0.25, seed=config["seed"])
    _, val_idx = data.split_dataset()
    assert len(val_idx) % 2 == 1
    predictions = pd.read_csv(run / "val_predictions.csv")
    assert sorted(predictions["path"]) == sorted(str(data.image_paths[i]) for i in val_idx)

    # The checkpoint, evaluated here in one process, gives the macro F1 the two processes logged for it.
    checkpoint = utils.load_checkpoint(run / "best.pth")
    net = model_module.build_model(config["model"], config["num_classes"], **labels.model_kwargs())
    net.load_state_dict(checkpoint["model"])
    aug_cls = augmentation.augmentation_classes()[config["augmentation"]]
    aug = aug_cls(config["resize"], config["mean"], config["std"])
    subset = subset_module.ImageSubset(data, val_idx, aug.eval_transform, aug.load_size)
    loader = torch.utils.data.DataLoader(subset, batch_size=8)
    preds = predict.evaluate(net, loader, torch.device("cpu")).probs.argmax(1).numpy()
    log = pd.read_csv(run / "log.csv")
    best = log.loc[log["best"], "val_f1"].iloc[-1]
    assert utils.macro_f1(subset.targets, preds, 18) == pytest.approx(best)
    assert np.array_equal(
        predictions.set_index("path").loc[[str(data.image_paths[i]) for i in val_idx], "pred"].to_numpy(), preds
    )
