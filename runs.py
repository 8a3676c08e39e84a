"""See why a run scores what it scores: compare the runs of a model folder, and list persons whose labels the
models consistently contradict (candidates for a human to check; nothing is ever changed or applied).

    python runs.py                                  # every run under $SM_MODEL_DIR (or ./model), best F1 first
    python runs.py model --csv output/runs.csv      # the same table, also saved as CSV
    python runs.py --suspects model/kfold           # persons whose gender or age band the models contradict
    python runs.py --cam model/exp                  # per class: images right and wrong, beside their Grad-CAM maps

The table has one row per run directory (config.json + log.csv; a k-fold run is one row: the mean of its folds'
best F1, and the macro F1 of its oof.csv), then one column per train.py flag whose value differs between the runs.
--suspects writes RUN_DIR/label_suspects.csv and RUN_DIR/label_fixes_template.csv (id,field,value): check the
photos, keep the rows you confirm, and train with `python train.py --label_fixes FILE`. Photos are flagged by
cleanlab's confident learning (and its estimate of wrong labels per value goes to label_issue_estimates.csv), or
with --method disagreement when the most probable value is another one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import labels
import rundir
import settings
import utils
from utils import UserError

# Flags that name or locate a run rather than change how it trains, and those with columns of their own.
NOT_COMPARED = ("name", "model_dir", "resume", "model", "resize", "eval_metric", "config", "sweep", "trackers")
METHODS = ("cleanlab", "disagreement")  # --suspects --method; the first is the default
SUSPECT_COLUMNS = [
    "group",
    "field",
    "label",
    "predicted",
    "photos",
    "share_disagree",
    "mean_prob_label",
    "evidence",
    "example_path",
]


class UnreadableRun(Exception):
    """A run directory whose config.json or log.csv cannot be read; it is skipped with a warning."""


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    table = p.add_argument_group("run table")
    table.add_argument(
        "model_dir",
        nargs="?",
        default=settings.env_value("SM_MODEL_DIR", "./model"),
        metavar="MODEL_DIR",
        help="folder searched (recursively) for run directories [$SM_MODEL_DIR]",
    )
    table.add_argument("--csv", default=None, metavar="FILE", help="also save the table as this CSV file")
    suspects = p.add_argument_group("label suspects")
    suspects.add_argument(
        "--suspects",
        default=None,
        metavar="RUN_DIR",
        help="instead of the table: persons whose gender or age band the run's predictions contradict, from "
        "RUN_DIR/oof.csv (k-fold: every person) or else RUN_DIR/val_predictions.csv (validation persons only)",
    )
    suspects.add_argument(
        "--min_share",
        type=float,
        default=0.8,
        help="a person is a candidate when at least this share (0..1] of their photos contradict the label",
    )
    suspects.add_argument(
        "--method",
        choices=METHODS,
        default=METHODS[0],
        help="how a photo is found to contradict "
        "its label: cleanlab's confident learning, or the most probable value being another one",
    )
    maps = p.add_argument_group("class activation maps")
    maps.add_argument(
        "--cam",
        default=None,
        metavar="RUN_DIR",
        help="instead of the table: RUN_DIR/cam/ gets a "
        "figure per class of validation images the run gets right and wrong, beside their Grad-CAM maps",
    )
    maps.add_argument("--images", type=int, default=4, help="--cam: images per class, right and wrong each")
    maps.add_argument("--device", default="auto", help="--cam: where the maps are computed (auto, cpu, cuda, cuda:1)")
    return p


# ---------------------------------------------------------------------------------------------------
# The run table.
def read_part(folder: Path) -> dict[str, Any]:
    """Config, best F1, its epoch and the log's time of one run directory (or fold); `UnreadableRun` saying why."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableRun(f"config.json cannot be read ({utils.reason(e)})") from None
    if not isinstance(config, dict):
        raise UnreadableRun("config.json does not hold an object of flags")
    try:
        log = pd.read_csv(folder / "log.csv")
        # The F1 of the weights best.pth holds (the EMA weights' where they scored better): the row's score when
        # F1 chose them; older logs without a score column chose by F1 too.
        f1 = pd.to_numeric(log["val_f1"], errors="raise")
        if "score" in log and config.get("eval_metric", "macro_f1") == "macro_f1":
            f1 = pd.to_numeric(log["score"], errors="raise")
        elif "ema_val_f1" in log and "score" not in log:
            f1 = np.fmax(f1, pd.to_numeric(log["ema_val_f1"], errors="raise"))
        epochs = pd.to_numeric(log["epoch"], errors="raise")
        chosen = log["best"].astype(str).str.lower() == "true"  # the epochs that wrote best.pth
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, ValueError) as e:
        raise UnreadableRun(f"log.csv cannot be read ({utils.reason(e)})") from None
    if not chosen.any():
        raise UnreadableRun("log.csv has no finished epoch")
    best = int(chosen[chosen].index[-1])  # the last epoch that wrote best.pth: what best.pth holds
    mtime = (folder / "log.csv").stat().st_mtime
    return {
        "config": config,
        "best_f1": float(f1[best]),
        "score": float(log["score"][best]) if "score" in log else float(f1[best]),
        "epoch": int(epochs[best]),
        "mtime": mtime,
    }


