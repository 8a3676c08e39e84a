"""What a run reports as it trains: the per-epoch line, log.csv, TensorBoard scalars and figures, and the
per-class report saved with best.pth.

    python train.py                          # prints one line per epoch and writes model/exp/log.csv
    tensorboard --logdir model               # Train/*, Val/* scalars, per-class F1, confusion matrix, predictions
    python train.py --wandb mask --mlflow    # the same to W&B and MLflow too (loggers.py); console in train.log
"""

from __future__ import annotations

import csv
import io
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import precision_recall_fscore_support

import cam
import dataset
import labels
import loggers as loggers_module
import utils


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalized NCHW tensors -> NHWC uint8 arrays for display."""
    x = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()


# Grad-CAM of some validation rows: (rows, predicted classes, true classes) -> (the images as the network sees them,
# NHWC uint8; their maps), or None when the run draws no maps.
Explain = Callable[[list[int], list[int], list[int]], "tuple[np.ndarray, cam.Maps] | None"]

AVERAGES = ("ema", "swa")  # the weight averages validated beside the model: their columns are {name}_val_*


def log_line(row: dict[str, Any], epochs: int, eval_metric: str = "macro_f1") -> str:
    """The one line printed per epoch, with every metric of `row`, the score best.pth is chosen on (--eval_metric)
    and the elapsed time."""
    ema = "".join(
        f" {name} f1 {row[f'{name}_val_f1']:.4f} loss {row[f'{name}_val_loss']:.4f}"
        for name in AVERAGES
        if f"{name}_val_f1" in row
    )
    tasks = "".join(f" {t} {row[f'val_{t}_acc']:.1%}" for t in labels.TASKS if f"val_{t}_acc" in row)
    return (
        f"epoch {row['epoch']:>3}/{epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2%} "
        f"f1 {row['train_f1']:.4f} | val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2%} "
        f"f1 {row['val_f1']:.4f}{ema}{' |' + tasks if tasks else ''} | worst {row['val_worst']} | "
        f"{eval_metric} {row['score']:.4f} | lr {row['lr']:.2e} | {row['time_s']:.1f}s"
        f"{' | best' if row['best'] else ''}"
    )


def task_metrics(data: Any, targets: np.ndarray, preds: np.ndarray, worst: int = 3) -> dict[str, Any]:
    """Accuracy of each task (mask, gender, age band) for mask-competition data, and the `worst` classes by F1
    (among those in the truth): where to look before changing anything."""
    targets, preds = np.asarray(targets), np.asarray(preds)
    out: dict[str, Any] = {}
    if dataset.is_mask_data(data):
        for task, truth, pred in zip(labels.TASKS, labels.decode(targets), labels.decode(preds), strict=True):
            out[f"val_{task}_acc"] = float((truth == pred).mean())
    f1 = utils.f1_per_class(targets, preds, len(data.class_names))
    present = [k for k in np.argsort(f1, kind="stable") if (targets == k).any()][:worst]
    out["val_worst"] = ", ".join(f"{data.class_names[k]} {f1[k]:.2f}" for k in present)
    return out


def write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite log.csv atomically with every epoch so far; a column that starts later (the SWA average's from
    --swa_start) is empty before."""
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(f: io.TextIOBase) -> None:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    utils.atomic_write(path, write)


