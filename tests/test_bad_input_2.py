"""Bad input and faults, round two: every message keeps what the user gave (flag, path, variable) on its one
line, and nothing decodes wrong in silence."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

import utils
from conftest import run_script, tiny_run_args


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


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
