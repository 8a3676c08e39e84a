"""Inference beyond one run: ensembles (soft vote, weights, k-fold folders), TTA, probs.csv, any eval layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import augmentation
import evaldata
import inference
import labels
import model
import predict
import rundir
from conftest import run_script, tiny_run_args
from utils import UserError


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs that differ in seed, image size, preset and normalization (what an ensemble may mix)."""
    cwd = tmp_path_factory.mktemp("runs")
    for name, extra in [
        ("a", []),
        (
            "b",
            ["--seed", "7", "--resize", "72", "56", "--augmentation", "CustomAugmentation", "--mean_std", "imagenet"],
        ),
    ]:
        result = run_script("train.py", *tiny_run_args(demo_root, "--name", name, *extra), cwd=cwd)
        assert result.returncode == 0, result.stderr
    return {"a": cwd / "model/a", "b": cwd / "model/b"}


@pytest.fixture(scope="module")
def single_probs(runs, demo_root, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """Each run's own probs.csv on the demo eval set."""
    cwd = tmp_path_factory.mktemp("single")
    return {
        name: probs(infer(cwd, name, "--model_dir", str(run), data=demo_root / "eval", subprocess=True))
        for name, run in runs.items()
    }


def infer(cwd: Path, out: str, *args: str, data: Path | None = None, ok: bool = True, subprocess: bool = False):
    """inference.py with --save_probs into `cwd/out`: in this process (fast), or as a user runs it (`subprocess`,
    or `ok=False`: the finished process, to check its exit code and message). Returns the output folder."""
    argv = [*args, *(["--data_dir", str(data)] if data else []), "--output_dir", str(cwd / out), "--save_probs"]
    argv += ["--num_workers", "0"]
    if not ok or subprocess:
        result = run_script("inference.py", *argv, cwd=cwd)
        if not ok:
            return result
        assert result.returncode == 0, result.stderr
    else:
        inference.main(inference.get_parser().parse_args(argv))
    return cwd / out


def probs(out: Path) -> pd.DataFrame:
    """probs.csv of an output folder, checked against its output.csv."""
    table = pd.read_csv(out / "probs.csv", dtype={"ImageID": str}).set_index("ImageID")
    submission = pd.read_csv(out / "output.csv", dtype={"ImageID": str})
    assert list(submission.columns) == ["ImageID", "ans"]
    assert submission["ImageID"].tolist() == table.index.tolist()
    assert list(table.columns) == labels.mask_class_names()
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-5)
    assert (submission["ans"].to_numpy() == table.to_numpy().argmax(1)).all(), "ans is the most probable class"
    return table


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, lines
    return lines[0]


# --- ensembles ------------------------------------------------------------------------------------------
def test_ensemble_is_the_mean_of_the_runs_probabilities(runs, single_probs, demo_root, tmp_path):
    out = infer(tmp_path, "ab", "--model_dir", str(runs["a"]), str(runs["b"]), data=demo_root / "eval", subprocess=True)
    a, b = single_probs["a"], single_probs["b"]
    assert not np.allclose(a, b, atol=1e-4), "the two runs must differ for this test to mean anything"
    np.testing.assert_allclose(probs(out), (a + b) / 2, atol=1e-5)


def test_weights(runs, single_probs, demo_root, tmp_path):
    out = infer(
        tmp_path, "w", "--model_dir", str(runs["a"]), str(runs["b"]), "--weights", "1", "0", data=demo_root / "eval"
    )
    np.testing.assert_allclose(probs(out), single_probs["a"], atol=1e-5)
    out = infer(
        tmp_path, "w3", "--model_dir", str(runs["a"]), str(runs["b"]), "--weights", "3", "1", data=demo_root / "eval"
    )
    np.testing.assert_allclose(probs(out), 0.75 * single_probs["a"] + 0.25 * single_probs["b"], atol=1e-5)
    result = infer(tmp_path, "bad", "--model_dir", str(runs["a"]), str(runs["b"]), "--weights", "1", ok=False)
    assert "--weights has 1 value(s) for 2 --model_dir" in one_error_line(result)
    assert not (tmp_path / "bad").exists()