def read_log(path: Path) -> list[dict[str, str]]:
    """The rows of a log.csv (values as text), [] when there is none yet."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def class_report(targets: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support of every class (0 where undefined: sklearn's zero_division=0)."""
    k = len(class_names)
    if len(targets) == 0:  # sklearn refuses empty inputs; every count is 0
        precision = recall = f1 = np.zeros(k)
        support = np.zeros(k, dtype=np.int64)
    else:
        precision, recall, f1, support = precision_recall_fscore_support(
            targets, preds, labels=np.arange(k), zero_division=0
        )
    return pd.DataFrame(
        {"class": list(class_names), "precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)}
    )


def confusion_figure(targets: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> Any:
    """A matplotlib heat map of the confusion matrix, rows normalized to recall, counts written in the cells."""
    k = len(class_names)
    cm = utils.confusion_matrix(targets, preds, k)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * k + 2)
    fig = utils.figure((size, size))
    ax = fig.subplots()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    return fig


def epoch_scalars(row: dict[str, Any], val_targets: np.ndarray, val_preds: np.ndarray,
                  class_names: Sequence[str]) -> dict[str, float]:  # fmt: skip
    """Every numeric metric of an epoch's `row` by its tag (Train/*, Val/*), and each class's validation F1 (one
    tag per class: not TensorBoard's add_scalars, which writes a run folder per class that it lists as runs)."""
    values: dict[str, float] = {}
    for key, value in row.items():
        if key in ("epoch", "best") or not isinstance(value, (int, float)):
            continue
        if key.startswith(("train_", "val_")):
            split, _, name = key.partition("_")
            values[f"{split.capitalize()}/{name}"] = value
        elif key.split("_val_")[0] in AVERAGES:
            name, _, metric = key.partition("_val_")
            values[f"Val/{name}_{metric}"] = value
        else:
            values[f"Train/{key}"] = value
    for name, value in zip(class_names, utils.f1_per_class(val_targets, val_preds, len(class_names)), strict=True):
        values[f"Val_f1_per_class/{name}"] = float(value)
    return values


def log_epoch(
    loggers: Loggers,
    row: dict[str, Any],
    val_targets: np.ndarray,
    val_preds: np.ndarray,
    class_names: Sequence[str],
    sample_images: Callable[[], torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    figures: bool = True,
) -> None:
    """One epoch to every logger: its scalars; with `figures` (the epochs whose model best.pth takes: drawing
    costs about a second each) also the confusion matrix and a grid of the first validation images titled with
    truth and prediction (`sample_images()` returns them, normalized)."""
    epoch = row["epoch"]
    loggers.scalars(epoch_scalars(row, val_targets, val_preds, class_names), epoch)
    if not figures:
        return
    loggers.image("Val/confusion_matrix", utils.render(confusion_figure(val_targets, val_preds, class_names)), epoch)
    images = sample_images()
    titles = [f"truth {class_names[val_targets[i]]}\npred {class_names[val_preds[i]]}" for i in range(len(images))]
    colors = ["green" if val_preds[i] == val_targets[i] else "red" for i in range(len(images))]
    loggers.image("Val/predictions", utils.image_grid(denormalize(images, mean, std), titles, colors=colors), epoch)


def predictions_table(data: Any, indices: np.ndarray, targets: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """One row per image: path, group (the person), truth, prediction, probability of the truth, its loss, and
    the probability of every class."""
    indices = np.asarray(indices)
    truth_prob = probs[np.arange(len(targets)), targets]
    table = pd.DataFrame(
        {
            "path": [str(data.image_paths[i]) for i in indices],
            "group": [str(data.groups[i]) for i in indices],
            "truth": np.asarray(targets),
            "pred": probs.argmax(1),
            "prob_truth": truth_prob,
            "loss": -np.log(np.clip(truth_prob, 1e-12, None)),
        }
    )
    class_probs = pd.DataFrame(probs, columns=[f"prob_{name}" for name in data.class_names])
    return pd.concat([table, class_probs], axis=1)


def save_table(table: pd.DataFrame, path: Path) -> None:
    utils.atomic_write(path, lambda f: table.to_csv(f, index=False))


def worst_figure(
    table: pd.DataFrame,
    class_names: Sequence[str],
    pixels: Callable[[int], np.ndarray],
    n: int = 16,
    explain: Explain | None = None,
) -> np.ndarray:
    """The `n` validation images with the highest loss in a grid (HWC uint8), titled with truth, prediction and loss;
    `pixels(i)` is the image of the table's row i (the validation set's, so a cache is reused). With `explain`, each
    image is shown as the network sees it, beside its Grad-CAM map for the predicted class (cam.py)."""
    worst = table.nlargest(n, "loss")
    titles = [
        f"truth {class_names[t]}\npred {class_names[p]} (loss {loss:.2f})"
        for t, p, loss in zip(worst["truth"], worst["pred"], worst["loss"], strict=True)
    ]
    rows, preds, truths = [int(i) for i in worst.index], worst["pred"].tolist(), worst["truth"].tolist()
    shown = explain(rows, preds, truths) if explain is not None else None
    if shown is not None:
        images, maps = shown
        return cam.pairs_grid(images, maps, titles, ["red"] * len(worst))
    images = np.stack([pixels(i) for i in rows])
    return utils.image_grid(images, titles, colors=["red"] * len(worst))


def write_best_reports(
    run_dir: Path,
    data: Any,
    indices: np.ndarray,
    targets: np.ndarray,
    probs: np.ndarray,
    pixels: Callable[[int], np.ndarray],
    loggers: Loggers | None = None,
    epoch: int = 0,
    explain: Explain | None = None,
) -> None:
    """With best.pth: the per-class report (best_report.csv), every validation prediction (val_predictions.csv),
    and the highest-loss validation images (worst_val.png and the loggers' Val/worst), beside their Grad-CAM maps
    with `explain`."""
    save_table(class_report(targets, probs.argmax(1), data.class_names), run_dir / "best_report.csv")
    table = predictions_table(data, indices, targets, probs)
    save_table(table, run_dir / "val_predictions.csv")
    from PIL import Image

    worst = worst_figure(table, data.class_names, pixels, explain=explain)
    utils.atomic_write(run_dir / "worst_val.png", lambda f: Image.fromarray(worst).save(f, format="png"), binary=True)
    if loggers is not None:
        loggers.image("Val/worst", worst, epoch)


class Loggers:
    """Every logger the run's flags turn on (loggers.LOGGERS: TensorBoard always, W&B, MLflow), called as one.
    An optional logger that fails (a server that cannot be reached, a full quota) warns once and is dropped:
    training goes on, and a run is never lost to its logger."""

    def __init__(self, config: dict[str, Any], run_dir: Path) -> None:
        self.loggers: list[Any] = []
        for kind in loggers_module.LOGGERS:
            if kind.wanted(config):
                self.call(kind, lambda kind=kind: self.loggers.append(kind(config, run_dir)))

    def call(self, logger: Any, action: Callable[[], Any]) -> None:
        if not logger.optional:
            action()
            return
        try:
            action()
        except Exception as e:  # noqa: BLE001 (whatever the library or its server raises, the run goes on)
            if logger in self.loggers:
                self.loggers.remove(logger)
            why = utils.one_line(utils.reason(e))
            print(f"warning: {logger.label} logging is off for the rest of this run ({why}); training goes on, and "
                  "log.csv, train.log and TensorBoard keep everything", file=sys.stderr)  # fmt: skip

    def each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            self.call(logger, lambda logger=logger: getattr(logger, method)(*args))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.each("scalars", values, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An HWC uint8 figure."""
        self.each("image", tag, image, step)

    def finish(self, config: dict[str, Any], metrics: dict[str, float], files: Sequence[Path]) -> None:
        """The final metrics (TensorBoard's HParams tab, W&B's summary, MLflow's metrics) and the run's files."""
        self.each("finish", config, metrics, list(files))

    def close(self, finished: bool) -> None:
        self.each("close", finished)


class ConsoleLog:
    """Everything a run prints (stdout and stderr: the epoch lines, warnings, the summary) also goes to train.log
    in its run directory once `attach` names it, what was printed before first; a resumed run appends. Progress
    bars (redrawn with \\r) stay on the terminal. A log that cannot be written stops; the run does not."""

    def __init__(self) -> None:
        self.pending: list[str] | None = []
        self.file: Any = None

    def __enter__(self) -> ConsoleLog:
        self.streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(sys.stdout, self), Tee(sys.stderr, self)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self.streams
        if self.file is not None:
            self.file.close()
            self.file = None

    def attach(self, run_dir: Path) -> None:
        if self.pending is None:
            return
        try:
            self.file = open(run_dir / "train.log", "a", encoding="utf-8")  # noqa: SIM115 (closed on exit)
            self.file.write("".join(self.pending))
            self.file.flush()
        except OSError:
            self.file = None
        self.pending = None

    def write(self, text: str) -> None:
        if "\r" in text:
            return
        if self.pending is not None:
            self.pending.append(text)
        elif self.file is not None:
            try:
                self.file.write(text)
                if "\n" in text:
                    self.file.flush()
            except OSError:
                self.file = None


class Tee:
    """A console stream that also hands what it is given to a ConsoleLog."""

    def __init__(self, stream: Any, log: ConsoleLog) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding: the console's own
        return getattr(self.stream, name)


def write_oof(run_dir: Path, data: Any, folds: Sequence[dict[str, Any]]) -> float:
    """oof.csv of a k-fold run: every image predicted once, by the best model of the fold that did not train on
    it; prints and returns the out-of-fold macro F1."""
    labels = np.asarray(data.labels)
    parts = []
    for fold, result in enumerate(folds):
        idx = np.asarray(result["val_idx"])
        parts.append(predictions_table(data, idx, labels[idx], result["probs"]).assign(fold=fold))
    table = pd.concat(parts, ignore_index=True)
    save_table(table, run_dir / "oof.csv")
    f1 = utils.macro_f1(table["truth"].to_numpy(), table["pred"].to_numpy(), data.num_classes)
    fold_f1 = ", ".join(f"{r['best_score']:.4f}" for r in folds)
    print(
        f"Out-of-fold macro F1 {f1:.4f} over {len(table)} images (folds' best scores: {fold_f1}); saved "
        f"{run_dir / 'oof.csv'}"
    )
    print(f"Next: python inference.py --model_dir {shlex.quote(str(run_dir))}")
    return f1
