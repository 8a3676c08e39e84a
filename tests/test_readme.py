"""The README tells the truth: its commands are the ones CI and these tests run."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_weights import seed_hub_cache

from conftest import ROOT, run_script, tiny_run_args, write_folder_dataset, write_label_csv

README = (ROOT / "README.md").read_text()


def quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def example_commands(postgres: bool = False) -> list[str]:
    """Every `python train.py ...` / `inference.py` / `runs.py` / `sweep.py` shown outside the Quick start; the
    sweep on a PostgreSQL server only with `postgres` (tests/test_sweep.py runs it on a server of its own)."""
    rest = README.split("## Your data", 1)[1]
    found = re.findall(r"(?m)(?:^|`)(python (?:train|inference|runs|sweep)\.py[^`\n]*)", rest)
    return [c for c in found if ("postgresql://" in c) == postgres]


def tiny_sweep(args: list[str]) -> list[str]:
    """A README sweep shortened for the tiny data: two trials of one or two epochs at 64x48."""
    args = [re.sub(r"^epochs=int:\d+:\d+$", "epochs=int:1:2", a) for a in args]
    args[args.index("--trials") + 1] = "2"
    epochs = [] if any(a.startswith("epochs=") for a in args) else ["--epochs", "1"]  # searched: not fixed too
    return [*args, *([] if "--" in args else ["--"]), *epochs, "--resize", "64", "48", "--num_workers", "0"]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    commands = quick_start()
    assert len(commands) == 2
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert commands[1] in ci


def test_quick_start_run_command_trains_and_writes_a_submission(tmp_path):
    """Command 1 exactly as written (its install step is what the test command already did), in a clean folder."""
    steps = [s.strip() for s in quick_start()[0].split("&&")]
    assert steps[:2] == ["python3 -m venv .venv", ".venv/bin/pip install -r requirements.txt"]
    assert steps[2:] == [".venv/bin/python train.py", ".venv/bin/python inference.py"]
    trained = run_script("train.py", cwd=tmp_path, timeout=600, isolated=True)
    assert trained.returncode == 0, trained.stderr
    assert "generating the demo data set in data/demo" in trained.stdout
    f1s = [float(m) for m in re.findall(r"val loss \S+ acc\s+\S+ f1 (\S+)", trained.stdout)]
    assert len(f1s) == 6 and max(f1s) > 0.3  # the default epochs; chance is about 0.05
    inferred = run_script("inference.py", cwd=tmp_path, timeout=300, isolated=True)
    assert inferred.returncode == 0, inferred.stderr
    submission = pd.read_csv(tmp_path / "output/output.csv")
    info = pd.read_csv(tmp_path / "data/demo/eval/info.csv")
    assert submission["ImageID"].tolist() == info["ImageID"].tolist()
    truth = pd.read_csv(tmp_path / "data/demo/eval/truth.csv")
    from sklearn.metrics import f1_score

    assert f1_score(truth["ans"], submission["ans"], average="macro") > 0.3
    events = subprocess.run(
        [str(Path(sys.executable).parent / "tensorboard"), "--inspect", "--logdir", "model"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Val/f1" in events.stdout and "Val/predictions" in events.stdout


@pytest.mark.parametrize("command", example_commands())
def test_example_commands_run(command, demo_root, tiny_runs, tmp_path):
    """Each example, on the tiny demo data, shortened to one small epoch; the numbers are in the Results table."""
    args = shlex.split(command)[1:]
    paths = {
        "/data/train/images": demo_root / "train/images",
        "/data/eval": demo_root / "eval",
        "/data/photos": demo_root / "eval/images",
        "/data/pets": write_folder_dataset(tmp_path / "pets"),
        "/data/labels.csv": write_label_csv(tmp_path / "pets", tmp_path / "labels.csv"),
        "../shared/data/maskdev/train/images": demo_root / "train/images",
        "label_fixes.csv": write_label_fixes(demo_root, tmp_path / "label_fixes.csv"),
        "flips.csv": write_label_fixes(demo_root, tmp_path / "flips.csv"),
        "recipe.yaml": write_recipe(tmp_path / "recipe.yaml"),
        "recipes/scratch.yaml": ROOT / "recipes/scratch.yaml",  # shipped with the project
        "nets/mynet.py:TinyNet": f"{write_user_model(tmp_path / 'nets/mynet.py')}:TinyNet",
    }
    env = None
    if "--pretrained" in args and "--backbone" in args:  # the hub's weights, as a download leaves them in its cache
        env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
        seed_hub_cache(args[args.index("--backbone") + 1], tmp_path / "hf")
    args = [str(paths.get(a, a)) for a in args]
    if args[0] == "train.py" and "--resume" in args:  # a run to resume: one epoch of it, resumed to two
        name = Path(args[args.index("--resume") + 1]).name
        copy_run(tiny_runs("kfold" if name == "kfold" else "plain"), tmp_path, name)
        args += ["--epochs", "2"]
    elif args[0] == "train.py" and "--config" in args and args[args.index("--config") + 1].startswith("model/"):
        copy_run(tiny_runs("plain"), tmp_path, Path(args[args.index("--config") + 1]).parent.name)  # its recipe
    elif args[0] == "train.py":
        args += ["--epochs", "1", "--resize", "64", "48"]
        if "--swa_start" in args:  # from the one epoch there is
            args[args.index("--swa_start") + 1] = "1"
        if "--teacher" in args:  # the teachers: one-epoch runs under the names they have
            start = args.index("--teacher") + 1
            for name in itertools.takewhile(lambda a: not a.startswith("--"), args[start:]):
                copy_run(tiny_runs("plain"), tmp_path, Path(name).name)
        if "--pseudo_labels" in args:  # the probs.csv of an ensemble: inference.py --save_probs of a tiny run
            probs = Path(args[args.index("--pseudo_labels") + 1])
            copy_run(tiny_runs("plain"), tmp_path, "pseudo_teacher")
            eval_dir, out = str(demo_root / "eval"), str(probs.parent)
            done = run_script("inference.py", "--model_dir", "model/pseudo_teacher", "--data_dir", eval_dir,
                              "--output_dir", out, "--save_probs", cwd=tmp_path)  # fmt: skip
            assert done.returncode == 0, done.stderr
            args[args.index("--pseudo_threshold") + 1] = "0.01"  # a tiny run is confident about nothing
    elif args[0] == "sweep.py":
        args = tiny_sweep(args)
    elif args[0] == "runs.py" and args[1:2] == ["model/sw"]:  # a sweep's trials
        for k in range(2):
            copy_run(tiny_runs("plain"), tmp_path, f"sw/trial{k}")
    elif args[0] == "runs.py":  # runs to list, a k-fold run to read suspects from, or a run to draw maps of
        flag = next((f for f in ("--suspects", "--cam") if f in args), None)
        name = Path(args[args.index(flag) + 1]).name if flag else "exp"
        copy_run(tiny_runs("kfold" if flag == "--suspects" or name == "kfold" else "plain"), tmp_path, name)
    else:  # inference of runs named in the examples: one-epoch runs of that kind, trained once per module
        start = args.index("--model_dir") + 1
        entries = [Path(a) for a in itertools.takewhile(lambda a: not a.startswith("--"), args[start:])]
        for name in (p.parent.name if p.suffix == ".pth" else p.name for p in entries):
            copy_run(tiny_runs("kfold" if name == "kfold" else "plain"), tmp_path, name)
    result = run_script(args[0], *args[1:], cwd=tmp_path, env=env, isolated=env is not None)  # hub: read at import
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def tiny_runs(demo_root, tmp_path_factory):
    """tiny_runs(kind): a one-epoch run on the tiny demo data, trained on first use ("plain", or "kfold": two
    folds with oof.csv), which the examples copy under the names they use."""
    root, runs = tmp_path_factory.mktemp("runs"), {}

    def get(kind: str) -> Path:
        if kind not in runs:
            extra = ["--fold", "all", "--n_splits", "2"] if kind == "kfold" else []
            done = run_script("train.py", *tiny_run_args(demo_root, "--name", kind, *extra), cwd=root)
            assert done.returncode == 0, done.stderr
            runs[kind] = root / "model" / kind
        return runs[kind]

    return get


def copy_run(run: Path, cwd: Path, name: str) -> None:
    shutil.copytree(run, cwd / "model" / name)


def write_recipe(path: Path) -> Path:
    path.write_text("lr: 0.01\ncriterion: focal\nbatch_size: 32\n")
    return path


def write_user_model(path: Path) -> Path:
    """A model class in a file outside the project, as a user writes one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "from torch import nn\n\n\nclass TinyNet(nn.Sequential):\n"
        "    def __init__(self, num_classes: int) -> None:\n"
        "        super().__init__(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, num_classes))\n"
    )
    return path


def write_label_fixes(demo_root: Path, path: Path) -> Path:
    """A label-fix file for the demo data: the first person's gender, swapped."""
    pid, gender = sorted((demo_root / "train/images").iterdir())[0].name.split("_")[:2]
    path.write_text(f"id,field,value\n{pid},gender,{'female' if gender == 'male' else 'male'}\n")
    return path


def test_notebook_command_runs(demo_root, tmp_path, monkeypatch):
    """The README's command for eda.ipynb, in a copy of the project, on the tiny demo data."""
    section = README.split("## Look at the data first", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"```bash\n(.+?)\n```", section)
    for path in [*ROOT.glob("*.py"), ROOT / "eda.ipynb"]:
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setenv("SM_CHANNEL_TRAIN", str(demo_root / "train/images"))
    command = command.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    executed = json.loads((tmp_path / "output/eda.ipynb").read_text())
    images = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 6
    assert not (tmp_path / "data").exists()  # used the configured data, generated nothing
