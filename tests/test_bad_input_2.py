"""Bad input and faults, round two: every message keeps what the user gave (flag, path, variable) on its one
line, and nothing decodes wrong in silence."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import utils
from conftest import one_error_line, run_script, tiny_run_args


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """One tiny run, read-only for the tests."""
    cwd = tmp_path_factory.mktemp("trained")
    done = run_script("train.py", *tiny_run_args(demo_root, "--num_workers", "0"), cwd=cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "model/exp"


# --- 1. a library's multi-line exception never takes the path off the line ----------------------------------
def not_weights(tmp_path):
    """Files that are not weights, each under a name that promises weights."""
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes\nnot a checkpoint\n")
    jpeg = tmp_path / "photo.pth"
    Image.new("RGB", (8, 8), "red").save(jpeg, format="JPEG")
    pickled = tmp_path / "pickled.pth"
    import argparse

    import torch

    torch.save({"model": argparse.Namespace(lr=1)}, pickled)  # weights_only refuses it, in a multi-line message
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    return [text, jpeg, pickled, empty]


def test_files_that_are_not_weights_are_named_on_the_one_error_line(demo_root, trained, tmp_path):
    eval_dir = str(demo_root / "eval")
    for bad in not_weights(tmp_path):
        line = one_error_line(run_script("train.py", *tiny_run_args(demo_root, "--pretrained_path", str(bad)),
                                         cwd=tmp_path))  # fmt: skip
        assert f"--pretrained_path {bad}" in line and "give a .pth" in line, line
        line = one_error_line(run_script("inference.py", "--model_dir", str(bad), "--data_dir", eval_dir, cwd=tmp_path))
        assert str(bad) in line and "retrain or pick another run" in line, line
        run = shutil.copytree(trained, tmp_path / f"run_{bad.stem}")
        shutil.copy(bad, run / "best.pth")
        line = one_error_line(run_script("inference.py", "--model_dir", str(run), "--data_dir", eval_dir, cwd=tmp_path))
        assert str(run / "best.pth") in line, line
        shutil.copy(bad, run / "last.pth")
        line = one_error_line(run_script("train.py", "--resume", str(run), cwd=tmp_path))
        assert str(run / "last.pth") in line, line
    assert not list((tmp_path / "model").glob("*")), "a refused run leaves no run directory"
    assert not (tmp_path / "output").exists()


def test_one_line_keeps_the_start_of_a_multi_line_message_and_the_end_of_a_worker_traceback():
    assert utils.one_line("--flag x.pth cannot be read (Error: first\n  second\n\nthird)") == (
        "--flag x.pth cannot be read (Error: first second third)"
    )
    wrapped = (
        "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "dataset.py", line 1, in load_image\nutils.UserError: cannot read image a.jpg (truncated)'
    )
    assert utils.one_line(wrapped) == "cannot read image a.jpg (truncated)"
    long = utils.reason(ValueError("x" * 500 + "\nmore"), limit=50)
    assert long.startswith("ValueError: xxx") and long.endswith("...") and len(long) == len("ValueError: ") + 50


# --- 2. truth.csv is checked like info.csv; the submission written before it stays --------------------------
def eval_copy(demo_root, tmp_path):
    return shutil.copytree(demo_root / "eval", tmp_path / "eval")


def bad_truths(truth: pd.DataFrame) -> dict[str, pd.DataFrame]:
    first = truth["ImageID"].iloc[0]
    return {
        "a class the model does not have": truth.assign(ans=truth["ans"].where(truth.index > 0, 18)),
        "a negative class": truth.assign(ans=truth["ans"].where(truth.index > 0, -1)),
        "a word": truth.astype({"ans": str}).assign(ans=lambda t: t["ans"].where(t.index > 0, "mask")),
        "a fraction": truth.astype({"ans": str}).assign(ans=lambda t: t["ans"].where(t.index > 0, "1.5")),
        "an empty label": truth.astype({"ans": str}).assign(ans=lambda t: t["ans"].where(t.index > 0, "")),
        "no ans column": truth.rename(columns={"ans": "label"}),
        "missing rows": truth.iloc[2:],
        "an image twice": pd.concat([truth, truth[truth["ImageID"] == first]]),
    }


def test_a_bad_truth_csv_is_one_line_after_the_submission_is_written(demo_root, trained, tmp_path):
    eval_dir = eval_copy(demo_root, tmp_path)
    good = run_script("inference.py", "--model_dir", str(trained), "--data_dir", str(eval_dir), cwd=tmp_path)
    assert good.returncode == 0 and "macro F1" in good.stdout, good.stderr
    expected = (tmp_path / "output/output.csv").read_text()
    truth = pd.read_csv(eval_dir / "truth.csv", dtype={"ImageID": str})
    cases = {**bad_truths(truth), "not a CSV": None}
    for case, table in cases.items():
        (tmp_path / "output/output.csv").unlink()
        if table is None:
            (eval_dir / "truth.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
        else:
            table.to_csv(eval_dir / "truth.csv", index=False)
        done = run_script("inference.py", "--model_dir", str(trained), "--data_dir", str(eval_dir), cwd=tmp_path)
        line = one_error_line(done)
        assert str(eval_dir / "truth.csv") in line and "remove it to skip scoring" in line, (case, line)
        assert (tmp_path / "output/output.csv").read_text() == expected, case


def test_info_csv_with_duplicate_or_empty_image_ids_is_refused_before_any_output(demo_root, trained, tmp_path):
    eval_dir = eval_copy(demo_root, tmp_path)
    info = pd.read_csv(eval_dir / "info.csv", dtype={"ImageID": str})
    cases = {
        "twice": (pd.concat([info, info.iloc[:2]]), "twice"),
        "empty": (info.assign(ImageID=info["ImageID"].where(info.index != 3, "")), "without an ImageID (lines 5)"),
    }
    for table, expected in cases.values():
        table.to_csv(eval_dir / "info.csv", index=False)
        line = one_error_line(
            run_script("inference.py", "--model_dir", str(trained), "--data_dir", str(eval_dir), cwd=tmp_path)
        )
        assert str(eval_dir / "info.csv") in line and expected in line, line
        assert not (tmp_path / "output").exists()


# --- 3. folders that cannot be created name the flag, and the variable or .env that set it ------------------
def test_folders_that_cannot_be_created_name_the_flag_and_where_its_value_was_set(demo_root, trained, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way\n")
    under = str(blocker / "sub")
    dotenv = str((tmp_path / ".env").resolve())
    train_cases = [  # (extra flags, environment, .env text, expected in the line)
        (["--model_dir", str(blocker)], {}, "", f"--model_dir {blocker} cannot be created"),
        (["--model_dir", under], {}, "", f"{blocker} is a file"),
        ([], {"SM_MODEL_DIR": under}, "", "(from $SM_MODEL_DIR)"),
        ([], {}, f"SM_MODEL_DIR={under}\n", f"or change SM_MODEL_DIR in {dotenv}"),
        (["--cache", "disk", "--cache_dir", str(blocker)], {}, "", f"--cache_dir {blocker} cannot be created"),
        (["--cache", "disk"], {"CACHE_DIR": under}, "", "(from $CACHE_DIR)"),
    ]
    for extra, env, dotenv_text, expected in train_cases:
        (tmp_path / ".env").write_text(dotenv_text)
        done = run_script("train.py", *tiny_run_args(demo_root, *extra), cwd=tmp_path, env=env)
        line = one_error_line(done)
        assert expected in line and "pass another folder" in line, (extra, env, line)
    eval_dir = str(demo_root / "eval")
    for extra, env, dotenv_text, expected in [
        (["--output_dir", str(blocker)], {}, "", f"--output_dir {blocker} cannot be created"),
        ([], {"SM_OUTPUT_DATA_DIR": under}, "", "(from $SM_OUTPUT_DATA_DIR)"),
        ([], {}, f"SM_OUTPUT_DATA_DIR={under}\n", f"SM_OUTPUT_DATA_DIR in {dotenv}"),
    ]:
        (tmp_path / ".env").write_text(dotenv_text)
        done = run_script("inference.py", "--model_dir", str(trained), "--data_dir", eval_dir, *extra, cwd=tmp_path,
                          env=env)  # fmt: skip
        assert expected in one_error_line(done), (extra, env)
    assert blocker.read_text() == "in the way\n" and not (tmp_path / "model").exists()


# --- 6. every accepted PIL mode decodes to the picture its 8-bit version shows -------------------------------
def wide_and_odd_modes(tmp_path):
    """(file, the 8-bit RGB picture it holds): grayscale in 16, 32 and float bits, and modes with alpha, a
    palette or ink."""
    gray = np.add.outer(np.arange(24) * 10, np.arange(32) * 3).clip(0, 255).astype(np.uint8)  # 24x32 ramp
    as_rgb = np.repeat(gray[..., None], 3, axis=2)
    color = np.stack([gray, gray[::-1], np.full_like(gray, 90)], axis=2)
    cases = []

    def save(name, image, expected, **kw):
        image.save(tmp_path / name, **kw)
        cases.append((tmp_path / name, expected))

    save("i16.png", Image.fromarray(gray.astype(np.uint16) * 257), as_rgb)  # mode I;16, a 16-bit PNG
    save("i16_tiff.tif", Image.fromarray(gray.astype(np.uint16) * 257), as_rgb)
    save("i32.tif", Image.fromarray(gray.astype(np.int32) * 257), as_rgb)  # mode I holding 16-bit values
    save("i32_8bit.tif", Image.fromarray(gray).convert("I"), as_rgb)  # mode I holding 8-bit values
    save("f_unit.tif", Image.fromarray(gray.astype(np.float32) / 255), as_rgb)  # mode F in 0..1
    save("f_255.tif", Image.fromarray(gray).convert("F"), as_rgb)  # mode F in 0..255
    save("la.png", Image.fromarray(gray).convert("LA"), as_rgb)
    palette = Image.fromarray(color).quantize(64)
    save("p.png", palette, np.asarray(palette.convert("RGB")))
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    white = np.asarray(palette.convert("RGB")).copy()
    white[np.asarray(palette) == 0] = 255
    save("p_transparent.png", transparent, white, transparency=0)
    cmyk = Image.fromarray(color).convert("CMYK")
    save("cmyk.tif", cmyk, np.asarray(cmyk.convert("RGB")))
    return cases


def test_every_accepted_pil_mode_decodes_like_its_8_bit_version(tmp_path):
    import imaging

    for path, expected in wide_and_odd_modes(tmp_path):
        decoded = np.asarray(imaging.load_image(path))
        assert decoded.shape == expected.shape, path.name
        assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1, path.name
        fixed = imaging.decode_fixed(path, (12, 16))  # what the caches and loaders read
        assert abs(float(fixed.mean()) - float(expected.mean())) < 3, path.name


def test_a_mode_that_cannot_become_rgb_is_an_unreadable_image_with_its_reason(tmp_path):
    import imaging

    path = tmp_path / "lab.tif"
    Image.new("LAB", (8, 8), (50, 0, 0)).save(path)
    try:
        image = imaging.load_image(path)
    except utils.UnreadableImageError as e:
        assert str(path) in str(e) and e.reason
    else:
        assert image.mode == "RGB" and image.size == (8, 8)  # a PIL that converts LAB gives a real picture


# --- 5. resume refuses flags that change what the weights are, before loading anything -----------------------
def test_resume_with_a_different_model_is_refused_in_one_line_and_the_run_is_untouched(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra, shown in [
        (["--model", "BaseModel"], "--model BaseModel differs from the run's 'MultiHeadModel'"),
        (["--backbone", "resnet18"], "--backbone resnet18 differs"),
        (["--resize", "32", "32"], "--resize 32 32 differs from the run's [64, 48]"),
        (["--age_bounds", "30", "58"], "--age_bounds 30 58 differs"),
    ]:
        line = one_error_line(run_script("train.py", "--resume", str(run), *extra, "--epochs", "2", cwd=tmp_path))
        assert shown in line and f"--config {run / 'config.json'}" in line, line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    same = run_script("train.py", "--resume", str(run), "--model", "MultiHeadModel", "--epochs", "2", cwd=tmp_path)
    assert same.returncode == 0, same.stderr  # the run's own value is no change


def test_resume_on_data_that_splits_otherwise_is_refused_and_on_moved_data_goes_on(demo_root, trained, tmp_path):
    """Data moved to another folder (another server) resumes; one photo fewer changes the split, whose validation
    persons could then have trained: refused in one line, the run untouched."""
    run = shutil.copytree(trained, tmp_path / "run")
    moved = shutil.copytree(demo_root / "train", tmp_path / "moved")
    changed = shutil.copytree(demo_root / "train", tmp_path / "changed")
    next(p for p in sorted((changed / "images").rglob("normal.jpg"))).unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = ["--resume", str(run), "--epochs", "2", "--num_workers", "0"]
    refused = run_script("train.py", *args, "--data_dir", str(changed / "images"), cwd=tmp_path)
    line = refused.stderr.strip().splitlines()[-1]  # after the warning that --epochs 2 changes the schedule
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert line.startswith(f"error: --resume: the data at {changed / 'images'} splits into other images (") and (
        f"than the run trained on at {demo_root / 'train/images'} (" in line
    ), line
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after.pop(run / "train.log").startswith(before.pop(run / "train.log"))  # the attempt is logged after
    assert after == before
    done = run_script("train.py", *args, "--data_dir", str(moved / "images"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(run / "log.csv")) == 2
    # A resumed run's config.json (with its resumes and tracker ids) still repeats the run as a recipe.
    import train

    assert train.parse_args(["--config", str(run / "config.json")]).epochs == 2


# --- smaller faults: a stopped run exits non-zero; printed commands quote their paths -------------------------
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_stopped_run_exits_128_plus_the_signal_and_prints_a_command_that_works_with_spaces(
    demo_root, tmp_path, signum, monkeypatch
):
    import os
    import signal

    import engine

    original = engine.train_one_epoch

    def stop_in_epoch_2(model, loader, criterion, state, *rest, **kwargs):
        if state.progress["epoch"] == 2:
            os.kill(os.getpid(), getattr(signal, signum))  # caught: the step finishes, last.pth is written
        return original(model, loader, criterion, state, *rest, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", stop_in_epoch_2)
    model_dir = tmp_path / "my runs"
    args = tiny_run_args(demo_root, "--num_workers", "0", "--epochs", "3", "--model_dir", str(model_dir))
    done = run_script("train.py", *args, cwd=tmp_path)
    assert done.returncode == 128 + getattr(signal, signum), done.stderr
    command = next(line for line in done.stdout.splitlines() if "--resume" in line).split(": ", 1)[-1]
    import shlex

    assert shlex.split(command.split("Continue with: ")[-1])[-1] == str(model_dir / "exp")
    monkeypatch.setattr(engine, "train_one_epoch", original)
    resumed = run_script("train.py", *shlex.split(command)[2:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"--model_dir {shlex.quote(str(model_dir / 'exp'))}" in resumed.stdout  # the Next: line, quoted


# --- smaller faults: every numeric flag has a range; argparse's own errors are one line too -----------------
def numeric_flags() -> dict[str, object]:
    import train

    return {a.dest: a for a in train.get_parser()._actions if a.type in (int, float)}


def test_every_numeric_flag_of_train_py_has_a_range():
    import options

    assert set(numeric_flags()) == set(options.FLAG_RANGES)


@pytest.mark.parametrize("flag", sorted(numeric_flags()))
def test_a_numeric_flag_out_of_range_or_not_finite_is_refused_in_one_line(flag, tmp_path):
    import options
    import train

    action = numeric_flags()[flag]
    count = action.nargs if isinstance(action.nargs, int) else 1
    bad = ["-1"] + (["nan", "inf"] if action.type is float else [])
    for value in bad:
        words = [f"--{flag}", *([value] * count)]
        done = run_script("train.py", "--data_dir", str(tmp_path / "never_read"), *words, cwd=tmp_path)
        line = one_error_line(done)
        assert line.startswith(f"error: --{flag} ") and "must be" in line, line
        with pytest.raises(utils.UserError):
            options.check_args(train.parse_args(words), train.flag_defaults())
    assert not (tmp_path / "model").exists()


# flag: (a value other than its default, the words that turn on the flag it acts through)
DEPENDENT = {
    "kd_alpha": (["0.5"], ["--teacher", "t"]),
    "kd_temperature": (["3"], ["--teacher", "t"]),
    "kd_cache": ([], ["--teacher", "t"]),
    "pseudo_threshold": (["0.5"], ["--pseudo_labels", "p.csv"]),
    "pseudo_max_share": (["0.3"], ["--pseudo_labels", "p.csv"]),
    "pseudo_soft": ([], ["--pseudo_labels", "p.csv"]),
    "pseudo_dir": (["eval"], ["--pseudo_labels", "p.csv"]),
    "swa_lr": (["0.01"], ["--swa_start", "2"]),
    "mix_prob": (["0.5"], ["--cutmix", "1"]),
    "cutmix_mode": (["vertical"], ["--cutmix", "1"]),
    "lr_decay_step": (["5"], ["--scheduler", "cosine_restarts"]),
    "gamma": (["0.3"], ["--scheduler", "plateau"]),
    "wandb_entity": (["team"], ["--wandb", "mask"]),
    "wandb_group": (["g"], ["--wandb", "mask"]),
    "mlflow_experiment": (["e"], ["--mlflow"]),
}


@pytest.mark.parametrize("flag", sorted(DEPENDENT))
def test_a_flag_given_without_the_flag_it_acts_through_is_refused(flag, tmp_path):
    """--kd_alpha without --teacher, --gamma with the cosine schedule, ...: each trained as if it had not been
    given, while the run's config.json recorded it."""
    import options
    import train

    assert set(DEPENDENT) == set(options.NEEDS)  # a new entry of the table gets a case here
    value, parent = DEPENDENT[flag]
    line = one_error_line(run_script("train.py", "--data_dir", "never_read", f"--{flag}", *value, cwd=tmp_path))
    assert line.startswith(f"error: --{flag}{' ' if value else ''}{' '.join(value)} needs ") and (
        f"without it --{flag} changes nothing" in line
    ), line
    options.check_needs(train.parse_args([f"--{flag}", *value, *parent]), train.flag_defaults())  # accepted
    options.check_needs(train.parse_args(parent), train.flag_defaults())  # the parent alone too
    assert not (tmp_path / "model").exists()