def test_kfold_directory_is_expanded_into_its_folds(runs, single_probs, demo_root, tmp_path):
    kfold = tmp_path / "kfold"
    for k, name in enumerate(["a", "b"]):
        shutil.copytree(runs[name], kfold / f"fold{k}")
    result_dir = infer(tmp_path, "k", "--model_dir", str(kfold), data=demo_root / "eval")
    np.testing.assert_allclose(probs(result_dir), (single_probs["a"] + single_probs["b"]) / 2, atol=1e-5)
    # A k-fold entry's weight is shared by its folds: 1 : 1 gives fold0 and fold1 a quarter each, run a a half.
    out = infer(
        tmp_path, "k2", "--model_dir", str(kfold), str(runs["a"]), "--weights", "1", "1", data=demo_root / "eval"
    )
    np.testing.assert_allclose(probs(out), 0.75 * single_probs["a"] + 0.25 * single_probs["b"], atol=1e-5)
    assert rundir.checkpoints(str(kfold)) == [kfold / "fold0/best.pth", kfold / "fold1/best.pth"]


def test_runs_with_other_class_names_are_refused(runs, tmp_path):
    other = shutil.copytree(runs["b"], tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["class_names"] = [f"class{i}" for i in range(18)]
    (other / "config.json").write_text(json.dumps(config))
    line = one_error_line(infer(tmp_path, "out", "--model_dir", str(runs["a"]), str(other), ok=False))
    assert str(runs["a"]) in line and str(other) in line and "different classes" in line
    assert not (tmp_path / "out").exists()


def test_a_run_named_twice_in_an_ensemble_is_refused(runs, tmp_path):
    """The same checkpoint twice (a repeated path, a k-fold run beside one of its folds, a link) would count double."""
    kfold = tmp_path / "kfold"
    shutil.copytree(runs["a"], kfold / "fold0")
    shutil.copytree(runs["b"], kfold / "fold1")
    (tmp_path / "link").symlink_to(runs["a"])
    for entries, shown in [
        ([runs["a"], runs["b"], runs["a"]], f"{runs['a'] / 'best.pth'} twice"),
        ([runs["a"], runs["a"] / "best.pth"], f"{runs['a'] / 'best.pth'} twice"),
        ([kfold, kfold / "fold1"], f"{kfold / 'fold1/best.pth'} twice"),
        ([runs["a"], tmp_path / "link"], f"{tmp_path / 'link/best.pth'} twice (also as {runs['a'] / 'best.pth'})"),
    ]:
        line = one_error_line(infer(tmp_path, "out", "--model_dir", *map(str, entries), ok=False))
        assert f"--model_dir names the checkpoint {shown}: give each run once" in line, line
        assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match=r"^--teacher names the checkpoint .* twice: give each run once$"):
        rundir.resolve_members([str(runs["b"]), str(runs["b"])], None, flag="--teacher")


# --- test-time augmentation -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(runs, demo_root):
    """Run a's model and a loader over the demo eval images through its eval transform."""
    net, config = rundir.load_model(runs["a"] / "best.pth")
    aug = rundir.build_augmentation(config)
    test_set = evaldata.TestDataset(demo_root / "eval", aug.eval_transform, aug.load_size)
    return net, DataLoader(test_set, batch_size=5)


def test_identity_view_equals_no_tta(loaded):
    net, loader = loaded
    cpu = torch.device("cpu")
    outputs = torch.cat([net(images) for images, _ in loader])
    reference = torch.softmax(model.to_class_logits(outputs, net), 1)
    assert augmentation.tta_views(["none"]) == ("identity",)
    plain = predict.evaluate(net, loader, cpu, views=augmentation.tta_views(["none"])).probs
    assert torch.equal(plain, reference)
    assert torch.equal(predict.evaluate(net, loader, cpu, views=("identity", "identity")).probs, plain)


def test_tta_averages_the_probabilities_of_its_views(loaded):
    net, loader = loaded
    cpu = torch.device("cpu")
    views = augmentation.tta_views(["flip"])
    assert views == ("identity", "hflip")
    each = [predict.evaluate(net, loader, cpu, views=(v,)).probs for v in views]
    assert not torch.allclose(each[0], each[1], atol=1e-6), "a mirrored face gives the model other inputs"
    torch.testing.assert_close(predict.evaluate(net, loader, cpu, views=views).probs, (each[0] + each[1]) / 2)
    assert len(augmentation.tta_views(["flip_shift", "flip_zoom"])) == 8, "views shared by presets run once"


@pytest.mark.parametrize("name", [v for v in augmentation.VIEWS if v != "identity"])
def test_every_view_keeps_the_shape_and_changes_the_image(name):
    x = torch.arange(2 * 3 * 64 * 48, dtype=torch.float32).reshape(2, 3, 64, 48)
    y = augmentation.VIEWS[name](x)
    assert y.shape == x.shape and not torch.equal(y, x)


