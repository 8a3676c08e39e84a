"""The library calls (sklearn.metrics, torch.optim.lr_scheduler, torchvision's v2 MixUp/CutMix) give the numbers
of the hand-written code they replaced, kept here as the reference: metrics on random data with absent classes,
the lr at every step of every schedule, and mixed images whose soft targets are their pixel shares."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import augmentation
import report
import schedule
import utils

# The schedules are stepped here without optimizer steps, which torch warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")


# ---------------------------------------------------------------------------------------------------
# The reference: the hand-written metrics, class report, lr formula and Schedule as they were before
# they became library calls (verbatim but for names).
def old_confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    targets = np.asarray(targets, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    return np.bincount(targets * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def old_f1_per_class(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    cm = old_confusion_matrix(targets, preds, num_classes).astype(np.float64)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)  # predicted + true = 2tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def old_macro_f1(targets: np.ndarray, preds: np.ndarray, num_classes: int | None = None) -> float:
    targets = np.asarray(targets, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(targets.max(initial=0), preds.max(initial=0))) + 1
    cm = old_confusion_matrix(targets, preds, num_classes)
    present = (cm.sum(0) + cm.sum(1)) > 0
    if not present.any():
        return 0.0
    return float(old_f1_per_class(targets, preds, num_classes)[present].mean())


def old_class_report(targets: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    cm = old_confusion_matrix(targets, preds, len(class_names)).astype(np.float64)
    tp, predicted, support = np.diag(cm), cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = old_f1_per_class(targets, preds, len(class_names))
    return pd.DataFrame(
        {"class": list(class_names), "precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)}
    )


def lr_factor(
    name: str, step: int, total: int, steps_per_epoch: int, warmup: int, decay_epochs: int, gamma: float
) -> float:
    """The lr multiplier after `step` optimizer steps (of `total`): linear warmup over `warmup` steps, then
    the schedule `name` (none, step, cosine, cosine_restarts)."""
    if step < warmup:
        return (step + 1) / warmup
    if name == "none":
        return 1.0
    if name == "step":
        return gamma ** (step // (decay_epochs * steps_per_epoch))
    if name == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if name == "cosine_restarts":
        period = decay_epochs * steps_per_epoch
        return 0.5 * (1 + math.cos(math.pi * ((step - warmup) % period) / period))
    raise ValueError(name)


class ReferenceSchedule:
    """The closed-form Schedule: lr_factor per step; OneCycleLR and ReduceLROnPlateau as they were used."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0.0,
        decay_epochs: int = 20,
        gamma: float = 0.5,
        patience: int = 2,
    ) -> None:
        self.optimizer, self.name = optimizer, name
        self.steps_per_epoch = steps_per_epoch
        self.total = epochs * steps_per_epoch
        self.warmup = min(self.total, round(warmup_epochs * steps_per_epoch))
        self.decay_epochs, self.gamma = decay_epochs, gamma
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self.plateau = None
        self.onecycle = None
        if name == "onecycle":
            pct = self.warmup / self.total if self.warmup else 0.3
            self.onecycle = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.base_lrs, total_steps=self.total, pct_start=min(max(pct, 1e-3), 0.999)
            )
        elif name == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=gamma, patience=patience
            )
        if self.onecycle is None:
            self._apply()

    def _apply(self) -> None:
        if self.plateau is not None:
            if self.step_count <= self.warmup and self.warmup:
                for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                    group["lr"] = base * min(1.0, (self.step_count + 1) / self.warmup)
            return
        factor = lr_factor(
            self.name, self.step_count, self.total, self.steps_per_epoch, self.warmup, self.decay_epochs, self.gamma
        )
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step_batch(self) -> None:
        self.step_count += 1
        if self.onecycle is not None:
            if self.step_count < self.total:
                self.onecycle.step()
        else:
            self._apply()

    def step_epoch(self, score: float) -> None:
        if self.plateau is not None and self.step_count >= self.warmup:
            self.plateau.step(score)

    def state_dict(self) -> dict[str, Any]:
        inner = self.onecycle or self.plateau
        return {"step_count": self.step_count, "inner": inner.state_dict() if inner is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step_count"]
        inner = self.onecycle or self.plateau
        if inner is not None:
            inner.load_state_dict(state["inner"])


# ---------------------------------------------------------------------------------------------------
# Metrics
def random_predictions(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Truth in classes 0..11 of 18 (12..17 absent, as in a small validation split), predictions in 0..17 (some
    predicted though absent, some absent from both), 60% right."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 12, n)
    pred = np.where(rng.random(n) < 0.6, truth, rng.integers(0, 18, n))
    pred[pred == 15] = 16  # class 15 is never predicted nor true
    return truth, pred


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 7), (2, 50), (3, 200), (4, 1000)])
def test_metrics_equal_the_hand_written_ones(seed, n):
    truth, pred = random_predictions(seed, n)
    cm = utils.confusion_matrix(truth, pred, 18)
    assert cm.dtype == np.int64 and cm.shape == (18, 18)
    np.testing.assert_array_equal(cm, old_confusion_matrix(truth, pred, 18))
    f1 = utils.f1_per_class(truth, pred, 18)
    assert f1.shape == (18,) and f1[15] == 0.0
    np.testing.assert_allclose(f1, old_f1_per_class(truth, pred, 18), rtol=1e-12, atol=0)
    for num_classes in (18, None):
        got = utils.macro_f1(truth, pred, num_classes)
        assert isinstance(got, float)
        assert got == pytest.approx(old_macro_f1(truth, pred, num_classes), rel=1e-12)
    names = [f"c{k}" for k in range(18)]
    pd.testing.assert_frame_equal(report.class_report(truth, pred, names), old_class_report(truth, pred, names))