def test_argparse_errors_are_one_line_with_the_fix(tmp_path):
    cases = [
        (("train.py", "--epochs", "x"), "argument --epochs: invalid int value: 'x'"),
        (("train.py", "--epochz", "3"), "did you mean --epochs?"),
        (("train.py", "--amp", "fp8"), "invalid choice: 'fp8'"),
        (("inference.py", "--tta", "zz"), "invalid choice: 'zz'"),
        (("runs.py", "--nope"), "unrecognized arguments: --nope"),
    ]
    for (script, *args), expected in cases:
        line = one_error_line(run_script(script, *args, cwd=tmp_path))
        assert expected in line and f"python {script} --help" in line, line


# --- 7. a damaged disk cache entry is decoded again, with one warning --------------------------------------
def test_damaged_disk_cache_entries_are_decoded_again_and_rewritten(demo_root, tmp_path):
    import functools

    import cache
    import imaging

    paths = sorted(str(p) for p in (demo_root / "train/images").glob("*/*.jpg"))[:6]
    size = (24, 16)
    decode = functools.partial(imaging.decode_fixed, size=size)
    store = cache.DiskCache(paths, size, decode, tmp_path / "cache")
    truth = [store[i].copy() for i in range(len(paths))]
    files = store.files
    files[0].write_bytes(files[0].read_bytes()[:60])  # truncated
    files[1].write_text("not an array")  # overwritten
    np.save(files[2], np.zeros((5, 5), np.uint8))  # an array of another size
    np.save(files[3], np.zeros((*size, 3), np.float32))  # of another type
    again = cache.DiskCache(paths, size, decode, tmp_path / "cache")
    assert "(6 reused)" in again.report
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        images = [again[i] for i in range(len(paths))]
    for got, expected in zip(images, truth, strict=True):
        assert np.array_equal(got, expected)
    warnings = err.getvalue().strip().splitlines()
    assert len(warnings) == 4 and all("decoded the image again" in w for w in warnings), warnings
    assert all(str(files[i]) in warnings[i] and paths[i] in warnings[i] for i in range(4))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert all(np.array_equal(again[i], truth[i]) for i in range(len(paths)))
    assert err.getvalue() == ""  # rewritten: read cleanly the next time


