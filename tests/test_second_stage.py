"""The competition's second stage from the command line: weight averaging (--swa_start), distillation from an
ensemble (--teacher) and pseudo-labels (--pseudo_labels)."""

from __future__ import annotations

import os
import signal
import types

import pandas as pd
import pytest
import torch

import engine
import schedule
import train
import utils
from conftest import run_script, tiny_run_args


def flags(demo_root, tmp_path, *extra: str) -> list[str]:
    return [*tiny_run_args(demo_root, "--num_workers", "0"), "--model_dir", str(tmp_path / "model"), *extra]


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
    assert "--teacher" in line and "was trained on other classes" in line and "class 0 is 'cat' vs 'wear/male/<30'" in line, line
    assert not (tmp_path / "model").exists()
    missing = run_script("train.py", *flags(demo_root, tmp_path, "--teacher", str(tmp_path / "nowhere")), cwd=tmp_path)
    assert "nowhere" in one_error_line(missing)
    for flag, value in (("--kd_alpha", "1.5"), ("--kd_temperature", "0")):
        done = run_script("train.py", *flags(demo_root, tmp_path, flag, value), cwd=tmp_path)
        assert one_error_line(done).startswith(f"error: {flag} {value} must be")
