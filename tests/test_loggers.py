"""Experiment tracking beside TensorBoard: W&B (offline) and MLflow (a temporary SQLite store) get the config, the
epoch metrics, the figures and the final metrics; a resumed run continues the same tracker run; a logger that
fails never ends the run; train.log holds what the run printed."""

from __future__ import annotations

import glob
import json
import socket
import struct
from pathlib import Path

import pytest

import loggers
from conftest import run_script, tiny_run_args


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline .wandb files, in order, decoded with wandb's own protobuf messages.
    wandb 0.31 reads these files in its Go core only: the framing (a 7-byte file header, 32 KiB blocks of
    records with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) is read here."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(glob.glob(str(run_dir / "wandb/offline-run-*/run-*.wandb"))):
        raw, pos, pending, block = Path(path).read_bytes(), 7, b"", 32768
        assert raw[:4] == b":W&B"
        while pos + 7 <= len(raw):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
            if length == 0 and kind == 0:  # the rest of a block, padded
                pos += block - pos % block
                continue
            pending, pos = pending + raw[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_history(run_dir: Path) -> tuple[set[str], list[dict[str, str]], dict[str, str]]:
    """(the run ids, each history row by key, the config) of a run directory's W&B files."""
    ids, rows, config = set(), [], {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.add(record.run.run_id)
            config |= {item.key: item.value_json for item in record.run.config.update}
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return ids, rows, config


def mlflow_runs(store: str):
    import mlflow

    mlflow.set_tracking_uri(store)
    return mlflow.search_runs(experiment_names=["baseline"], order_by=["attributes.start_time ASC"]), mlflow


def test_a_wandb_run_offline_has_the_config_and_every_epoch_and_a_resume_continues_it(demo_root, tmp_path):
    done = run_script("train.py", *tiny_run_args(demo_root, "--wandb", "maskproj"), cwd=tmp_path)  # offline: conftest
    assert done.returncode == 0, done.stderr
    again = run_script("train.py", "--resume", "model/exp", "--epochs", "2", cwd=tmp_path)
    assert again.returncode == 0 and "logging is off" not in again.stderr, again.stderr
    run_dir = tmp_path / "model/exp"
    ids, rows, config = wandb_history(run_dir)
    epochs = [r for r in rows if "Val/f1" in r]
    assert [int(r["_step"]) for r in epochs] == [1, 2]
    log = (run_dir / "log.csv").read_text().splitlines()
    assert float(epochs[-1]["Val/f1"]) == pytest.approx(float(log[-1].split(",")[log[0].split(",").index("val_f1")]))
    assert any("Val/worst/path" in r for r in rows) and "Val_f1_per_class/wear/male/<30" in epochs[0]
    saved = json.loads((run_dir / "config.json").read_text())
    assert json.loads(config["lr"]) == saved["lr"] and json.loads(config["epochs"]) == 2
    assert ids == {saved["trackers"]["wandb"]}  # one W&B run, in two offline files that `wandb sync` joins


def test_an_mlflow_run_has_params_metrics_per_epoch_and_artifacts_and_a_resume_continues_it(demo_root, tmp_path):
    store = f"sqlite:///{tmp_path / 'ml.db'}"
    first = run_script("train.py", *tiny_run_args(demo_root, "--mlflow", store), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_script("train.py", "--resume", "model/exp", "--epochs", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    runs, mlflow = mlflow_runs(store)
    assert len(runs) == 1 and runs["status"][0] == "FINISHED" and runs["tags.mlflow.runName"][0] == "exp"
    assert runs["params.lr"][0] == str(json.loads((tmp_path / "model/exp/config.json").read_text())["lr"])
    client = mlflow.MlflowClient()
    history = client.get_metric_history(runs["run_id"][0], "Val/f1")
    assert sorted(m.step for m in history) == [1, 2]
    assert runs["metrics.hparam/best_score"][0] == pytest.approx(max(m.value for m in history))
    artifacts = {f.path for f in client.list_artifacts(runs["run_id"][0])}
    assert {"best.pth", "config.json", "figures"} <= artifacts
    figures = {f.path for f in client.list_artifacts(runs["run_id"][0], "figures")}
    assert {"figures/Val_worst", "figures/Val_confusion_matrix", "figures/Val_predictions"} <= figures
    # train.log: the epoch lines of the run and of its resumption, with what each printed first.
    log = (tmp_path / "model/exp/train.log").read_text()
    assert "epoch   1/1" in log and "epoch   2/2" in log and log.count("Data: ") == 2
    assert "Resuming model/exp after epoch 1" in log
    assert log.rstrip().endswith("Next: python inference.py --model_dir model/exp")


def test_folds_of_a_kfold_run_are_grouped_in_both_trackers(demo_root, tmp_path):
    store = f"sqlite:///{tmp_path / 'ml.db'}"
    args = tiny_run_args(demo_root, "--fold", "all", "--n_splits", "2", "--mlflow", store, "--wandb", "p")
    done = run_script("train.py", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    runs, _ = mlflow_runs(store)
    parent = runs[runs["tags.parent"] == "yes"]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert len(parent) == 1 and parent["tags.mlflow.runName"].iloc[0] == "k-fold exp"
    assert sorted(children["tags.mlflow.runName"]) == ["exp/fold0", "exp/fold1"]
    for fold in (0, 1):
        groups = {r.run.run_group for r in wandb_records(tmp_path / f"model/exp/fold{fold}") if r.HasField("run")}
        assert groups == {"k-fold exp"}


def test_a_sweep_trial_is_named_and_grouped_by_its_sweep():
    config = {"sweep": {"study": "sw", "trial": 3}, "fold": None, "fold_index": None}
    assert loggers.run_name(config, Path("model/sw/trial3")) == "sw/trial3"
    assert loggers.run_group(config, Path("model/sw/trial3")) == "sweep sw"
    assert loggers.run_group({"fold": None, "fold_index": None}, Path("model/exp2")) is None
    assert loggers.run_name({"fold": None, "fold_index": None}, Path("model/exp2")) == "exp2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("where", ["server", "folder"])
def test_a_tracking_store_that_cannot_be_reached_warns_once_and_the_run_finishes(demo_root, tmp_path, where):
    (tmp_path / "file").write_text("")
    uri = f"http://127.0.0.1:{free_port()}" if where == "server" else f"sqlite:///{tmp_path / 'file/sub/x.db'}"
    done = run_script("train.py", *tiny_run_args(demo_root, "--mlflow", uri), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "MLflow logging is off" in line]
    assert len(warnings) == 1 and (tmp_path / "model/exp/best.pth").is_file()


@pytest.mark.parametrize(("flag", "package"), [("--wandb", "wandb"), ("--mlflow", "mlflow")])
def test_a_missing_tracker_package_exits_2_with_the_pip_command(demo_root, tmp_path, monkeypatch, flag, package):
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name))
    done = run_script("train.py", *tiny_run_args(demo_root, flag, "x"), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {flag} needs the {package} package, which is not installed: pip install {package}"
    ]
    assert not (tmp_path / "model").exists()


def test_train_log_survives_a_log_that_cannot_be_written(tmp_path, capsys):
    import report

    with report.ConsoleLog() as console:
        print("before the run directory")
        console.attach(tmp_path / "missing")  # cannot be opened: the run prints on
        print("after")
    assert capsys.readouterr().out == "before the run directory\nafter\n"
    with report.ConsoleLog() as console:
        print("one")
        console.attach(tmp_path)
        print("two\rprogress", end="")
        print("three")
    assert (tmp_path / "train.log").read_text() == "one\nthree\n"


def test_a_run_logs_to_a_real_mlflow_tracking_server(demo_root, tmp_path):
    """`mlflow server`, as the README starts it for a team, on 127.0.0.1: the run, its metrics and artifacts."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("mlflow server did not answer within 60 s")
        uri = f"http://127.0.0.1:{port}"
        done = run_script("train.py", *tiny_run_args(demo_root, "--mlflow", uri, "--name", "shared"), cwd=tmp_path)
        assert done.returncode == 0 and "MLflow logging is off" not in done.stderr, done.stderr
        runs, mlflow = mlflow_runs(uri)
        assert list(runs["tags.mlflow.runName"]) == ["shared"] and list(runs["status"]) == ["FINISHED"]
        assert len(mlflow.MlflowClient().get_metric_history(runs["run_id"][0], "Train/loss")) == 1
        assert "best.pth" in {f.path for f in mlflow.MlflowClient().list_artifacts(runs["run_id"][0])}
    finally:
        server.terminate()
        server.wait(timeout=20)
