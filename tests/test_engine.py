"""The training engine: exact resume, clean stops, EMA, schedules, mixup/cutmix, accumulation, precision."""

from __future__ import annotations

import math
import os
import signal

import pandas as pd
import pytest
import torch

import augmentation
import engine
import options
import schedule
import train
import utils
from conftest import run_script, tiny_run_args


def tiny_args(demo_root, tmp_path, *extra: str) -> list[str]:
    return [*tiny_run_args(demo_root, "--epochs", "3", "--num_workers", "0"), "--model_dir", str(tmp_path), *extra]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_with_signal(monkeypatch, flags: list[str], when) -> object:
    """train.main in this process, with SIGTERM sent to itself where `when(progress)` says, then a resume."""
    original = engine.train_one_epoch

    def patched(model, loader, criterion, state: engine.RunState, *rest, **kwargs):
        progress, schedule = state.progress, state.schedule
        step_batch = schedule.step_batch

        def step() -> None:
            step_batch()
            if when(progress, during=True):
                os.kill(os.getpid(), signal.SIGTERM)

        schedule.step_batch = step
        finished = original(model, loader, criterion, state, *rest, **kwargs)
        schedule.step_batch = step_batch
        if when(progress, during=False):
            os.kill(os.getpid(), signal.SIGTERM)
        return finished

    monkeypatch.setattr(engine, "train_one_epoch", patched)
    with pytest.raises(utils.Stopped) as stop:
        train.main(train.get_parser().parse_args(flags), argv=flags)
    stopped = stop.value.run_dir
    assert stop.value.exit_code == 128 + signal.SIGTERM
    monkeypatch.setattr(engine, "train_one_epoch", original)
    assert (stopped / "last.pth").is_file() and not (stopped / "log.csv").read_text().count("\n3,")
    resumed = train.main(train.get_parser().parse_args(["--resume", str(stopped)]), argv=["--resume", str(stopped)])
    assert resumed == stopped
    return resumed


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda p, during: not during and p["epoch"] == 1, id="after-epoch-1"),
        pytest.param(lambda p, during: during and p["epoch"] == 2 and p["step"] == 1, id="mid-epoch-2"),
    ],
)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(demo_root, tmp_path, monkeypatch, where):
    flags = tiny_args(
        demo_root, tmp_path, "--batch_size", "16", "--ema", "0.9", "--mixup", "0.2", "--warmup_epochs", "1"
    )
    full = train.main(train.get_parser().parse_args([*flags, "--name", "full"]), argv=[])
    part = run_with_signal(monkeypatch, [*flags, "--name", "part"], where)
    a, b = utils.load_checkpoint(full / "last.pth"), utils.load_checkpoint(part / "last.pth")
    assert same_weights(a["model"], b["model"])
    assert same_weights(a["ema"], b["ema"])
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    logs = [pd.read_csv(run / "log.csv").drop(columns="time_s") for run in (full, part)]
    assert len(logs[0]) == 3
    pd.testing.assert_frame_equal(logs[0], logs[1])


