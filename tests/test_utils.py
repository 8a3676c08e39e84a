"""Metrics, run directories, atomic files and checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

import rundir
import utils


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 12, 200)  # classes 12..17 absent, as in a small validation split
    pred = np.where(rng.random(200) < 0.6, truth, rng.integers(0, 18, 200))
    assert utils.macro_f1(truth, pred, 18) == pytest.approx(f1_score(truth, pred, average="macro"))


def test_confusion_matrix_counts_every_sample_once():
    cm = utils.confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], 3)
    assert cm.sum() == 4
    assert cm[1, 2] == 1 and cm[2, 2] == 1


def test_increment_path_never_reuses(tmp_path):
    assert rundir.increment_path(tmp_path / "exp").name == "exp"
    assert rundir.increment_path(tmp_path / "exp").name == "exp2"
    (tmp_path / "exp4").mkdir()
    assert rundir.increment_path(tmp_path / "exp").name == "exp3"
    assert rundir.increment_path(tmp_path / "exp").name == "exp5"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "last.pth"
    target.write_text("old")

    def fail(f):
        f.write("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        utils.atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def test_checkpoint_is_saved_without_wrapper_prefixes(tmp_path):
    net = torch.nn.DataParallel(torch.nn.Linear(3, 2))
    utils.save_checkpoint(tmp_path / "c.pth", model=net, epoch=3, best_score=0.5, config={"a": [1, 2]})
    ckpt = utils.load_checkpoint(tmp_path / "c.pth")
    assert set(ckpt["model"]) == {"weight", "bias"}
    assert ckpt["epoch"] == 3 and ckpt["config"] == {"a": [1, 2]}
    torch.nn.Linear(3, 2).load_state_dict(ckpt["model"])
    assert utils.clean_state_dict({"module._orig_mod.fc.weight": 1}) == {"fc.weight": 1}


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    utils.save_checkpoint(tmp_path / "c.pth", model=torch.nn.Linear(3, 2))
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "c.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(utils.UserError, match="cannot be read"):
        utils.load_checkpoint(tmp_path / "c.pth")


def test_early_stopping():
    stopper = utils.EarlyStopping(patience=2)
    assert [stopper.step(s) for s in (0.1, 0.2, 0.2, 0.15)] == [False, False, False, True]
    never = utils.EarlyStopping(patience=0)
    assert not any(never.step(0.0) for _ in range(10))


ROOT = Path(__file__).resolve().parent.parent


def run_script(code: str, read_one_line: bool, buffered: bool = True) -> tuple[int, str]:
    """Run `code` in a fresh interpreter whose stdout is a pipe; the reader goes away after one line if asked."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (
        {} if buffered else {"PYTHONUNBUFFERED": "1"}
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if read_one_line:
        assert proc.stdout.readline() == b"x" * 99 + b"\n"
        proc.stdout.close()  # like `| head -1`
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("lines", [10**6, 1])
def test_a_script_whose_stdout_reader_goes_away_finishes_its_work_quietly(lines, buffered, tmp_path):
    """`runs.py --suspects RUN | head`: no traceback, and what the script does after printing (there: writing
    label_suspects.csv) still happens; whether the pipe breaks while printing (many lines) or at the last flush
    (one line, the last still in the buffer at the end)."""
    done = tmp_path / "written after the reader left"
    code = f"import sys, time, utils\ndef main(a):\n    [print('x' * 99) for _ in range({lines})]\n"
    code += "    sys.stdout.flush(); time.sleep(1); print('after the reader left')\n"
    code += f"    open({str(done)!r}, 'w').write('done')\n"
    code += "utils.run_main(main, None)"
    returncode, err = run_script(code, read_one_line=True, buffered=buffered)
    assert (returncode, err) == (0, "")
    assert done.read_text() == "done"


def test_a_broken_pipe_that_is_not_stdout_is_a_bug_with_its_traceback():
    code = "import os, utils\ndef main(a):\n    print('x' * 99)\n    r, w = os.pipe()\n    os.close(r)\n"
    code += "    os.write(w, b'x')\nutils.run_main(main, None)"
    returncode, err = run_script(code, read_one_line=False)
    assert returncode == 1 and "Traceback" in err and "BrokenPipeError" in err


def test_find_class_accepts_only_classes_defined_in_the_module():
    import dataset

    assert utils.find_class(dataset, "CSVDataset", "--dataset") is dataset.CSVDataset
    with pytest.raises(utils.UserError, match="Valid names"):
        utils.find_class(dataset, "Dataset", "--dataset")  # imported from torch, not defined there


def test_run_main_prints_one_line_even_for_errors_raised_in_loader_workers(capsys):
    wrapped = (
        "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "dataset.py", line 1, in load_image\nutils.UserError: cannot read image a.jpg (truncated); replace it'
    )

    def main(args):
        raise utils.UserError(wrapped)

    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(main, None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: cannot read image a.jpg (truncated); replace it\n"
