"""A run as an object: k-fold runs resume to the end, checkpoints stand alone, models from the user's own files,
--eval_metric, and recipes (--config) that repeat a run."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pandas as pd
import pytest
import torch

import engine
import train
import utils
from conftest import run_script, tiny_run_args
from utils import UserError


def flags(demo_root, tmp_path, *extra: str) -> list[str]:
    return [*tiny_run_args(demo_root, "--num_workers", "0"), "--model_dir", str(tmp_path / "model"), *extra]


def train_here(argv: list[str]):
    return train.main(train.parse_args(argv), argv=argv)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_error_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_an_interrupted_kfold_run_resumes_to_the_end_and_equals_the_uninterrupted_one(demo_root, tmp_path, monkeypatch):
    kfold = flags(demo_root, tmp_path, "--fold", "all", "--n_splits", "3", "--epochs", "2", "--batch_size", "16")
    full = train_here([*kfold, "--name", "full"])

    original = engine.train_one_epoch

    def interrupt_fold_1(model, loader, criterion, state, *rest, **kwargs):
        if state.config["fold_index"] == 1 and state.progress["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # caught: the step finishes, then last.pth is written
        return original(model, loader, criterion, state, *rest, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", interrupt_fold_1)
    with pytest.raises(utils.Stopped) as stop:
        train_here([*kfold, "--name", "part"])
    part = stop.value.run_dir  # the k-fold run's directory, not the fold's
    monkeypatch.setattr(engine, "train_one_epoch", original)
    assert not (part / "fold2").exists() and not (part / "oof.csv").exists()
    assert not utils.load_checkpoint(part / "fold1/last.pth")["finished"]

    by_fold = shutil.copytree(part, tmp_path / "model/part_copy")  # the same stop, resumed through a fold
    assert train_here(["--resume", str(part)]) == part  # the k-fold run's own directory
    assert train_here(["--resume", str(by_fold / "fold1")]) == by_fold
    for resumed in (part, by_fold):
        for k in range(3):
            a, b = (utils.load_checkpoint(run / f"fold{k}/last.pth") for run in (full, resumed))
            assert same_weights(a["model"], b["model"]), f"fold {k}"
            assert b["finished"] and b["epoch"] == 2
        assert (full / "oof.csv").read_bytes() == (resumed / "oof.csv").read_bytes()
        logs = [pd.read_csv(run / "fold1/log.csv").drop(columns="time_s") for run in (full, resumed)]
        pd.testing.assert_frame_equal(logs[0], logs[1])


def test_a_single_fold_trains_as_that_fold_of_a_kfold_run(demo_root, tmp_path):
    kfold = train_here(flags(demo_root, tmp_path, "--fold", "all", "--n_splits", "2", "--name", "kf"))
    alone = train_here(flags(demo_root, tmp_path, "--fold", "1", "--n_splits", "2", "--name", "one"))
    a, b = utils.load_checkpoint(kfold / "fold1/last.pth"), utils.load_checkpoint(alone / "last.pth")
    assert same_weights(a["model"], b["model"])


def test_best_pth_alone_predicts_what_its_run_directory_predicts(demo_root, tmp_path):
    run = train_here(flags(demo_root, tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(run / "best.pth", elsewhere / "submission_model.pth")  # no config.json beside it
    eval_dir = str(demo_root / "eval")
    by_run = run_script("inference.py", "--model_dir", str(run), "--data_dir", eval_dir, "--save_probs", cwd=tmp_path)
    assert by_run.returncode == 0, by_run.stderr
    alone = run_script(
        "inference.py", "--model_dir", "submission_model.pth", "--data_dir", eval_dir, "--save_probs",
        "--tta", "none", cwd=elsewhere,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    a, b = pd.read_csv(tmp_path / "output/probs.csv"), pd.read_csv(elsewhere / "output/probs.csv")
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "output/output.csv").read_text() == (elsewhere / "output/output.csv").read_text()


USER_MODEL = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A model outside the project."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 8
        self.head = nn.Linear(8, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))
'''


FILE_MODELS = [
    ["--model", "nets/mynet.py:TinyNet"],
    ["--model", "MultiHeadModel", "--backbone", "nets/mynet.py:TinyNet"],
]


@pytest.mark.parametrize("model_flags", FILE_MODELS)
def test_a_model_from_a_file_outside_the_project_trains_and_predicts(demo_root, tmp_path, model_flags):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets/mynet.py").write_text(USER_MODEL)
    done = run_script("train.py", *tiny_run_args(demo_root, *model_flags), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "model/exp/config.json").read_text())
    recorded = config["model"] if len(model_flags) == 2 else config["backbone"]
    assert recorded == f"{tmp_path / 'nets/mynet.py'}:TinyNet"  # absolute: rebuilt from any directory
    other = tmp_path / "other"
    other.mkdir()
    run, eval_dir = str(tmp_path / "model/exp"), str(demo_root / "eval")
    inferred = run_script("inference.py", "--model_dir", run, "--data_dir", eval_dir, cwd=other)
    assert inferred.returncode == 0, inferred.stderr
    assert len(pd.read_csv(other / "output/output.csv")) == 14
    (tmp_path / "nets/mynet.py").unlink()
    line = one_error_line(run_script("inference.py", "--model_dir", run, "--data_dir", eval_dir, cwd=other))
    assert str(tmp_path / "nets/mynet.py") in line and "does not exist" in line


def test_model_files_and_backbones_that_cannot_work_exit_2_with_one_line(demo_root, tmp_path):
    (tmp_path / "broken.py").write_text("import torch\nraise ValueError('oops')\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    cases = [
        (["--model", "missing.py:Net"], "missing.py"),
        (["--model", "broken.py:Net"], "ValueError: oops"),
        (["--model", "empty.py:Net"], "no nn.Module class Net"),
        (["--model", "BaseModel", "--backbone", "resnet18"], "--backbone resnet18 is for multi-head models"),
    ]
    for extra, expected in cases:
        line = one_error_line(run_script("train.py", *tiny_run_args(demo_root, *extra), cwd=tmp_path))
        assert expected in line, line
    assert not (tmp_path / "model").exists()  # refused before any run directory


def test_eval_metric_accuracy_selects_the_epoch_of_best_validation_accuracy(demo_root, tmp_path):
    run = train_here(flags(demo_root, tmp_path, "--epochs", "4", "--eval_metric", "accuracy", "--lr", "0.01"))
    log = pd.read_csv(run / "log.csv")
    best = utils.load_checkpoint(run / "best.pth")
    expected = int(log.loc[log["val_acc"].idxmax(), "epoch"])  # the first epoch reaching the best accuracy
    assert best["epoch"] == expected and best["best_score"] == pytest.approx(log["val_acc"].max())
    assert log["score"].tolist() == log["val_acc"].tolist()
    assert log.loc[log["best"], "epoch"].iloc[-1] == expected


def test_eval_metric_loss_selects_the_lowest_validation_loss(demo_root, tmp_path):
    run = train_here(flags(demo_root, tmp_path, "--epochs", "3", "--eval_metric", "loss", "--lr", "0.02"))
    log = pd.read_csv(run / "log.csv")
    assert utils.load_checkpoint(run / "best.pth")["epoch"] == int(log.loc[log["val_loss"].idxmin(), "epoch"])
    table = run_script("runs.py", str(tmp_path / "model"), cwd=tmp_path)
    assert table.returncode == 0 and "eval_metric" in table.stdout and "loss" in table.stdout


def test_a_runs_config_json_as_a_recipe_repeats_the_run_and_given_flags_win(demo_root, tmp_path, capsys):
    first = train_here(flags(demo_root, tmp_path, "--epochs", "2", "--lr", "0.01"))
    again = train_here(["--config", str(first / "config.json")])
    assert again != first and again.parent == first.parent  # a new run directory: exp2
    logs = [pd.read_csv(run / "log.csv").drop(columns="time_s") for run in (first, again)]
    pd.testing.assert_frame_equal(logs[0], logs[1])
    assert "ignoring what describes the data" in capsys.readouterr().err
    changed = train_here(["--config", str(first / "config.json"), "--epochs", "1"])
    assert json.loads((changed / "config.json").read_text())["epochs"] == 1
    assert len(pd.read_csv(changed / "log.csv")) == 1


def test_yaml_recipes_set_defaults_and_bad_recipes_exit_2(demo_root, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 1e-3\nresize: [40, 32]\ncriterion: focal\nchannels_last: true\n")
    args = train.parse_args(["--config", str(recipe), "--criterion", "label_smoothing"])
    assert (args.lr, args.resize, args.criterion, args.channels_last) == (1e-3, [40, 32], "label_smoothing", True)
    (tmp_path / "typo.yaml").write_text("lr: 0.01\nepoch: 3\n")
    line = one_error_line(run_script("train.py", "--config", "typo.yaml", cwd=tmp_path))
    assert "'epoch' is not a train.py flag" in line and "did you mean 'epochs'" in line
    (tmp_path / "list.yaml").write_text("- lr\n")
    assert "flag: value pairs" in one_error_line(run_script("train.py", "--config", "list.yaml", cwd=tmp_path))
    missing = one_error_line(run_script("train.py", "--config", "nope.yaml", cwd=tmp_path))
    assert "--config nope.yaml does not exist" in missing


def test_every_key_a_run_writes_in_config_json_is_a_flag_or_a_fact_a_recipe_skips():
    """A key train.py adds to config.json beside its flags (at a resume, a pruned trial, ...) must be known to
    recipes, or that run's config.json stops `--config` with 'not a train.py flag'."""
    import re

    import rundir
    from conftest import ROOT

    written = set()
    for path in ROOT.glob("*.py"):
        text = path.read_text()
        written |= set(re.findall(r"config\[\"([a-z_]+)\"\] *=[^=]", text))
        written |= set(re.findall(r"config\.setdefault\(\"([a-z_]+)\"", text))
        for args in re.findall(r"config\.update\(([^)]*)\)", text):
            written |= set(re.findall(r"([a-z_]+)=", args))
    assert {"resumed", "trackers", "pruned", "split_digest", "train_images"} <= written  # the scan finds them
    unknown = written - set(train.flag_defaults()) - set(rundir.DATA_FACTS)
    assert not unknown, f"add to rundir.DATA_FACTS: {sorted(unknown)}"


