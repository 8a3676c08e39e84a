"""What a run writes to explain its score: HParams for run comparison, per-task accuracy and worst classes in
the log, every validation prediction, the highest-loss images, and the per-class report."""

from __future__ import annotations

import glob

import pandas as pd
import pytest

from conftest import run_script, tiny_run_args


@pytest.fixture(scope="module")
def run(demo_root, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("analysis")
    done = run_script("train.py", *tiny_run_args(demo_root, "--epochs", "2", "--num_workers", "0"), cwd=cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "model/exp", done


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(glob.glob(str(run_dir / "events.out.tfevents.*"))[0], size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


def test_hparams_hold_the_flags_and_final_metrics(run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _ = run
    accumulator = events(run_dir)
    content = accumulator.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    flags = start.session_start_info.hparams
    assert flags["model"].string_value == "MultiHeadModel" and flags["lr"].number_value == pytest.approx(3e-3)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"hparam/best_val_f1", "hparam/best_epoch", "hparam/val_gender_acc"} <= metrics
    log = pd.read_csv(run_dir / "log.csv")
    best = accumulator.Scalars("hparam/best_val_f1")[-1].value
    assert best == pytest.approx(log["val_f1"].max(), abs=1e-6)


def test_log_reports_task_accuracy_and_worst_classes(run):
    run_dir, done = run
    log = pd.read_csv(run_dir / "log.csv")
    assert {"val_mask_acc", "val_gender_acc", "val_age_acc", "val_worst"} <= set(log.columns)
    assert log["val_mask_acc"].between(0, 1).all() and log["val_worst"].str.count(",").eq(2).all()
    assert " | mask " in done.stdout and " | worst " in done.stdout


def test_validation_predictions_and_worst_images_are_written_with_best_pth(run):
    run_dir, _ = run
    config = pd.read_json(run_dir / "config.json", typ="series")
    table = pd.read_csv(run_dir / "val_predictions.csv")
    assert len(table) == config["val_images"] and table["path"].is_unique
    assert {"path", "group", "truth", "pred", "prob_truth", "loss"} <= set(table.columns)
    assert (table["loss"] >= 0).all() and table["prob_truth"].between(0, 1).all()
    assert (run_dir / "worst_val.png").stat().st_size > 1000
    assert "Val/worst" in events(run_dir).Tags()["images"]
    report = pd.read_csv(run_dir / "best_report.csv")
    assert len(report) == 18 and report["support"].sum() == config["val_images"]