def oof_f1(run_dir: Path, config: dict[str, Any]) -> float:
    """Macro F1 of a k-fold run's oof.csv (every image, predicted by the fold that did not train on it); NaN
    when there is none (a k-fold run still training) or it cannot be read (with a warning)."""
    path = run_dir / "oof.csv"
    if not path.is_file():
        return float("nan")
    try:
        oof = pd.read_csv(path, usecols=["truth", "pred"])
        return utils.macro_f1(oof["truth"].to_numpy(), oof["pred"].to_numpy(), config.get("num_classes"))
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        print(f"warning: {path} cannot be read ({utils.reason(e)}); its oof_f1 is left empty", file=sys.stderr)
        return float("nan")


def read_run(run_dir: Path, parts: list[Path], name: str) -> dict[str, Any] | None:
    """One row of the table (with the run's config for the flag columns), or None after a warning."""
    read = []
    for part in parts:
        try:
            read.append(read_part(part))
        except UnreadableRun as e:
            print(f"warning: skipping {part}: {e}", file=sys.stderr)
    if not read:
        return None
    config = dict(read[0]["config"])
    row: dict[str, Any] = {"name": name}
    if parts == [run_dir]:
        row.update(best_f1=read[0]["best_f1"], epoch=str(read[0]["epoch"]))
    else:
        row.update(
            best_f1=float(np.mean([r["best_f1"] for r in read])),
            epoch="/".join(str(r["epoch"]) for r in read),
            folds=f"{len(read)}/{config.get('n_splits', '?')}",
            oof_f1=oof_f1(run_dir, config),
        )
    resize = config.get("resize")
    row.update(
        date=datetime.datetime.fromtimestamp(max(r["mtime"] for r in read)).strftime("%Y-%m-%d %H:%M"),
        model=config.get("model", "?"),
        eval_metric=config.get("eval_metric", "macro_f1"),
        best_score=float(np.mean([r["score"] for r in read])),
        size="x".join(map(str, resize)) if isinstance(resize, list) else "?",
        config=config,
    )
    return row


def show_value(value: Any) -> str:
    """A flag's value as the command line writes it (lists space-separated)."""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def differing_flags(configs: list[dict[str, Any]]) -> list[str]:
    """train.py's flags (in config order) whose values are not the same in every config. A flag missing from an
    older config counts as its default, as the newer runs' config.json record it (`flag_defaults`), so adding a
    flag to train.py does not make every older run differ."""
    defaults: dict[str, Any] = {}
    for config in configs:
        defaults.update(config.get("flag_defaults") or {})
    flags = [f for f in dict.fromkeys(k for c in configs for k in c) if f not in NOT_COMPARED + rundir.DATA_FACTS]
    missing = object()

    def value(config: dict[str, Any], flag: str) -> str:
        return json.dumps(config.get(flag, defaults.get(flag, missing)), default=repr, sort_keys=True)

    return [f for f in flags if len({value(c, f) for c in configs}) > 1]