BAD_RECIPE_VALUES = {
    "epochs: [1, 2]": "'epochs: [1, 2]' is refused (unrecognized arguments: 2)",
    "epochs:": "'epochs' has no value; write one (the default is 6) or delete it",
    "epochs: {a: 1}": "'epochs: {'a': 1}' is refused (argument --epochs: invalid int value",
    "epochs: true": "'epochs: True' is refused (argument --epochs: expected one argument)",
    "lr: fast": "'lr: fast' is refused (argument --lr: invalid float value: 'fast')",
    "amp: 3": "'amp: 3' is refused (argument --amp: invalid choice: '3'",
    "resize: 32": "'resize: 32' is refused (argument --resize: expected 2 arguments)",
    "channels_last: 3": "'channels_last: 3' is refused: channels_last takes true or false",
}


@pytest.mark.parametrize("line", sorted(BAD_RECIPE_VALUES))
def test_a_recipe_value_train_py_would_refuse_names_the_file_and_the_pair(tmp_path, line):
    """Every value is checked by train.py's own parser: a left-out value no longer trains with the default."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"lr: 0.01\n{line}\n")
    with pytest.raises(UserError) as error:
        train.parse_args(["--config", str(recipe)])
    assert str(error.value).startswith(f"--config {recipe}: {BAD_RECIPE_VALUES[line]}")
    recipe.write_text("lr: 0.01\npretrained_path: null\nmodel: [BaseModel]\n")  # null: a default of None
    args = train.parse_args(["--config", str(recipe)])
    assert (args.lr, args.pretrained_path, args.model) == (0.01, None, "BaseModel")


def test_run_state_round_trips_through_its_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    import schedule

    def make(m, o):
        return engine.RunState(m, o, schedule.Schedule(o, "cosine", 2, 3), {"a": 1})

    state = make(model, optimizer)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state.epoch, state.best_score, state.best_epoch, state.rows = 1, 0.5, 1, [{"epoch": 1}]
    state.schedule.step_batch()
    saved = state.state_dict()
    expected_draw = torch.rand(3)

    other_model = torch.nn.Linear(3, 2)
    restored = make(other_model, torch.optim.AdamW(other_model.parameters(), lr=0.1))
    torch.manual_seed(123)
    restored.load_state_dict(saved)
    assert torch.equal(torch.rand(3), expected_draw)  # the random generators continue where they were
    assert same_weights(restored.model.state_dict(), model.state_dict())
    assert (restored.epoch, restored.best_score, restored.rows) == (1, 0.5, [{"epoch": 1}])
    assert restored.schedule.lr == pytest.approx(state.schedule.lr)