@pytest.mark.parametrize(
    "truth,pred",
    [([], []), ([3, 3, 3], [3, 3, 3]), ([0, 1, 2], [1, 2, 0]), ([4], [0])],
    ids=["empty", "one-class-right", "all-wrong", "one-sample"],
)
def test_metrics_equal_the_hand_written_ones_at_the_edges(truth, pred):
    truth, pred = np.asarray(truth, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    np.testing.assert_array_equal(utils.confusion_matrix(truth, pred, 5), old_confusion_matrix(truth, pred, 5))
    np.testing.assert_allclose(utils.f1_per_class(truth, pred, 5), old_f1_per_class(truth, pred, 5), atol=0)
    assert utils.macro_f1(truth, pred, 5) == old_macro_f1(truth, pred, 5)
    assert utils.macro_f1(truth, pred) == old_macro_f1(truth, pred)
    names = list("abcde")
    pd.testing.assert_frame_equal(report.class_report(truth, pred, names), old_class_report(truth, pred, names))


# ---------------------------------------------------------------------------------------------------
# Schedules
SCORES = [0.3, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7]  # validation F1 per epoch: plateaus to cut on
CONFIGS = {  # (epochs, steps_per_epoch, warmup_epochs, decay_epochs)
    "no-warmup": (6, 4, 0.0, 2),
    "warmup": (6, 4, 1.0, 2),
    "one-step-warmup": (6, 4, 0.25, 2),
    "warmup-past-a-decay": (6, 4, 2.5, 1),
    "warmup-whole-run": (3, 5, 3.0, 1),
    "uneven": (5, 7, 1.5, 3),
}


def make_optimizer() -> torch.optim.SGD:
    """Two parameter groups with different lrs (as build_optimizer's decay / no-decay groups may have)."""
    w, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [w]}, {"params": [b], "lr": 0.04}], lr=0.1, momentum=0.9)


def make(cls: type, name: str, config: tuple, epochs: int | None = None) -> Any:
    e, spe, warmup, decay = config
    return cls(
        make_optimizer(), name, epochs or e, spe, warmup_epochs=warmup, decay_epochs=decay, gamma=0.3, patience=1
    )


def lrs_of(sched: Any) -> list[float]:
    return [g["lr"] for g in sched.optimizer.param_groups]