def test_shift_moves_the_picture_and_repeats_the_border():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    right = augmentation._shift(x, 0, 1)
    assert torch.equal(right[..., 1:], x[..., :-1]) and torch.equal(right[..., 0], x[..., 0])
    up = augmentation._shift(x, -1, 0)
    assert torch.equal(up[..., :-1, :], x[..., 1:, :]) and torch.equal(up[..., -1, :], x[..., -1, :])


def test_flip_tta_changes_probabilities_and_writes_a_valid_file(runs, single_probs, demo_root, tmp_path):
    out = infer(
        tmp_path, "flip", "--model_dir", str(runs["a"]), "--tta", "flip", data=demo_root / "eval", subprocess=True
    )
    flipped = probs(out)
    assert flipped.index.tolist() == single_probs["a"].index.tolist()
    assert np.abs(flipped.to_numpy() - single_probs["a"].to_numpy()).max() > 1e-6
    assert pd.read_csv(out / "output.csv")["ans"].between(0, 17).all()


# --- other eval layouts ---------------------------------------------------------------------------------
def test_folder_of_images(runs, single_probs, demo_root, tmp_path):
    folder = shutil.copytree(demo_root / "eval/images", tmp_path / "photos")
    moved = sorted(folder.iterdir())[:3]
    (folder / "sub").mkdir()
    for path in moved:
        path.rename(folder / "sub" / path.name)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(b"")  # hidden files are never images
    out = infer(tmp_path, "out", "--model_dir", str(runs["a"]), "--ans_format", "name", data=folder)
    table = probs_by_name(out)
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg") if p.name[0] != ".")
    assert table.index.tolist() == expected and len(expected) == 14
    # Same images, same decoding: the predictions of the competition layout, keyed by file name.
    same = single_probs["a"].loc[[Path(i).name for i in expected]].to_numpy()
    np.testing.assert_allclose(table.drop(columns="ans").to_numpy(), same, atol=1e-6)


def probs_by_name(out: Path) -> pd.DataFrame:
    """probs.csv joined with output.csv whose ans holds class names (--ans_format name)."""
    table = pd.read_csv(out / "probs.csv").set_index("ImageID")
    submission = pd.read_csv(out / "output.csv").set_index("ImageID")
    assert submission.index.tolist() == table.index.tolist()
    names = np.asarray(labels.mask_class_names())
    assert (submission["ans"].to_numpy() == names[table.to_numpy().argmax(1)]).all()
    return table.join(submission)


def test_csv_of_image_paths(runs, single_probs, demo_root, tmp_path):
    eval_copy = shutil.copytree(demo_root / "eval", tmp_path / "eval")
    names = sorted(p.name for p in (eval_copy / "images").iterdir())[::-1][:5]
    listing = eval_copy / "lists/files.csv"
    listing.parent.mkdir()
    pd.DataFrame({"id": range(5), "picture": [f"../images/{n}" for n in names]}).to_csv(listing, index=False)
    out = infer(tmp_path, "out", "--model_dir", str(runs["a"]), "--image_column", "picture", data=listing)
    table = probs(out)
    assert table.index.tolist() == [f"../images/{n}" for n in names], "one row per CSV row, in its order"
    np.testing.assert_allclose(table.to_numpy(), single_probs["a"].loc[names].to_numpy(), atol=1e-6)
    line = one_error_line(infer(tmp_path, "bad", "--model_dir", str(runs["a"]), data=listing, ok=False))
    assert f"{listing} has no 'path' or 'image' or 'file' or 'filename' column" in line and "--image_column" in line
    listing.write_text(listing.read_text().replace("picture", "image"))  # a usual name needs no --image_column
    assert len(probs(infer(tmp_path, "usual", "--model_dir", str(runs["a"]), data=listing))) == 5


def test_environment_model_dir_is_one_run(runs, demo_root, tmp_path):
    result = run_script(
        "inference.py",
        "--data_dir",
        str(demo_root / "eval"),
        "--output_dir",
        str(tmp_path / "out"),
        cwd=tmp_path,
        env={"SM_CHANNEL_MODEL": str(runs["b"])},
    )
    assert result.returncode == 0, result.stderr
    assert str(runs["b"] / "best.pth") in result.stdout and not (tmp_path / "out/probs.csv").exists()