def run_table(root: Path) -> pd.DataFrame:
    """One row per run under `root`, best F1 first: name, date, best_f1, epoch, [folds, oof_f1], model, size,
    [eval_metric, best_score: where a run selected best.pth by another metric], then every flag that differs
    between the runs ('-': not in that run's config.json)."""
    settings.need(root, True, str(root), "pass the folder of run directories (default $SM_MODEL_DIR or ./model)")
    rows = []
    for run_dir, parts in rundir.find_runs(root):
        rel = run_dir.relative_to(root).as_posix()
        row = read_run(run_dir, parts, run_dir.resolve().name if rel == "." else rel)
        if row is not None:
            rows.append(row)
    if not rows:
        raise UserError(
            f"no run directories (config.json and log.csv) under {root}: train one with python train.py, or pass "
            "the folder that holds them"
        )
    configs = [row.pop("config") for row in rows]
    for flag in differing_flags(configs):
        for row, config in zip(rows, configs, strict=True):
            row[flag] = show_value(config[flag]) if flag in config else "-"
    table = pd.DataFrame(rows)
    kfold = ["folds", "oof_f1"] if "folds" in table else []
    # What selected best.pth, where a run chose by something else than macro F1 (--eval_metric).
    scored = ["eval_metric", "best_score"] if (table["eval_metric"] != "macro_f1").any() else []
    table = table.drop(columns=[c for c in ("eval_metric", "best_score") if c not in scored])
    first = ["name", "date", "best_f1", "epoch", *kfold, "model", "size", *scored]
    table = table[first + [c for c in table.columns if c not in first]]
    return table.sort_values(["best_f1", "name"], ascending=[False, True], kind="stable").reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    f1 = "{:.4f}".format
    return table.to_string(index=False, na_rep="-", formatters={"best_f1": f1, "oof_f1": f1})


def save_csv(table: pd.DataFrame, path: Path, header: str = "") -> None:
    utils.atomic_write(path, lambda f: f.write(header + table.to_csv(index=False)))


# ---------------------------------------------------------------------------------------------------
# Label suspects.
def run_age_bounds(run_dir: Path) -> tuple[int, int]:
    """The --age_bounds of the run that wrote RUN_DIR's predictions: from its config.json, or its first fold's for a
    k-fold run; the default bounds when there is none (a predictions file on its own)."""
    for folder in [run_dir, *rundir.fold_dirs(run_dir)]:
        if (folder / rundir.CONFIG).is_file():
            bounds = rundir.read_config(folder).get("age_bounds", labels.DEFAULT_AGE_BOUNDS)
            return int(bounds[0]), int(bounds[1])
    return labels.DEFAULT_AGE_BOUNDS


def mask_fields(class_names: list[str], age_bounds: Sequence[int]) -> dict[str, list[str]]:
    """{'gender': its value names, 'age': the age band names} of mask-competition predictions, whose class names are
    the 18 of labels.mask_class_names(age_bounds); a `UserError` for any other classes."""
    if list(class_names) != labels.mask_class_names(age_bounds):
        example = labels.mask_class_names(age_bounds)[0]
        raise UserError(
            f"--suspects needs mask-competition predictions (18 classes named mask/gender/age, e.g. {example}, with "
            f"the run's --age_bounds {age_bounds[0]} {age_bounds[1]}); these have {len(class_names)} class(es) "
            f"({utils.listing(class_names)}): gender and age suspects apply to that data only, or use --method "
            "cleanlab, which checks any classes"
        )
    return {"gender": list(labels.GENDER_NAMES), "age": list(labels.age_names(age_bounds))}