def test_a_run_on_a_damaged_disk_cache_trains(demo_root, tmp_path):
    args = tiny_run_args(demo_root, "--cache", "disk", "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0")
    assert run_script("train.py", *args, cwd=tmp_path).returncode == 0
    for entry in sorted((tmp_path / "cache").rglob("*.npy"))[:3]:
        entry.write_bytes(b"\x93NUMPY garbage")
    done = run_script("train.py", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("decoded the image again") == 3


# --- smaller faults: files follow the umask; a resume removes a killed writer's leftovers --------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomically_written_files_follow_the_umask(tmp_path, umask):
    import os

    previous = os.umask(umask)
    try:
        assert utils.current_umask() == umask
        utils.atomic_write(tmp_path / "output.csv", lambda f: f.write("ImageID,ans\n"))
        utils.atomic_write(tmp_path / "best.pth", lambda f: f.write(b"x"), binary=True)
        plain = tmp_path / "plain.txt"
        plain.write_text("as open() makes it")
    finally:
        os.umask(previous)
    expected = plain.stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("output.csv", "best.pth"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_a_resume_removes_the_temporary_files_a_killed_writer_left(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    leftovers = [run / ".last.pth.k2j3h4.tmp", run / ".log.csv.abcd1234.tmp"]
    for tmp in leftovers:
        tmp.write_bytes(b"")
    keep = run / "notes.tmp"  # not one of ours: no leading dot
    keep.write_text("mine")
    done = run_script("train.py", "--resume", str(run), "--epochs", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not any(t.exists() for t in leftovers) and keep.read_text() == "mine"
    assert not list(run.glob(".*.tmp"))


# --- smaller faults: a --data_dir one level off names the folder to pass ------------------------------------
def test_a_data_dir_one_level_off_names_the_folder_to_pass(demo_root, tmp_path):
    root = demo_root  # {root}/train/images/{persons}, {root}/eval/{info.csv, images}
    cases = [
        (root / "train", f"pass {root / 'train/images'}"),
        (root, f"pass {root / 'train/images'}"),
        (
            root / "eval",
            f"is an eval folder (info.csv): train on the folder of person folders; the training images "
            f"are {root / 'train/images'}",
        ),  # fmt: skip
    ]
    for data_dir, expected in cases:
        line = one_error_line(run_script("train.py", *tiny_run_args(demo_root)[2:], "--data_dir", str(data_dir),
                                         cwd=tmp_path))  # fmt: skip
        assert expected in line and "Rename" not in line, line
    folder = tmp_path / "fixes"
    folder.mkdir()
    line = one_error_line(run_script("train.py", *tiny_run_args(demo_root, "--label_fixes", str(folder)), cwd=tmp_path))
    assert f"--label_fixes {folder} is a folder, not a file: give a CSV file" in line
    assert not (tmp_path / "model").exists()


# --- 4. a really full file system: one line for every writer, finished checkpoints kept ----------------------
def small_filesystem_script(size_mb: int, mount: str, command: str, after: str) -> list[str] | None:
    """A shell command line that mounts a `size_mb` tmpfs at `mount` in a private mount namespace (unshare: no
    root needed where user namespaces are allowed), runs `command`, then copies what it wrote to `after`."""
    import shutil as sh
    import subprocess

    if sh.which("unshare") is None:
        return None
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount}"], capture_output=True
    )
    if probe.returncode != 0:  # no user namespaces, or no tmpfs mount in them, on this machine
        return None
    script = (
        f"mount -t tmpfs -o size={size_mb}m tmpfs {mount} && {{ {command}; echo $? > {after}.rc; "
        f"cp -r {mount}/. {after}/; }}"
    )
    return ["unshare", "-rm", "sh", "-c", script]


def run_on_small_filesystem(size_mb: int, mount, command: str, tmp_path) -> tuple[int, str]:
    """(exit code, stderr) of `command` (which writes its stderr to tmp_path/err.txt) on a `size_mb` tmpfs at
    `mount`; what it wrote is copied to tmp_path/after. Skips where no private tmpfs can be mounted."""
    import subprocess

    line = small_filesystem_script(size_mb, str(mount), command, str(tmp_path / "after"))
    if line is None:
        pytest.skip("no private tmpfs here (unshare -rm is not permitted)")
    done = subprocess.run(line, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int((tmp_path / "after.rc").read_text()), (tmp_path / "err.txt").read_text()


@pytest.mark.parametrize("size_mb", [9, 16, 21])  # the disk fills in a different writer each time
def test_a_full_disk_while_training_is_one_line_and_keeps_the_last_finished_checkpoints(demo_root, tmp_path, size_mb):
    import shlex
    import sys

    from conftest import ROOT

    mount, after = tmp_path / "small", tmp_path / "after"
    mount.mkdir()
    after.mkdir()
    train_args = tiny_run_args(demo_root, "--num_workers", "0", "--epochs", "6", "--model_dir", str(mount / "model"))
    command = " ".join(shlex.quote(w) for w in [sys.executable, str(ROOT / "train.py"), *train_args])
    command += f" > {tmp_path}/out.txt 2> {tmp_path}/err.txt"
    rc, err = run_on_small_filesystem(size_mb, mount, command, tmp_path)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "Exception" not in err, err
    assert lines[0].startswith("error: no space left on the device") and "free some space" in lines[0], lines[0]
    run = after / "model/exp"
    finished = [
        utils.load_checkpoint(run / name)["epoch"] for name in ("best.pth", "last.pth") if (run / name).exists()
    ]
    assert finished, "the first epoch's checkpoints fit: they must survive"
    log = pd.read_csv(run / "log.csv")
    assert max(finished) <= log["epoch"].max()
    assert not list(run.glob(".*.tmp")), "no half-written temporary file is left"


def test_a_full_disk_in_any_writer_is_one_line(capsys, tmp_path):
    import errno

    def tensorboard_like():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "events.out.tfevents.1"))

    def zip_writer_like():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4345024 vs 4344912")  # noqa: B904 (as torch raises it)

    for writer, where in (
        (tensorboard_like, " to write " + str(tmp_path / "events.out.tfevents.1")),
        (zip_writer_like, ""),
    ):
        with pytest.raises(SystemExit) as exit_info:
            utils.run_main(lambda args, writer=writer: writer(), None)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: no space left on the device{where}: free some space")
    with pytest.raises(RuntimeError, match="a bug"):  # anything else stays a traceback: a bug to report
        utils.run_main(lambda args: (_ for _ in ()).throw(RuntimeError("a bug")), None)


def test_a_full_disk_in_tensorboards_writer_thread_is_still_one_line(capsys, tmp_path, monkeypatch):
    """TensorBoard writes its event file from a thread of its own: the thread's error (printed by threading's
    hook as a traceback) is raised again in the main thread, which reports it once."""
    import errno
    import threading

    def main(args):
        kept = []

        def writer_thread():
            kept.append(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "events.out.tfevents.1")))
            raise kept[0]

        thread = threading.Thread(target=writer_thread)
        thread.start()
        thread.join()
        raise kept[0]  # what SummaryWriter's next add_scalar or close does

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # a script's: print the traceback
    before = threading.excepthook
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(main, None)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert threading.excepthook is before  # set for the run only


