"""Where a run's metrics go besides log.csv and train.log: TensorBoard always, Weights & Biases with --wandb
PROJECT, MLflow with --mlflow [URI]. `report.Loggers` hands every call to the loggers a run's flags turn on; a new
logger is one class here, listed in LOGGERS, with its flags.

    python train.py --wandb mask --wandb_group lr-study   # WANDB_MODE=offline: local files, `wandb sync` later
    python train.py --mlflow                              # sqlite:///model/mlflow.db beside the runs
    mlflow ui --backend-store-uri sqlite:///model/mlflow.db
    python train.py --mlflow http://tracking-server:5000  # a team's shared MLflow server

Each logger gets the resolved config as the run's parameters, each epoch's numbers, the figures, and the final
metrics. A resumed run continues the same W&B and MLflow run: their ids are kept in config.json (`trackers`). A
sweep's trials and a k-fold run's folds are grouped (a W&B group, an MLflow parent run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import rundir
from utils import UserError

SKIPPED = ("versions", "class_names", "skipped_images", "command", "mean", "std", "resumed", "flag_defaults",
           "trackers", "label_fix_report", "pseudo_label_counts")  # fmt: skip


def params(config: dict[str, Any]) -> dict[str, Any]:
    """The run's flags as flat parameters (numbers, strings, booleans; anything else as its text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items() if k not in SKIPPED}


def run_name(config: dict[str, Any], run_dir: Path) -> str:
    """The name a tracker shows: the run directory's (`--name`, or exp2 when exp was taken), with its sweep or
    k-fold run in front for a trial or a fold (sw/trial3, exp/fold1)."""
    if config.get("sweep"):
        return f"{config['sweep']['study']}/{run_dir.name}"
    if rundir.is_fold_of_kfold_run(config):
        return f"{run_dir.parent.name}/{run_dir.name}"
    return run_dir.name


def run_group(config: dict[str, Any], run_dir: Path) -> str | None:
    """What the run belongs to: its sweep, or its k-fold run; None for a run alone."""
    if config.get("sweep"):
        return f"sweep {config['sweep']['study']}"
    if rundir.is_fold_of_kfold_run(config):
        return f"k-fold {run_dir.parent.name}"
    return None