def test_sigterm_from_outside_leaves_a_loadable_checkpoint_and_a_resumable_run(demo_root, tmp_path):
    """A real signal to a real training process: it exits cleanly, names the resume command, and resumes."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    flags = tiny_args(demo_root, tmp_path, "--epochs", "40", "--batch_size", "8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *flags], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (tmp_path / "exp/log.csv").is_file() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out  # saved, but not finished: `train && inference` stops
    assert f"--resume {tmp_path / 'exp'}" in out
    checkpoint = utils.load_checkpoint(tmp_path / "exp/last.pth")
    assert checkpoint["epoch"] < 40
    resumed = run_script(
        "train.py", "--resume", str(tmp_path / "exp"), "--epochs", str(checkpoint["epoch"] + 1), cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "--epochs" in resumed.stderr and "differs" in resumed.stderr  # schedule changed: warned
    log = pd.read_csv(tmp_path / "exp/log.csv")
    assert log["epoch"].tolist() == list(range(1, checkpoint["epoch"] + 2))


def test_ema_weights_differ_and_best_pth_holds_the_better_of_raw_and_ema(demo_root, tmp_path):
    flags = tiny_args(demo_root, tmp_path, "--epochs", "1", "--ema", "0.5")
    run = train.main(train.get_parser().parse_args(flags), argv=[])
    last, best = utils.load_checkpoint(run / "last.pth"), utils.load_checkpoint(run / "best.pth")
    ema = utils.clean_state_dict({k: v for k, v in last["ema"].items() if k.startswith("module.")})
    assert not same_weights(ema, last["model"])
    row = pd.read_csv(run / "log.csv").iloc[0]
    assert same_weights(best["model"], ema if row["ema_val_f1"] > row["val_f1"] else last["model"])
    assert best["best_score"] == max(row["ema_val_f1"], row["val_f1"])


def test_warmup_then_cosine_gives_the_expected_lr_sequence():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    sched = schedule.Schedule(optimizer, "cosine", epochs=4, steps_per_epoch=5, warmup_epochs=1)
    lrs = []
    for _ in range(20):
        lrs.append(sched.lr)
        sched.step_batch()
    expected = [(i + 1) / 5 for i in range(5)] + [0.5 * (1 + math.cos(math.pi * i / 15)) for i in range(15)]
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("name", schedule.SCHEDULERS)
def test_every_schedule_runs_and_restores_from_its_state(name):
    def make() -> schedule.Schedule:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return schedule.Schedule(optimizer, name, epochs=6, steps_per_epoch=4, warmup_epochs=1, decay_epochs=2)

    a, b = make(), make()
    lrs = []
    for step in range(24):
        if step == 10:
            b.load_state_dict(a.state_dict())
        lrs.append((a.lr, b.lr if step >= 10 else a.lr))
        a.step_batch()
        b.step_batch()
        if step % 4 == 3:
            a.step_epoch(0.5)
            b.step_epoch(0.5)
    assert all(x == pytest.approx(y) for x, y in lrs)
    assert max(x for x, _ in lrs) <= 0.1 + 1e-9
    if name != "none":
        assert len({round(x, 9) for x, _ in lrs}) > 2  # the lr moves


@pytest.mark.parametrize(
    "mixup,cutmix,mode", [(0.4, 0, "box"), (0, 1.0, "box"), (0, 1.0, "vertical"), (0.4, 1.0, "box")]
)
def test_mixed_targets_sum_to_one_and_match_the_pasted_area(mixup, cutmix, mode):
    torch.manual_seed(0)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 6).contiguous()  # image i is the constant i
    targets = torch.tensor([0, 1, 2, 3])
    mixed, soft = augmentation.mix_batch(images, targets, 5, mixup, cutmix, mode)
    assert soft.shape == (4, 5) and torch.allclose(soft.sum(1), torch.ones(4))
    assert (soft[:, 4] == 0).all()  # no image has class 4
    blended = not torch.equal(mixed, mixed.round())  # mixup leaves fractions; cutmix only moves whole pixels
    if mixup and not cutmix:
        assert blended
    elif cutmix and not mixup:
        assert not blended
    for i in range(4):
        lam = soft[i, i].item()
        partners = [j for j in range(4) if j != i and soft[i, j] > 0]
        assert len(partners) <= 1, f"image {i} mixed with more than one other: {soft[i]}"
        if blended:  # each image is lam * itself + (1 - lam) * its partner, lam its own target's share
            assert len(partners) == 1 and 0 < lam < 1
            j = partners[0]
            assert torch.allclose(mixed[i], torch.full_like(mixed[i], lam * i + (1 - lam) * j))
        else:  # each image's share of its own pixels is its own target's share; the rest is its partner's
            assert (mixed[i] == i).float().mean().item() == pytest.approx(lam, abs=1e-6)
            for j in partners:
                assert (mixed[i] == j).float().mean().item() == pytest.approx(soft[i, j].item(), abs=1e-6)
    if cutmix and not mixup:
        assert (soft.max(1).values < 1).any(), "seed 0 pastes a patch: the check above compared something"


def test_vertical_cutmix_pastes_everything_right_of_a_column():
    top, bottom, left, right = augmentation.cutmix_box(512, 384, 0.25, "vertical")
    assert (top, bottom, left, right) == (0, 512, 96, 384)


def test_gradient_accumulation_equals_one_larger_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,))

    def train_once(batch_size: int, accum: int) -> torch.Tensor:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        sched = schedule.Schedule(optimizer, "none", epochs=1, steps_per_epoch=1)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
        settings = engine.LoopSettings(grad_accum=accum)
        state = engine.RunState(model, optimizer, sched)
        state.new_progress(1)["steps"] = len(loader)
        engine.train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), state, settings, torch.device("cpu"), 3)
        return model[1].weight.detach()

    assert torch.allclose(train_once(2, 4), train_once(8, 1), atol=1e-6)
    assert not torch.allclose(train_once(2, 1), train_once(8, 1), atol=1e-4)  # without accumulation: 4 steps


def test_norm_and_bias_parameters_get_no_weight_decay_unless_asked():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    groups = schedule.build_optimizer(model, "AdamW", 1e-3, 0.05, 0.9).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3] and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert len(schedule.build_optimizer(model, "AdamW", 1e-3, 0.05, 0.9, decay_norm_bias=True).param_groups) == 1


@pytest.mark.parametrize("name", schedule.optimizer_names())
def test_every_optimizer_choice_trains_the_mask_model(name):
    """Each --optimizer choice steps the default MultiHeadModel (BaseModel backbone) on a real loss: every
    parameter of the backbone and the three heads moves, and the random state is what seeding left."""
    import labels
    import model as model_module

    torch.manual_seed(0)
    net = model_module.build_model("MultiHeadModel", 18, **labels.model_kwargs())
    before = [p.detach().clone() for p in net.parameters()]
    expected_draw = torch.rand(1, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    schedule.trains_here.cache_clear()
    assert schedule.trains_here(name)
    optimizer = schedule.build_optimizer(net, name, lr=1e-2, weight_decay=0.01, momentum=0.9)
    assert torch.rand(1).equal(expected_draw)  # the check's probe model and the build left the random state alone
    out = model_module.to_class_logits(net(torch.randn(4, 3, 32, 24)), net)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 5, 11, 17])).backward()
    optimizer.step()
    moved = [not p.detach().equal(b) for p, b in zip(net.parameters(), before, strict=True)]
    assert all(moved), [n for (n, _), m in zip(net.named_parameters(), moved, strict=True) if not m]


@pytest.mark.parametrize("name", ["LBFGS", "SparseAdam", "Muon"])
def test_an_optimizer_that_cannot_train_this_way_is_refused_in_one_line(name, tmp_path):
    """torch.optim classes that fail at the first step of train.py's loop (a closure, sparse gradients, 2-D
    parameters only) are not choices: one line that lists the ones that train, before any data is read."""
    if not hasattr(torch.optim, name):
        pytest.skip(f"this torch has no torch.optim.{name}")
    assert name not in schedule.optimizer_names()
    done = run_script("train.py", "--optimizer", name, "--data_dir", "never_read", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: --optimizer {name} cannot train the way train.py does (a step per batch without a closure, on dense "
        f"gradients, for parameters of every shape): use one of {', '.join(schedule.optimizer_names())}"
    ]
    assert not (tmp_path / "model").exists()


def test_bf16_trains_on_cpu_and_fp16_is_refused_with_one_line(demo_root, tmp_path):
    ok = run_script("train.py", *tiny_run_args(demo_root, "--amp", "bf16", "--gpu_aug"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    refused = run_script("train.py", *tiny_run_args(demo_root, "--amp", "fp16", "--device", "cpu"), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: --amp fp16 needs a CUDA GPU (device is cpu); on a CPU use --amp bf16 or --amp off"
    ]


def test_mixup_with_a_criterion_that_takes_no_soft_targets_is_refused(monkeypatch):
    import loss

    monkeypatch.setattr(loss, "accepts_soft_targets", lambda name: name != "cross_entropy")
    args = train.get_parser().parse_args(["--mixup", "0.2", "--criterion", "cross_entropy"])
    with pytest.raises(utils.UserError, match="--criterion cross_entropy cannot learn from the soft targets"):
        options.check_args(args, train.flag_defaults())


def test_batch_augment_without_randomness_is_resize_and_normalize():
    import augmentation

    images = torch.randint(0, 256, (2, 3, 16, 12), dtype=torch.uint8)
    identity = augmentation.BatchAugment((16, 12), (0.5,) * 3, (0.25,) * 3, flip=0, scale=0, shift=0, jitter=0)
    assert torch.allclose(identity(images), (images.float() / 255 - 0.5) / 0.25, atol=1e-4)
    torch.manual_seed(0)
    randomized = augmentation.BatchAugment((16, 12), (0.5,) * 3, (0.25,) * 3)(images)
    assert randomized.shape == (2, 3, 16, 12) and not torch.allclose(randomized, identity(images), atol=1e-2)


def test_compile_that_fails_here_falls_back_to_eager_with_a_warning(monkeypatch, capsys):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no C++ compiler found\nmore detail")

    def broken_compile(model):
        return Broken()  # like torch.compile: fails only when first called

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = torch.nn.Linear(4, 2)
    assert engine.maybe_compile(model, True, [4, 1], torch.device("cpu")) is model
    assert "warning: --compile failed here (RuntimeError: no C++ compiler found more detail); training without it" in (
        capsys.readouterr().err
    )  # the reason on one line (utils.reason)
    assert engine.maybe_compile(model, False, [4, 1], torch.device("cpu")) is model


def test_a_moved_run_resumes_where_it_is_now_and_leaves_the_original_alone(demo_root, tmp_path):
    import shutil

    first = train.main(train.get_parser().parse_args(tiny_args(demo_root, tmp_path, "--epochs", "1")), argv=[])
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    argv = ["--resume", str(moved), "--epochs", "2"]
    assert train.main(train.get_parser().parse_args(argv), argv=argv) == moved
    assert pd.read_csv(moved / "log.csv")["epoch"].tolist() == [1, 2]
    assert utils.load_checkpoint(moved / "last.pth")["config"]["run_dir"] == str(moved)
    assert pd.read_csv(first / "log.csv")["epoch"].tolist() == [1]  # the original is untouched