def test_flags_that_need_the_data_are_checked_before_any_image_is_decoded(demo_root, tmp_path):
    for extra in (["--fold", "all", "--n_splits", "20"], ["--fold", "3", "--n_splits", "13"]):
        done = run_script("train.py", *tiny_run_args(demo_root, *extra), cwd=tmp_path)
        line = one_error_line(done)
        assert "needs at least" in line and "found 12" in line, line
        assert "cache" not in done.stdout.lower() and "Run directory" not in done.stdout, done.stdout
    assert not (tmp_path / "model").exists()


def test_a_full_disk_while_writing_the_submission_is_one_line_and_keeps_the_old_one(demo_root, trained, tmp_path):
    import shlex
    import sys

    from conftest import ROOT

    mount, after = tmp_path / "small", tmp_path / "after"
    mount.mkdir()
    after.mkdir()
    old = "ImageID,ans\nold.jpg,3\n"
    infer = [sys.executable, str(ROOT / "inference.py"), "--model_dir", str(trained), "--data_dir",
             str(demo_root / "eval"), "--output_dir", str(mount / "out"), "--save_probs"]  # fmt: skip
    command = (
        f"mkdir {mount}/out && printf {shlex.quote(old)} > {mount}/out/output.csv && "
        f"(dd if=/dev/zero of={mount}/fill bs=4k 2>/dev/null || true) && "
        + " ".join(map(shlex.quote, infer))
        + f" > {tmp_path}/out.txt 2> {tmp_path}/err.txt"
    )
    rc, err = run_on_small_filesystem(1, mount, command, tmp_path)
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: no space left on the device to write {mount / 'out/output.csv'}"), err
    assert (after / "out/output.csv").read_text() == old  # the previous submission is whole
    assert not list((after / "out").glob(".*.tmp"))