@dataclass
class Field:
    """A label field the suspects are checked on: its value names, the value of each class, and whether it is a
    label of a whole person (gender, age band) or of one image (the mask; any class of other data)."""

    names: list[str]
    value_of: np.ndarray
    per_image: bool


def label_fields(class_names: list[str], age_bounds: Sequence[int], method: str) -> dict[str, Field]:
    """The fields of `method`: gender and age band of mask predictions (cleanlab: the mask too); cleanlab on any
    other data checks the class (`label`, the field train.py --label_fixes sets there)."""
    mask_like = len(class_names) == 18 and all(c.count("/") == 2 for c in class_names)  # any --age_bounds
    if method == "cleanlab" and not mask_like:
        return {"label": Field(list(class_names), np.arange(len(class_names)), per_image=True)}
    names = mask_fields(class_names, age_bounds)
    mask_of, gender_of, age_of = labels.decode(np.arange(len(class_names)))
    fields = {"gender": Field(names["gender"], gender_of, False), "age": Field(names["age"], age_of, False)}
    if method == "cleanlab":
        fields["mask"] = Field(list(labels.MASK_NAMES), mask_of, per_image=True)
    return fields


def read_predictions(run_dir: Path) -> tuple[pd.DataFrame, Path, list[str]]:
    """(predictions table, its path, class names in label order) of RUN_DIR/oof.csv, else val_predictions.csv."""
    path = next((run_dir / n for n in ("oof.csv", "val_predictions.csv") if (run_dir / n).is_file()), None)
    if path is None:
        raise UserError(
            f"--suspects {run_dir} holds neither oof.csv nor val_predictions.csv: pass a run directory trained by "
            "train.py (a k-fold run, --fold all, covers every person)"
        )
    try:
        table = pd.read_csv(path, dtype={"group": str, "path": str})  # ids keep their leading zeros
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{path} cannot be read ({utils.reason(e)}); retrain the run to rewrite it") from None
    class_names = [c[len("prob_") :] for c in table.columns if c.startswith("prob_") and c != "prob_truth"]
    missing = [c for c in ("path", "group", "truth") if c not in table]
    if missing or not class_names or table.empty:
        raise UserError(
            f"{path} lacks {', '.join(missing) or 'prob_<class> columns or rows'}: it was written by an older "
            "train.py; retrain the run to rewrite it"
        )
    truth = pd.to_numeric(table["truth"], errors="coerce")
    if not truth.between(0, len(class_names) - 1).all() or (truth % 1 != 0).any():
        raise UserError(f"{path}: column truth must hold class indices 0..{len(class_names) - 1}; retrain the run")
    if table["group"].isna().any():
        raise UserError(f"{path} has images without a group (person id): label suspects need one per image")
    return table, path, class_names


def flag_photos(label: np.ndarray, marginal: np.ndarray, method: str) -> tuple[np.ndarray, pd.DataFrame | None]:
    """(which photos contradict their label, cleanlab's estimate of wrong labels per value or None).

    disagreement: the most probable value is another one. cleanlab: confident learning
    (cleanlab.filter.find_label_issues, pruned by the estimated noise rates), whose per-value thresholds are the
    models' mean confidence in that value, so an unsure value (the oldest age band) is not flagged wholesale."""
    if method == "disagreement":
        return marginal.argmax(1) != label, None
    from cleanlab.dataset import rank_classes_by_label_quality
    from cleanlab.filter import find_label_issues

    present = np.unique(label)
    if len(present) < 2:  # one value only: nothing to confuse it with
        return np.zeros(len(label), dtype=bool), None
    # cleanlab wants every value it is given to occur: keep the labelled values' columns, renormalized.
    probs = marginal[:, present] / np.clip(marginal[:, present].sum(1, keepdims=True), 1e-12, None)
    index = np.searchsorted(present, label)
    flagged = find_label_issues(index, probs, n_jobs=1)
    estimate = rank_classes_by_label_quality(labels=index, pred_probs=probs)
    estimate["value"] = present[estimate["Class Index"].to_numpy()]
    return flagged, estimate


