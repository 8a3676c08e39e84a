"""The competition's second stage from the command line: weight averaging (--swa_start), distillation from an
ensemble (--teacher) and pseudo-labels (--pseudo_labels)."""

from __future__ import annotations

import os
import signal
import types

import pandas as pd
import pytest
import torch
from PIL import Image

import engine
import model as model_module
import schedule
import train
import utils
from conftest import run_script, tiny_run_args


def flags(demo_root, tmp_path, *extra: str) -> list[str]:
    return tiny_run_args(demo_root, "--num_workers", "0", "--model_dir", str(tmp_path / "model"), *extra)


def train_here(argv: list[str]):
    return train.main(train.parse_args(argv), argv=argv)


def one_error_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# SWA
def test_the_swa_model_is_the_mean_of_the_weights_it_averaged_with_batchnorm_statistics_of_the_training_split():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(64, 3)
    )
    images = torch.randn(12, 3, 4, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(12)), batch_size=4)
    sampler = types.SimpleNamespace(set_epoch=lambda epoch: None)
    state = types.SimpleNamespace(ema=None, swa=schedule.make_swa(model), config={"swa_start": 2}, model=model)
    split = types.SimpleNamespace(train_loader=loader, sampler=sampler, batch_transform=lambda x: x * 2)
    trainer = types.SimpleNamespace(state=state, split=split, device=torch.device("cpu"))
    given = []
    for epoch in (1, 2, 3, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        averages = engine.Trainer.averages(trainer, epoch)
        assert [name for name, _ in averages] == ([] if epoch < 2 else ["swa"])
        if epoch >= 2:
            given.append({k: v.clone() for k, v in model.named_parameters()})
    averaged = dict(state.swa.module.named_parameters())
    for name in averaged:
        torch.testing.assert_close(averaged[name], torch.stack([g[name] for g in given]).mean(0))
    assert int(state.swa.n_averaged) == 3
    # BatchNorm: the plain average over the training batches, as the device sees them (x 2), of each batch's
    # mean and (unbiased) variance, what update_bn's momentum None gives.
    features = torch.nn.functional.conv2d(images * 2, averaged["0.weight"], averaged["0.bias"]).split(4)
    bn = state.swa.module[1]
    torch.testing.assert_close(bn.running_mean, torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([f.var((0, 2, 3)) for f in features]).mean(0))


def test_swa_is_validated_from_its_start_and_an_interrupted_run_resumes_to_the_same_average(
    demo_root, tmp_path, monkeypatch
):
    run = flags(demo_root, tmp_path, "--epochs", "3", "--swa_start", "2", "--batch_size", "16")
    full = train_here([*run, "--name", "full"])
    log = pd.read_csv(full / "log.csv")
    assert log["swa_val_f1"].isna().tolist() == [True, False, False]
    assert "swa f1" in (full / "log.csv").read_text() or "swa_val_f1" in log
    saved = utils.load_checkpoint(full / "last.pth")
    assert int(saved["swa"]["n_averaged"]) == 2
    lrs = log["lr"].tolist()
    assert lrs[1] == pytest.approx(lrs[2])  # SWALR holds the lr reached at --swa_start

    original = engine.train_one_epoch

    def interrupt_epoch_3(model, loader, criterion, state, *rest, **kwargs):
        if state.progress["epoch"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # caught: the step finishes, then last.pth is written
        return original(model, loader, criterion, state, *rest, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", interrupt_epoch_3)
    with pytest.raises(utils.Stopped) as stop:
        train_here([*run, "--name", "part"])
    monkeypatch.setattr(engine, "train_one_epoch", original)
    part = stop.value.run_dir
    assert train_here(["--resume", str(part)]) == part
    a, b = utils.load_checkpoint(full / "last.pth"), utils.load_checkpoint(part / "last.pth")
    assert a["swa"].keys() == b["swa"].keys() and all(torch.equal(a["swa"][k], b["swa"][k]) for k in a["swa"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    logs = [pd.read_csv(r / "log.csv").drop(columns="time_s") for r in (full, part)]
    pd.testing.assert_frame_equal(logs[0], logs[1])


def test_best_pth_holds_the_swa_weights_when_they_score_better(demo_root, tmp_path):
    run_dir = train_here(flags(demo_root, tmp_path, "--epochs", "3", "--swa_start", "1", "--batch_size", "16"))
    log = pd.read_csv(run_dir / "log.csv")
    best = utils.load_checkpoint(run_dir / "best.pth")
    row = log[log["epoch"] == best["epoch"]].iloc[0]
    last = utils.load_checkpoint(run_dir / "last.pth")
    holds_swa = row["swa_val_f1"] > row["val_f1"]
    assert row["score"] == pytest.approx(max(row["swa_val_f1"], row["val_f1"]))
    if best["epoch"] == 3:  # the last epoch: best.pth's weights are last.pth's model or its SWA average
        swa_weights = {k[len("module.") :]: v for k, v in last["swa"].items() if k.startswith("module.")}
        expected = swa_weights if holds_swa else last["model"]
        assert all(torch.equal(best["model"][k], expected[k]) for k in best["model"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "3", "--swa_start", "4"], "--swa_start 4 is past --epochs 3"),
        (["--swa_lr", "0.01"], "--swa_lr 0.01 needs --swa_start EPOCH"),
        (["--swa_start", "-1"], "--swa_start -1 must be 0 (off) or an epoch to start from"),
    ],
)
def test_swa_flags_that_cannot_work_exit_2_with_one_line(demo_root, tmp_path, extra, message):
    done = run_script("train.py", *flags(demo_root, tmp_path, *extra), cwd=tmp_path)
    assert message in one_error_line(done)
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------------------------------
# Distillation
def test_the_distillation_loss_equals_the_hand_computed_value():
    import math

    import distill

    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    alpha, t, base = 0.7, 2.0, torch.tensor(1.25)
    kl = 0.0
    for row_s, row_t in zip(student.tolist(), teacher.tolist(), strict=True):
        z = [math.exp(v / t) for v in row_s]
        q = [v / sum(z) for v in z]
        kl += sum(p * math.log(p / qi) for p, qi in zip(row_t, q, strict=True))
    expected = alpha * t**2 * kl / 2 + (1 - alpha) * 1.25
    assert distill.kd_loss(student, teacher, base, alpha, t).item() == pytest.approx(expected, rel=1e-6)


def test_a_teacher_gets_the_batch_in_its_own_normalization_and_size():
    import distill

    pixels = torch.rand(2, 3, 8, 6)
    student = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "resize": [8, 6]}
    teacher = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": [4, 3]}

    def norm(x, c):
        return (x - torch.tensor(c["mean"]).view(1, 3, 1, 1)) / torch.tensor(c["std"]).view(1, 3, 1, 1)

    change = distill._input_change(student, teacher, torch.device("cpu"))
    expected = torch.nn.functional.interpolate(norm(pixels, teacher), size=(4, 3), mode="bilinear")
    torch.testing.assert_close(change(norm(pixels, student)), expected, rtol=1e-5, atol=1e-5)
    same = distill._input_change(student, student, torch.device("cpu"))
    x = norm(pixels, student)
    assert same(x) is x


def test_a_multi_head_teacher_teaches_a_single_head_student_and_stays_unchanged(demo_root, tmp_path, monkeypatch):
    teacher_run = train_here(flags(demo_root, tmp_path, "--name", "teacher"))  # MultiHeadModel: the mask default
    before = utils.load_checkpoint(teacher_run / "best.pth")["model"]
    seen = []
    original = engine.train_one_epoch

    def record(model, loader, criterion, state, *rest, **kwargs):
        teachers = rest[-1]
        seen.append(teachers)
        result = original(model, loader, criterion, state, *rest, **kwargs)
        assert not teachers.training and not any(m.training for m in teachers.models.modules())
        return result

    monkeypatch.setattr(engine, "train_one_epoch", record)
    student = train_here(flags(demo_root, tmp_path, "--model", "BaseModel", "--teacher", str(teacher_run),
                               "--name", "student"))  # fmt: skip
    teachers = seen[0]
    assert type(teachers.models[0]).__name__ == "MultiHeadModel"
    after = teachers.models[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no gradient, no optimizer, no BatchNorm update
    assert not any(p.requires_grad for p in teachers.parameters())
    config = pd.read_json(student / "config.json", typ="series")
    assert config["teacher"] == [str((teacher_run / "best.pth").resolve())] and config["model"] == "BaseModel"


def test_distillation_changes_what_the_student_learns(demo_root, tmp_path):
    teacher_run = train_here(flags(demo_root, tmp_path, "--name", "teacher"))
    plain = train_here(flags(demo_root, tmp_path, "--name", "plain"))
    taught = train_here(flags(demo_root, tmp_path, "--name", "taught", "--teacher", str(teacher_run)))
    a, b = (utils.load_checkpoint(r / "last.pth")["model"] for r in (plain, taught))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    losses = [pd.read_csv(r / "log.csv")["train_loss"].iloc[0] for r in (plain, taught)]
    assert losses[0] != pytest.approx(losses[1])


def test_a_teacher_trained_on_other_classes_exits_2_with_one_line(demo_root, tmp_path):
    from conftest import write_folder_dataset

    folder = write_folder_dataset(tmp_path / "pets")
    other = run_script("train.py", "--dataset", "ImageFolderDataset", "--data_dir", str(folder), "--epochs", "1",
                       "--resize", "32", "32", "--group_pattern", r"^(.+?)_\d+",
                       "--num_workers", "0", "--model_dir", str(tmp_path / "other"), cwd=tmp_path)  # fmt: skip
    assert other.returncode == 0, other.stderr
    done = run_script("train.py", *flags(demo_root, tmp_path, "--teacher", str(tmp_path / "other/exp")), cwd=tmp_path)
    line = one_error_line(done)
    assert (
        "--teacher" in line and "was trained on other classes" in line and "class 0 is 'cat' vs 'wear/male/<30'" in line
    ), line
    assert not (tmp_path / "model").exists()
    missing = run_script("train.py", *flags(demo_root, tmp_path, "--teacher", str(tmp_path / "nowhere")), cwd=tmp_path)
    assert "nowhere" in one_error_line(missing)
    for flag, value in (("--kd_alpha", "1.5"), ("--kd_temperature", "0")):
        done = run_script("train.py", *flags(demo_root, tmp_path, flag, value), cwd=tmp_path)
        assert one_error_line(done).startswith(f"error: {flag} {value} must be")


# ---------------------------------------------------------------------------------------------------
# Pseudo-labels
def write_probs(demo_root, path, confidences, class_names, top_classes=None):
    """A probs.csv over the demo eval images: image k's top class `top_classes[k]` with `confidences[k]`, the
    rest spread evenly; and the probs.json inference.py writes beside it."""
    import numpy as np

    import pseudo

    ids = pd.read_csv(demo_root / "eval/info.csv", dtype={"ImageID": str})["ImageID"].tolist()[: len(confidences)]
    n = len(class_names)
    probs = np.full((len(ids), n), 0.0)
    for k, c in enumerate(confidences):
        top = top_classes[k] if top_classes is not None else k % n
        probs[k] = (1 - c) / (n - 1)
        probs[k, top] = c
    table = pd.DataFrame(probs, columns=class_names)
    table.insert(0, "ImageID", ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    pseudo.write_sidecar(path, demo_root / "eval", None, [])
    return ids, probs


def mask_data(demo_root):
    import dataset

    return dataset.MaskSplitByProfileDataset(demo_root / "train/images", val_ratio=0.25, seed=42)


def pseudo_args(path, **kw):
    base = {"pseudo_labels": str(path), "pseudo_threshold": 0.9, "pseudo_max_share": 0.5, "pseudo_soft": False,
            "pseudo_dir": None, "fold": None, "n_splits": 3}  # fmt: skip
    return types.SimpleNamespace(**{**base, **kw})


def test_pseudo_labels_join_only_the_training_side_within_threshold_and_cap_with_soft_targets(demo_root, tmp_path):
    import numpy as np

    import pseudo
    import subset as subset_module

    data = mask_data(demo_root)
    confidences = [0.95, 0.5, 0.92, 0.99, 0.89999, 0.9, 0.97, 0.3]
    ids, probs = write_probs(demo_root, tmp_path / "out/probs.csv", confidences, data.class_names)
    n_train = len(data.split_dataset()[0])
    wrapped = pseudo.add_pseudo_labels(data, pseudo_args(tmp_path / "out/probs.csv", pseudo_soft=True))
    chosen = [k for k, c in enumerate(confidences) if c >= 0.9]  # 0.9 itself reaches it; 0.89999 does not
    assert len(wrapped) == len(data) + len(chosen) and int(0.5 * n_train) >= len(chosen)
    assert [p.name for p in wrapped.pseudo_paths] == [f"{ids[k]}" for k in chosen]
    train_idx, val_idx = wrapped.split_dataset()
    pseudo_idx = set(wrapped.pseudo_indices())
    assert pseudo_idx <= set(train_idx) and not pseudo_idx & set(val_idx)
    own_train, own_val = data.split_dataset()
    assert np.array_equal(val_idx, own_val) and set(train_idx) - pseudo_idx == set(own_train)
    for fold in range(3):  # every fold: in training, never validated
        tr, va = wrapped.split_dataset(fold, 3)
        assert pseudo_idx <= set(tr) and not pseudo_idx & set(va)
    subset = subset_module.ImageSubset(wrapped, train_idx, lambda image: 0, (16, 12), None, wrapped.training_targets())
    for row, k in enumerate(chosen):
        position = list(train_idx).index(len(data) + row)
        torch.testing.assert_close(subset[position][1], torch.tensor(probs[k], dtype=torch.float32))
    own = list(train_idx).index(own_train[0])
    assert subset[own][1].argmax().item() == data.labels[own_train[0]] and subset[own][1].max().item() == 1.0
    # The cap: at most pseudo_max_share x the training split, the most confident first.
    share = 2.5 / n_train
    capped = pseudo.add_pseudo_labels(data, pseudo_args(tmp_path / "out/probs.csv", pseudo_max_share=share))
    assert [p.name for p in capped.pseudo_paths] == [ids[3], ids[6]]  # 0.99 and 0.97, in file order
    hard = capped.training_targets()  # hard pseudo-labels: class indices, as the data's own
    assert hard.dtype == np.int64 and list(hard[len(data) :]) == [3, 6] and list(capped.labels[len(data) :]) == [3, 6]


def test_a_run_with_pseudo_labels_from_inference_counts_them_and_never_validates_them(demo_root, tmp_path):
    teacher = train_here(flags(demo_root, tmp_path, "--name", "teacher"))
    out = tmp_path / "out"
    done = run_script("inference.py", "--model_dir", str(teacher), "--data_dir", str(demo_root / "eval"),
                      "--output_dir", str(out), "--save_probs", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    probs = pd.read_csv(out / "probs.csv")
    threshold = float(probs.iloc[:, 1:].max(axis=1).median())  # about half of them
    reaching = int((probs.iloc[:, 1:].max(axis=1) >= threshold).sum())
    done = run_script("train.py", *flags(demo_root, tmp_path, "--pseudo_labels", str(out / "probs.csv"),
                      "--pseudo_threshold", f"{threshold!r}", "--name", "student"), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"Pseudo-labels: {reaching} of {len(probs)} images" in done.stdout
    run_dir = tmp_path / "model/student"
    config = pd.read_json(run_dir / "config.json", typ="series")
    assert sum(config["pseudo_label_counts"].values()) == reaching
    assert config["train_images"] + config["val_images"] == len(mask_data(demo_root)) + reaching
    validated = pd.read_csv(run_dir / "val_predictions.csv")["path"]
    assert not validated.str.contains(str(demo_root / "eval")).any()


@pytest.mark.parametrize("case", ["other classes", "missing image", "threshold 0", "threshold 1.5", "no sidecar",
                                  "soft with mixup", "not probabilities"])  # fmt: skip
def test_pseudo_labels_that_cannot_work_exit_2_with_one_line_and_write_nothing(demo_root, tmp_path, case):
    data = mask_data(demo_root)
    path = tmp_path / "out/probs.csv"
    write_probs(demo_root, path, [0.95, 0.95], data.class_names)
    extra, expected = ["--pseudo_labels", str(path)], ""
    if case == "other classes":
        table = pd.read_csv(path).rename(columns={data.class_names[0]: "cat"})
        table.to_csv(path, index=False)
        expected = "does not hold this data's 18 classes (no column wear/male/<30)"
    elif case == "missing image":
        table = pd.read_csv(path)
        table.loc[0, "ImageID"] = "nobody.jpg"
        table.to_csv(path, index=False)
        expected = "1 image(s) are not in"
    elif case.startswith("threshold"):
        value = case.split()[1]
        extra += ["--pseudo_threshold", value]
        expected = f"--pseudo_threshold {value} must be a probability in (0, 1]"
    elif case == "no sidecar":
        (tmp_path / "out/probs.json").unlink()
        expected = "pass --pseudo_dir"
    elif case == "soft with mixup":
        extra += ["--pseudo_soft", "--mixup", "0.2"]
        expected = "--pseudo_soft cannot be mixed by --mixup/--cutmix"
    else:
        table = pd.read_csv(path)
        table.iloc[1, 1] = 3.0
        table.to_csv(path, index=False)
        expected = "1 row(s) are not probabilities summing to 1"
    before = path.read_bytes()
    done = run_script("train.py", *flags(demo_root, tmp_path, *extra), cwd=tmp_path)
    assert expected in one_error_line(done)
    assert not (tmp_path / "model").exists() and path.read_bytes() == before


def test_kd_cache_predicts_each_training_image_once_unaugmented_and_no_teacher_runs_per_step(
    demo_root, tmp_path, monkeypatch
):
    import distill

    teacher_run = train_here(flags(demo_root, tmp_path, "--name", "teacher"))
    forwards, trainers = [], []
    forward = distill.Teachers.forward
    monkeypatch.setattr(distill.Teachers, "forward", lambda self, *a: forwards.append(1) or forward(self, *a))
    cache = engine.Trainer.cache_teacher_logits
    monkeypatch.setattr(engine.Trainer, "cache_teacher_logits", lambda self: trainers.append(self) or cache(self))
    train_here(flags(demo_root, tmp_path, "--teacher", str(teacher_run), "--kd_cache", "--name", "cached"))
    trainer = trainers[0]
    assert not forwards  # the loop read the cached logits: no teacher forward pass per step
    train_set, val_set = trainer.split.train_set, trainer.split.val_set
    assert trainer.split.train_loader.dataset is train_set and train_set.extras.shape == (len(train_set), 1, 18)
    # The cache holds the teacher's class logits of each training image under the eval transform.
    net = trainer.teachers.models[0]
    plain = torch.stack([val_set.transform(Image.fromarray(train_set.pixels(i))) for i in range(4)])
    if trainer.split.eval_batch_transform is not None:
        plain = trainer.split.eval_batch_transform(plain)
    with torch.no_grad():
        expected = model_module.to_class_logits(net(plain).float(), net)
    torch.testing.assert_close(train_set.extras[:4, 0], expected, rtol=1e-4, atol=1e-4)
    # From the cache, the ensemble's tempered probabilities are those it gives on the plain images.
    forward_probs = forward(trainer.teachers, plain, 2.0)
    torch.testing.assert_close(trainer.teachers.from_logits(train_set.extras[:4], 2.0), forward_probs, rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    refused = [
        (["--kd_cache"], "--kd_cache needs --teacher"),
        (["--kd_cache", "--teacher", str(teacher_run), "--mixup", "0.2"], "--mixup/--cutmix"),
    ]
    for extra, message in refused:
        done = run_script("train.py", *flags(demo_root, tmp_path, *extra, "--name", "refused"), cwd=tmp_path)
        assert message in one_error_line(done)