def require(package: str, flag: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise UserError(f"{flag} needs the {package} package, which is not installed: pip install {package}")


class TensorBoard:
    """The run directory's event file: `tensorboard --logdir model`. Always on; its errors (a full disk) end the
    run as any failed write does."""

    label, optional = "TensorBoard", False

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        pass

    @staticmethod
    def wanted(config: dict[str, Any]) -> bool:
        return True

    def __init__(self, config: dict[str, Any], run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def finish(self, config: dict[str, Any], metrics: dict[str, float], files: list[Path]) -> None:
        """The flags and final metrics for the HParams tab, in the run's own event file (one row per run)."""
        from torch.utils.tensorboard.summary import hparams

        file_writer = self.writer._get_file_writer()
        for summary in hparams(params(config), metrics):
            file_writer.add_summary(summary)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class Wandb:
    """A Weights & Biases run in project --wandb, its files in the run directory's wandb/ (offline mode keeps
    them there for `wandb sync`)."""

    label, optional = "W&B", True

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases, this "
                           "project (WANDB_MODE=offline: local files for `wandb sync`)")  # fmt: skip
        group.add_argument("--wandb_entity", default=None, help="the W&B team or user the project belongs to")
        group.add_argument("--wandb_group", default=None, help="the W&B group (default: the sweep or k-fold run)")

    @staticmethod
    def wanted(config: dict[str, Any]) -> bool:
        if config.get("wandb"):
            require("wandb", "--wandb")
        return bool(config.get("wandb"))

    def __init__(self, config: dict[str, Any], run_dir: Path) -> None:
        import wandb

        ids = config.setdefault("trackers", {})
        ids.setdefault("wandb", uuid.uuid4().hex[:12])
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False, init_timeout=60,
                                  allow_val_change=True)  # a resume may change --epochs  # fmt: skip
        # dir: absolute, as wandb's service process (shared by the runs of one process, a sweep's trials) keeps
        # the working folder it started in.
        self.run = wandb.init(
            project=config["wandb"], entity=config.get("wandb_entity"), name=run_name(config, run_dir),
            group=config.get("wandb_group") or run_group(config, run_dir), id=ids["wandb"], resume="allow",
            dir=str(run_dir.resolve()), config=params(config), settings=settings, reinit="create_new",
        )  # fmt: skip
        self.wandb = wandb

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def finish(self, config: dict[str, Any], metrics: dict[str, float], files: list[Path]) -> None:
        self.run.summary.update(metrics)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class Mlflow:
    """An MLflow run in experiment --mlflow_experiment of the tracking store --mlflow (a local SQLite file by
    default, a folder, or a tracking server's URL), with best.pth and config.json as its artifacts."""

    label, optional = "MLflow", True

    @staticmethod
    def add_flags(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--mlflow", nargs="?", const="default", default=None, metavar="URI",
                           help="also log to MLflow: a tracking URI (alone: sqlite:///MODEL_DIR/mlflow.db), a folder, "
                           "or a server's http://...")  # fmt: skip
        group.add_argument("--mlflow_experiment", default="baseline", help="the MLflow experiment runs go in")

    @staticmethod
    def wanted(config: dict[str, Any]) -> bool:
        if config.get("mlflow"):
            require("mlflow", "--mlflow")
        return bool(config.get("mlflow"))

    @staticmethod
    def tracking_uri(config: dict[str, Any]) -> str:
        uri = config["mlflow"]
        if uri == "default":
            return f"sqlite:///{(Path(config['model_dir']) / 'mlflow.db').resolve()}"
        if "://" in uri:
            return uri
        return str(Path(uri).expanduser().resolve())  # a folder: MLflow's file store

    def __init__(self, config: dict[str, Any], run_dir: Path) -> None:
        import logging

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a server that is down: warn, not wait minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its table creation's INFO lines

        uri = self.tracking_uri(config)
        if uri.startswith(("http://", "https://")):
            import requests

            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        self.client = client = MlflowClient(tracking_uri=uri)
        experiment = self.experiment(uri, config["mlflow_experiment"])
        ids = config.setdefault("trackers", {})
        if ids.get("mlflow"):  # resumed: the same run goes on
            self.run_id = ids["mlflow"]
            client.update_run(self.run_id, status="RUNNING")
            return
        tags = {}
        group = run_group(config, run_dir)
        if group:
            tags["mlflow.parentRunId"] = self.parent(experiment, group)
        self.run_id = client.create_run(experiment, run_name=run_name(config, run_dir), tags=tags).info.run_id
        ids["mlflow"] = self.run_id
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in params(config).items()]
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 parameters per call
            client.log_batch(self.run_id, params=flat[start : start + 100])

    def experiment(self, uri: str, name: str) -> str:
        """The experiment's id, created with its artifacts beside a local database (MLflow's default would be
        ./mlruns in whatever folder the run started from)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 (another process created it first)
            return self.client.get_experiment_by_name(name).experiment_id

    def parent(self, experiment: str, group: str) -> str:
        """The parent run of a sweep or k-fold run, created by its first child."""
        quoted = group.replace("'", "\\'")
        found = self.client.search_runs([experiment], f"tags.group = '{quoted}' and tags.parent = 'yes'", max_results=1)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(experiment, run_name=group, tags={"group": group, "parent": "yes"})
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    @staticmethod
    def key(tag: str) -> str:
        return re.sub(r"[^\w\-. /]", "_", tag)  # MLflow's allowed characters (class names hold < and >=)

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(self.key(k), float(v), now, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"figures/{self.key(tag).replace('/', '_')}/"
                              f"epoch{step:03d}.png")  # fmt: skip

    def finish(self, config: dict[str, Any], metrics: dict[str, float], files: list[Path]) -> None:
        self.scalars(metrics, 0)
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


LOGGERS: list[type] = [TensorBoard, Wandb, Mlflow]


def add_flags(group: argparse._ArgumentGroup) -> None:
    for logger in LOGGERS:
        logger.add_flags(group)


def check(config: dict[str, Any]) -> None:
    """Before any image is decoded: a logger's package that is missing exits 2 with the pip command."""
    for logger in LOGGERS:
        logger.wanted(config)