def label_suspects(
    table: pd.DataFrame,
    class_names: list[str],
    min_share: float,
    age_bounds: Sequence[int] = labels.DEFAULT_AGE_BOUNDS,
    method: str = "disagreement",
) -> pd.DataFrame:
    """Per person, field and labelled value (per image for the mask and other data's class): photos, the share of
    them flagged as contradicting the label (`share_disagree`; how, `flag_photos` says for each method), mean
    probability of the labelled value, the value predicted instead most often, and the photo that contradicts the
    label most. Returns the candidates (share >= min_share), ranked by `evidence`, lowest first: the sum over the
    photos of log(K * probability of the label), K the field's number of values (2 genders, 3 age bands), the log
    of how much likelier chance makes the label than the models do. So a gender label at p 0.2 is as suspect as an
    age band at p 0.13, an unsure model does not rank its age guesses first, and seven photos against a person's
    label outweigh one photo's mask at the same probability. `.attrs["estimates"]` holds
    cleanlab's estimated count of wrong labels per field and value (empty for disagreement).

    A field's probability is the sum of the class probabilities over the other fields (P(female) = sum over
    mask and age band), and a photo's predicted value the most probable one. `predicted` is the value the
    flagged photos name most often (for a candidate, the majority of all photos when min_share > 0.5).
    `age_bounds` are the run's --age_bounds (`run_age_bounds`), which name the classes and the age bands."""
    fields = label_fields(class_names, age_bounds, method)
    probs = table[[f"prob_{c}" for c in class_names]].to_numpy(dtype=np.float64)
    truth = table["truth"].to_numpy(dtype=np.int64)
    rows, estimates = [], []
    for name, field in fields.items():
        names = field.names
        marginal = np.stack([probs[:, field.value_of == v].sum(1) for v in range(len(names))], 1)
        label = field.value_of[truth]
        flagged, estimate = flag_photos(label, marginal, method)
        if estimate is not None:
            estimates += [{"field": name, "label": names[int(r.value)], "photos": int((label == r.value).sum()),
                           "estimated_wrong": int(r["Label Issues"])} for _, r in estimate.iterrows()]  # fmt: skip
        per_photo = pd.DataFrame(
            {
                "group": table["group"].to_numpy(),
                "key": table["path" if field.per_image else "group"].to_numpy(),
                "label": label,
                "pred": marginal.argmax(1),
                "flagged": flagged,
                "prob_label": marginal[np.arange(len(label)), label],
                "path": table["path"].to_numpy(),
            }
        )
        if field.per_image:  # only the flagged images can be candidates: skip grouping thousands of others
            per_photo = per_photo[per_photo["flagged"]]
        # By person (or image) and labelled value: a person id naming two folders with different labels gives two.
        for (_, given), photos in per_photo.groupby(["key", "label"], sort=True):
            wrong = photos[photos["flagged"]]
            counts = np.bincount(wrong["pred"], minlength=len(names))
            mass = marginal[wrong.index].sum(0) if len(wrong) else np.zeros(len(names))
            instead = max((v for v in range(len(names)) if v != given), key=lambda v: (counts[v], mass[v]))
            rows.append(
                {
                    "group": photos["group"].iloc[0],
                    "field": name,
                    "label": names[given],
                    "predicted": names[instead],
                    "photos": len(photos),
                    "share_disagree": len(wrong) / len(photos),
                    "mean_prob_label": float(photos["prob_label"].mean()),
                    "evidence": float(np.log(np.clip(photos["prob_label"].to_numpy() * len(names), 1e-9, None)).sum()),
                    "example_path": photos.loc[photos["prob_label"].idxmin(), "path"],
                }
            )
    stats = pd.DataFrame(rows, columns=SUSPECT_COLUMNS)
    candidates = stats[stats["share_disagree"] >= min_share - 1e-9]  # 4/5 photos is a share of 0.8
    result = candidates.sort_values(["evidence", "group", "field"], kind="stable").reset_index(drop=True)
    result.attrs["estimates"] = pd.DataFrame(estimates, columns=["field", "label", "photos", "estimated_wrong"])
    return result