def run(sched: Any, start: int, stop: int) -> list[list[float]]:
    """The lrs of steps `start`..`stop` (the one after the last step included), validating after every epoch."""
    out = []
    for step in range(start, stop):
        out.append(lrs_of(sched))
        sched.step_batch()
        if (step + 1) % sched.steps_per_epoch == 0:
            sched.step_epoch(SCORES[(step + 1) // sched.steps_per_epoch - 1])
    return [*out, lrs_of(sched)]


def resumed(cls: type, name: str, config: tuple, state: dict, optimizer_state: dict, epochs: int | None = None) -> Any:
    """A schedule continuing from `state` as engine.fit does: built, then the optimizer loaded, then the schedule."""
    sched = make(cls, name, config, epochs)
    sched.optimizer.load_state_dict(optimizer_state)
    sched.load_state_dict(state)
    return sched


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", schedule.SCHEDULERS)
def test_every_schedule_gives_the_closed_form_lr_at_every_step(name, config):
    if name == "onecycle" and config == CONFIGS["one-step-warmup"]:
        pytest.skip("OneCycleLR divides by zero over a one-step rise, in the reference too")
    new, old = make(schedule.Schedule, name, config), make(ReferenceSchedule, name, config)
    got, expected = run(new, 0, new.total), run(old, 0, old.total)
    assert len(got) == new.total + 1
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == pytest.approx(e, rel=1e-9, abs=1e-15), f"step {step}"
    if name in ("none", "step", "cosine", "cosine_restarts"):  # the formula itself, not only the old class
        epochs, spe, _, decay = config
        formula = [
            lr_factor(name, s, new.total, spe, new.warmup, decay, 0.3) * base
            for s in range(new.total + 1)
            for base in (0.1, 0.04)
        ]
        assert [lr for row in got for lr in row] == pytest.approx(formula, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("config", ["warmup", "warmup-past-a-decay", "uneven"])
@pytest.mark.parametrize("name", schedule.SCHEDULERS)
def test_resume_from_the_state_gives_the_uninterrupted_lrs_exactly(name, config):
    config = CONFIGS[config]
    total = config[0] * config[1]
    for stop in (1, config[1], 7, total - 1):  # inside and after the warmup, at and between epoch ends
        a = make(schedule.Schedule, name, config)
        run(a, 0, stop)
        state, optimizer_state = copy.deepcopy(a.state_dict()), copy.deepcopy(a.optimizer.state_dict())
        expected = run(a, stop, total)
        b = resumed(schedule.Schedule, name, config, state, optimizer_state)
        assert run(b, stop, total) == expected, f"resumed at step {stop}"


@pytest.mark.parametrize("name", schedule.SCHEDULERS)
def test_a_checkpoint_of_the_closed_form_schedule_resumes(name):
    config = CONFIGS["warmup"]
    total = config[0] * config[1]
    old = make(ReferenceSchedule, name, config)
    run(old, 0, 9)
    state, optimizer_state = copy.deepcopy(old.state_dict()), copy.deepcopy(old.optimizer.state_dict())
    expected = run(old, 9, total)
    got = run(resumed(schedule.Schedule, name, config, state, optimizer_state), 9, total)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("name", ["none", "step", "cosine", "cosine_restarts"])
def test_resuming_with_more_epochs_follows_the_new_flags_as_the_closed_form_did(name):
    config = CONFIGS["warmup"]
    a = make(schedule.Schedule, name, config)
    run(a, 0, 10)
    state, optimizer_state = a.state_dict(), a.optimizer.state_dict()
    new = resumed(schedule.Schedule, name, config, state, optimizer_state, epochs=8)
    old = resumed(ReferenceSchedule, name, config, state, optimizer_state, epochs=8)
    # The closed form set the new lr at the next step; the rebuilt schedule has it at once.
    new.step_batch()
    old.step_batch()
    got, expected = run(new, 11, 32), run(old, 11, 32)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=1e-9, abs=1e-15)


def test_an_unknown_schedule_is_refused_with_the_choices():
    with pytest.raises(utils.UserError, match="cosine_restarts"):
        schedule.Schedule(make_optimizer(), "linear", epochs=2, steps_per_epoch=3)


# ---------------------------------------------------------------------------------------------------
# Mixup and cutmix
def constant_images(n: int = 6, height: int = 16, width: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i and has class i: a pixel's value says whose it is."""
    images = torch.arange(float(n)).view(n, 1, 1, 1).expand(n, 3, height, width).contiguous()
    return images, torch.arange(n)


def pixel_shares(mixed: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, num_classes): the share of each image's pixels that came from the image of each class."""
    return torch.stack([(mixed == k).float().mean((1, 2, 3)) for k in range(num_classes)], 1)


@pytest.mark.parametrize("mode", ["box", "vertical"])
@pytest.mark.parametrize("seed", range(8))
def test_cutmix_soft_targets_are_the_pixel_shares(mode, seed):
    torch.manual_seed(seed)
    images, targets = constant_images()
    mixed, soft = augmentation.mix_batch(images, targets, 7, 0.0, 1.0, mode)
    assert soft.dtype == torch.float32 and soft.shape == (6, 7)
    torch.testing.assert_close(soft, pixel_shares(mixed, 7), rtol=0, atol=1e-6)
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    assert torch.equal(mixed, mixed.round())  # pixels moved whole, none blended


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_patches_are_a_box_or_all_right_of_a_column(seed):
    images, targets = constant_images()
    for mode in ("box", "vertical"):
        torch.manual_seed(seed)
        mixed, soft = augmentation.mix_batch(images, targets, 7, 0.0, 1.0, mode)
        for i in range(6):
            pasted = (mixed[i, 0] != i).nonzero()
            if len(pasted) == 0:
                assert soft[i, i] == 1.0
                continue
            (top, left), (bottom, right) = pasted.min(0).values.tolist(), (pasted.max(0).values + 1).tolist()
            assert len(pasted) == (bottom - top) * (right - left), "the pasted pixels fill their bounding box"
            assert len(set(mixed[i, :, top:bottom, left:right].flatten().tolist())) == 1, "from one partner"
            if mode == "vertical":
                assert (top, bottom, right) == (0, 16, 12)
                assert soft[i, i].item() == pytest.approx(left / 12)


@pytest.mark.parametrize("seed", range(8))
def test_mixup_blends_each_image_with_one_partner_by_its_target_share(seed):
    torch.manual_seed(seed)
    images, targets = constant_images()
    mixed, soft = augmentation.mix_batch(images, targets, 7, 0.4, 0.0)
    lam = soft.diagonal()[:6]
    assert (soft[:, 6] == 0).all() and ((0 < lam) & (lam < 1)).all()
    partner = (soft[:, :6] - torch.diag(lam)).argmax(1)
    assert (partner != torch.arange(6)).all()
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    torch.testing.assert_close(soft[torch.arange(6), partner], 1 - lam)
    expected = lam * torch.arange(6.0) + (1 - lam) * partner.float()
    torch.testing.assert_close(mixed, expected.view(6, 1, 1, 1).expand_as(mixed))
    assert len(set(lam.tolist())) == 1, "one lam per batch"


def test_mix_prob_is_the_share_of_batches_mixed():
    torch.manual_seed(0)
    images, targets = constant_images(4, 4, 4)
    mixed_batches = 0
    for _ in range(400):
        mixed, soft = augmentation.mix_batch(images, targets, 4, 1.0, 0.0, "box", 0.3)
        if (soft.max(1).values < 1).any():
            mixed_batches += 1
        else:
            assert mixed is images and torch.equal(soft, torch.eye(4))
    assert 80 <= mixed_batches <= 160  # 120 expected; the binomial's sd is 9


def test_with_both_on_each_batch_gets_one_of_the_two_about_half_the_time():
    torch.manual_seed(0)
    images, targets = constant_images(4, 8, 8)
    kinds = []
    for _ in range(200):
        mixed, soft = augmentation.mix_batch(images, targets, 4, 1.0, 1.0, "box")
        if not torch.equal(mixed, mixed.round()):
            kinds.append("mixup")
            shares = soft @ torch.arange(4.0)
            torch.testing.assert_close(mixed, shares.view(4, 1, 1, 1).expand_as(mixed))
        else:
            kinds.append("cutmix")
            torch.testing.assert_close(soft, pixel_shares(mixed, 4), rtol=0, atol=1e-6)
    assert 70 <= kinds.count("mixup") <= 130  # 100 expected; sd 7


@pytest.mark.parametrize(
    "mixup,cutmix,mode", [(0.4, 0, "box"), (0, 1.0, "box"), (0, 1.0, "vertical"), (0.4, 1.0, "box")]
)
def test_mixing_draws_only_from_torchs_global_generator(mixup, cutmix, mode):
    images, targets = constant_images()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    outputs = []
    for other_seed in (0, 1):  # numpy's and Python's generators must not matter
        np.random.seed(other_seed)
        random.seed(other_seed)
        torch.set_rng_state(state)
        outputs.append([augmentation.mix_batch(images, targets, 7, mixup, cutmix, mode, 0.9) for _ in range(5)])
        assert not torch.equal(torch.get_rng_state(), state)  # it drew from torch's generator
    for (m0, s0), (m1, s1) in zip(*outputs, strict=True):
        assert torch.equal(m0, m1) and torch.equal(s0, s1)


def test_no_mixing_gives_one_hot_targets_and_draws_nothing():
    images, targets = constant_images()
    state = torch.get_rng_state()
    mixed, soft = augmentation.mix_batch(images, targets, 7, 0.0, 0.0, "box")
    assert mixed is images and torch.equal(soft, torch.eye(7)[:6])
    assert torch.equal(torch.get_rng_state(), state)