def fixes_template(suspects: pd.DataFrame) -> pd.DataFrame:
    """The candidates as label-fix rows id,field,value (the predicted value) for train.py --label_fixes, with a
    note the reader ignores. A label of one image (the mask, other data's class) is fixed by its path. An age fix
    needs the person's age in years: the predicted band is a placeholder that train.py refuses until it is
    replaced."""
    note = [
        f"labelled {r.label}; {r.share_disagree:.0%} of {r.photos} photos contradict it; "
        f"mean p(label) {r.mean_prob_label:.3f}; e.g. {r.example_path}"
        + ("; write the age in years" if r.field == "age" else "")
        for r in suspects.itertuples()
    ]
    per_image = suspects["field"].isin(("mask", "label"))
    ids = suspects["example_path"].where(per_image, suspects["group"])
    return pd.DataFrame({"id": ids, "field": suspects["field"], "value": suspects["predicted"], "note": note})


def report_suspects(run_dir: Path, min_share: float, method: str) -> pd.DataFrame:
    """Write RUN_DIR/label_suspects.csv and RUN_DIR/label_fixes_template.csv (and for cleanlab
    RUN_DIR/label_issue_estimates.csv); print the estimates and the top 10."""
    table, path, class_names = read_predictions(run_dir)
    suspects = label_suspects(table, class_names, min_share, run_age_bounds(run_dir), method)
    estimates = suspects.attrs["estimates"]
    if method == "cleanlab":
        save_csv(estimates, run_dir / "label_issue_estimates.csv")
        per_person = table.groupby("group").size().median()
        print(f"cleanlab estimates these labels are wrong (photos; about {per_person:g} photos per person), saved in "
              f"{run_dir / 'label_issue_estimates.csv'}:")  # fmt: skip
        for field, rows in estimates.groupby("field", sort=False):
            counts = ", ".join(f"{r.label} {r.estimated_wrong} of {r.photos}" for r in rows.itertuples())
            print(f"  {field}: {counts}")
    out, template = run_dir / "label_suspects.csv", run_dir / "label_fixes_template.csv"
    save_csv(suspects, out)
    save_csv(
        fixes_template(suspects),
        template,
        header="# Candidates from runs.py --suspects: keep only the rows you confirm by looking at the photos; an age "
        "value must be the age in years\n",
    )
    kind = "out-of-fold predictions" if path.name == "oof.csv" else "validation predictions only"
    print(
        f"Label suspects from {path} ({len(table)} photos of {table['group'].nunique()} persons, {kind}): "
        f"{len(suspects)} person-field pair(s) with at least {min_share:.0%} of the photos contradicting the label "
        f"({method})."
    )
    print("These are candidates for a human to look at, never applied: training data is unchanged.")
    if len(suspects):
        top = suspects.head(10)
        print(
            top.to_string(
                index=False,
                formatters={
                    "share_disagree": "{:.2f}".format,
                    "mean_prob_label": "{:.3f}".format,
                    "evidence": "{:.1f}".format,
                },
            )
        )
    print(f"Saved {out} (all {len(suspects)}) and {template} (rewritten each time: copy it before editing).")
    print(
        f"Next: look at the photos; copy {template.name} to label_fixes.csv, delete the rows you do not confirm, "
        "write ages in years, then: python train.py --label_fixes label_fixes.csv"
    )
    return suspects


# ---------------------------------------------------------------------------------------------------
# Class activation maps.
def cam_figures(run_dir: Path, n: int, device: str = "auto") -> list[Path]:
    """RUN_DIR/cam/class{k}.png for every class: up to `n` validation images the run gets right (most confident
    first) and `n` it gets wrong (highest loss first), each as the network sees it beside its Grad-CAM map for the
    predicted class (cam.py). A k-fold run: each fold's own validation images, in its fold{k}/cam/."""
    import torch
    from PIL import Image

    import cam
    import devices
    import imaging
    import report

    parts = rundir.fold_dirs(run_dir) or [run_dir]
    written = []
    for part in parts:
        model, config = rundir.load_model(part / "best.pth")
        if not (part / "val_predictions.csv").is_file():
            raise UserError(f"--cam {part} holds no val_predictions.csv: pass a run directory trained by train.py")
        table, _, class_names = read_predictions(part)
        aug = rundir.build_augmentation(config)
        try:
            explainer = cam.Explainer(model.to(devices.select_device(device)), config["resize"], class_names)
        except cam.NoCamLayer as e:
            raise UserError(f"--cam {part}: no Grad-CAM for --model {config['model']} ({e})") from None
        out, before = part / "cam", len(written)
        out.mkdir(exist_ok=True)
        for k, name in enumerate(class_names):
            rows = table[table["truth"] == k]
            right = rows[rows["pred"] == k].nlargest(n, "prob_truth")
            wrong = rows[rows["pred"] != k].nlargest(n, "loss")
            chosen = pd.concat([right, wrong])
            if chosen.empty:
                continue
            inputs = []
            for path in chosen["path"]:
                try:
                    pixels = imaging.decode_fixed(path, aug.load_size)
                except (OSError, ValueError) as e:
                    raise UserError(f"--cam {part}: {path} cannot be read ({utils.reason(e)}); run runs.py from the "
                                    "folder the run was trained in, or where its data is") from None  # fmt: skip
                inputs.append(aug.eval_transform(Image.fromarray(pixels)))
            images = torch.stack(inputs)
            maps = explainer.explain(images, chosen["pred"].tolist(), chosen["truth"].tolist())
            titles = [f"truth {name}\n{'right' if p == k else 'wrong'}: {class_names[p]} (p {q:.2f})"
                      for p, q in zip(chosen["pred"], chosen[f"prob_{name}"], strict=True)]  # fmt: skip
            colors = ["green" if p == k else "red" for p in chosen["pred"]]
            grid = cam.pairs_grid(report.denormalize(images, config["mean"], config["std"]), maps, titles, colors)
            path = out / f"class{k:02d}.png"
            utils.atomic_write(path, lambda f, grid=grid: Image.fromarray(grid).save(f, format="png"), binary=True)
            written.append(path)
        print(f"Grad-CAM of {part} (layer {explainer.layer.name}): {len(written) - before} figure(s) in {out}")
    return written


RANGES: dict[str, settings.Range] = {  # every numeric flag: what it must be (settings.check_ranges)
    "min_share": ("above 0 and at most 1 (e.g. 0.8)", lambda v: 0 < v <= 1),
    "images": ("at least 1 (images per class, right and wrong each)", lambda v: v >= 1),
}


def main(args: Namespace) -> pd.DataFrame:
    settings.check_ranges(args, RANGES)
    if args.suspects is not None:
        return report_suspects(Path(args.suspects), args.min_share, args.method)
    if args.cam is not None:
        return pd.DataFrame({"figure": [str(p) for p in cam_figures(Path(args.cam), args.images, args.device)]})
    root = Path(args.model_dir)
    if args.csv and Path(args.csv).is_dir():  # checked before the table is read, as the folder below
        raise UserError(f"--csv {args.csv} is a folder, not a file: give the path of the CSV to write")
    if args.csv:
        settings.make_dir(Path(args.csv).parent, "--csv")
    table = run_table(root)
    kfold = " (k-fold: the mean over its folds; oof_f1: over every image)" if "oof_f1" in table else ""
    print(f"{len(table)} run(s) under {root}, best validation macro F1 first{kfold}; then the flags that differ:")
    print(format_table(table))
    if args.csv:
        save_csv(table, Path(args.csv))
        print(f"Saved {args.csv}")
    return table


if __name__ == "__main__":
    utils.run_main(lambda argv: main(get_parser().parse_args(argv)), sys.argv[1:])  # .env's errors too
