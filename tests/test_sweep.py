"""sweep.py: trials are ordinary runs, pruned epoch by epoch, in a study that several processes share (SQLite, a
journal file, a real PostgreSQL server), with sweep.csv, figures and optuna-dashboard to look at."""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

import sweep
from conftest import ROOT, run_script

TINY = ["--epochs", "2", "--resize", "64", "48", "--num_workers", "0", "--batch_size", "32"]


def sweep_args(
    demo_root: Path, *extra: str, trials: int = 4, space: tuple[str, ...] = ("lr=log:1e-3:1e-2",)
) -> list[str]:
    return ["--data_dir", str(demo_root / "train/images"), "--name", "sw", "--trials", str(trials), "--space", *space,
            *extra]  # fmt: skip


def table(tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "model/sw/sweep.csv", keep_default_na=False)


def study_trials(storage: str) -> list:
    import optuna

    study = optuna.load_study(study_name="sw", storage=storage)
    try:
        return study.get_trials(deepcopy=False)
    finally:
        sweep.close_study(study)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
def test_a_sweep_writes_ordinary_runs_a_table_figures_and_decodes_once(demo_root, tmp_path, monkeypatch):
    import imaging

    decoded = []
    real_decode = imaging.decode_fixed
    monkeypatch.setattr(imaging, "decode_fixed", lambda *a, **kw: decoded.append(a[0]) or real_decode(*a, **kw))
    args = sweep_args(
        demo_root, "--prune", "none", "--seed", "0", space=("lr=log:1e-3:1e-2", "criterion=focal,cross_entropy")
    )
    done = run_script("sweep.py", *args, "--", *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sweep_dir = tmp_path / "model/sw"
    rows = table(tmp_path)
    assert list(rows["trial"]) == [0, 1, 2, 3] and set(rows["state"]) == {"COMPLETE"}
    assert sorted(p.name for p in sweep_dir.glob("trial*")) == ["trial0", "trial1", "trial2", "trial3"]
    n_images = len(list((demo_root / "train/images").rglob("*.*")))
    assert len(decoded) == n_images  # the first trial decoded each image once; the other three nothing
    for _, row in rows.iterrows():
        run_dir = Path(row["run_dir"])
        log = pd.read_csv(run_dir / "log.csv")
        assert row["value"] == pytest.approx(log["score"].max()) and row["epochs"] == len(log) == 2
        config = json.loads((run_dir / "config.json").read_text())
        assert config["sweep"]["trial"] == row["trial"] and f"{config['lr']!r}" in row["params"]
        assert config["criterion"] in row["params"] and (run_dir / "best.pth").is_file()
    best = rows.loc[rows["value"].idxmax()]  # the first of equal values, as Optuna's best trial
    import optuna

    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert study.best_trial.number == best["trial"]
    assert study.best_value == pytest.approx(pd.read_csv(Path(best["run_dir"]) / "log.csv")["score"].max())
    for name in ("history", "importances", "parallel_coordinate"):
        assert (sweep_dir / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sweep_dir), size_guidance={"images": 0}).Reload()
    assert {"sweep/history", "sweep/importances", "sweep/parallel_coordinate"} <= set(events.Tags()["images"])
    listed = run_script("runs.py", "model/sw", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert all(f"trial{k}" in listed.stdout for k in range(4)) and " lr " in listed.stdout.splitlines()[1]
    predicted = run_script("inference.py", "--model_dir", best["run_dir"], "--data_dir", str(demo_root / "eval"),
                           "--output_dir", "out", cwd=tmp_path)  # fmt: skip
    assert predicted.returncode == 0 and len(pd.read_csv(tmp_path / "out/output.csv")) > 0, predicted.stderr
    # The same command again: the study is complete, nothing is trained, the outputs are written again.
    again = run_script("sweep.py", *args, "--", *TINY, cwd=tmp_path)
    assert again.returncode == 0 and "Trial 4" not in again.stdout and len(study_trials(study._storage)) == 4
    sweep.close_study(study)
    serves_the_study_over_http(sweep_dir / "study.db", tmp_path)


def serves_the_study_over_http(db: Path, tmp_path: Path) -> None:
    """optuna-dashboard, as the README starts it, on 127.0.0.1: its API lists the study and its four trials."""
    port = free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    server = subprocess.Popen([str(dashboard), f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        studies = None
        for _ in range(150):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except OSError:
                time.sleep(0.2)
        assert studies is not None, "optuna-dashboard did not answer within 30 s"
        (study,) = [s for s in studies if s["study_name"] == "sw"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=10) as r:
            trials = json.load(r)["trials"]
        assert sorted(t["number"] for t in trials) == [0, 1, 2, 3]
        assert {t["state"] for t in trials} == {"Complete"}
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_trial_with_the_worst_scores_is_pruned_and_ends_like_a_stopped_run(demo_root, tmp_path, monkeypatch):
    """Forced scores make it deterministic: trials 0-2 score 0.5 + 0.1 x epoch, trial 3 scores 0.1; after the
    first epoch trial 3 is below the median of the finished trials at that epoch."""
    import engine

    real = engine.Trainer.validate_epoch

    def forced(self, epoch, train):
        row, chosen, weights = real(self, epoch, train)
        row["score"] = 0.1 if self.state.config["sweep"]["trial"] == 3 else 0.5 + 0.1 * epoch
        return row, chosen, weights

    monkeypatch.setattr(engine.Trainer, "validate_epoch", forced)
    args = sweep_args(demo_root, "--prune", "median", "--prune_startup", "2", "--prune_warmup", "0")
    done = run_script("sweep.py", *args, "--", *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = table(tmp_path).set_index("trial")
    assert list(rows["state"]) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert list(rows["epochs"]) == [2, 2, 2, 1]
    pruned = tmp_path / "model/sw/trial3"
    assert json.loads((pruned / "config.json").read_text())["pruned"] is True
    assert not any(
        json.loads((tmp_path / f"model/sw/trial{k}/config.json").read_text()).get("pruned") for k in range(3)
    )
    import torch

    last = torch.load(pruned / "last.pth", weights_only=False, map_location="cpu")
    assert last["epoch"] == 1 and last["config"]["pruned"] is True and not last["finished"]
    assert (pruned / "best.pth").is_file()


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_processes_share_one_study_and_finish_n_trials_between_them(demo_root, tmp_path, storage):
    url = f"sqlite:///{tmp_path / 'shared.db'}" if storage == "sqlite" else str(tmp_path / "shared.journal")
    args = sweep_args(demo_root, "--storage", url, "--prune", "none", trials=4)
    command = [sys.executable, str(ROOT / "sweep.py"), *args, "--", "--epochs", "1", *TINY[2:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    processes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    if storage == "sqlite":
        trials = study_trials(url)
    else:
        import optuna
        from optuna.storages.journal import JournalFileBackend

        trials = study_trials(optuna.storages.JournalStorage(JournalFileBackend(url)))
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    assert all(t.user_attrs.get("surplus") for t in trials if t.state.name != "COMPLETE")
    ran = [int(line.split()[1].rstrip(":")) for out, _ in outputs for line in out.splitlines()
           if line.startswith("Trial ") and "python train.py" in line]  # fmt: skip
    assert sorted(ran) == sorted(t.number for t in complete)  # each trial trained once, by one of the two
    assert all(ran.count(n) == 1 for n in ran) and {len([1 for o, _ in outputs if "python train.py" in o])} == {2}
    dirs = sorted(p.name for p in (tmp_path / "model/sw").glob("trial*"))
    assert dirs == sorted(f"trial{t.number}" for t in complete)


def find_postgres_binary(name: str) -> str | None:
    """initdb and pg_ctl: on PATH, or where Debian's postgresql package puts them."""
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server of its own in tmp_path on 127.0.0.1 (as user postgres when the tests run as root, which
    the server refuses), trust authentication; its URL, stopped after the test."""
    initdb, pg_ctl = find_postgres_binary("initdb"), find_postgres_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql package)")
        as_user: list[str] = []
    home = tmp_path
    if os.geteuid() == 0:  # pytest's folders are root's alone: the server's own, outside them
        home = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
        shutil.chown(home, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = home / "pgdata"
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)  # fmt: skip
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(data / "server.log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        if home != tmp_path:
            shutil.rmtree(home, ignore_errors=True)


def test_the_readme_sweep_on_a_real_postgresql_server(demo_root, tmp_path, postgres):
    from test_readme import example_commands, tiny_sweep

    (command,) = example_commands(postgres=True)
    args = [postgres if a.startswith("postgresql://") else a for a in shlex.split(command)[2:]]
    args = tiny_sweep([str(demo_root / "train/images") if a == "/data/train/images" else a for a in args])
    done = run_script("sweep.py", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trials = study_trials(postgres)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [t.value for t in trials] == pytest.approx(list(table(tmp_path)["value"]))
    assert not (tmp_path / "model/sw/study.db").exists()


def test_ctrl_c_stops_the_trial_cleanly_and_the_same_command_completes_the_study(demo_root, tmp_path):
    args = sweep_args(demo_root, "--prune", "none", trials=3)
    command = [sys.executable, str(ROOT / "sweep.py"), *args, "--", "--epochs", "4", *TINY[2:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
    seen = []
    for line in process.stdout:  # interrupt trial 1 after its first epoch
        seen.append(line)
        if line.startswith("epoch   1/4") and any(s.startswith("Trial 1:") for s in seen):
            process.send_signal(signal.SIGINT)
            break
    out = "".join(seen) + process.stdout.read()
    assert process.wait(timeout=120) == 130, out[-3000:]
    rows = table(tmp_path)
    assert list(rows["state"]) == ["COMPLETE", "FAIL", "WAITING"] and rows["note"][1] == "interrupted"
    assert rows["note"][2] == "retry of trial 1"  # queued, to resume from trial1/last.pth
    assert (tmp_path / "model/sw/trial1/last.pth").is_file()
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = table(tmp_path).set_index("trial")
    assert (rows["state"] == "COMPLETE").sum() == 3
    retry = rows[rows["note"] == "retry of trial 1"]
    assert len(retry) == 1 and retry["run_dir"].iloc[0].endswith("trial1") and retry["state"].iloc[0] == "COMPLETE"
    config = json.loads((tmp_path / "model/sw/trial1/config.json").read_text())
    assert config["resumed"] and len(pd.read_csv(tmp_path / "model/sw/trial1/log.csv")) == 4
    assert sorted(p.name for p in (tmp_path / "model/sw").glob("trial*")) == ["trial0", "trial1", "trial3"]


BAD_SPACE = [
    ("lrr=log:1e-4:1e-2", "did you mean lr"),
    ("lr", "not FLAG=SPEC"),
    ("lr=", "not FLAG=SPEC"),
    ("=log:1:2", "not FLAG=SPEC"),
    ("lr=log:1e-2:1e-4", "must be below"),
    ("lr=log:0:1e-2", "must be above 0"),
    ("lr=log:a:b", "two numbers"),
    ("lr=log:1e-4", "two numbers"),
    ("lr=float:nan:1", "must be below"),
    ("lr=log:1e-4:inf", "must be below"),
    ("lr=loglog:1:2", "not a range: log:, float: or int:"),
    ("epochs=float:1:5", "whole numbers"),
    ("epochs=int:1.5:5", "two whole numbers"),
    ("epochs=int:0:5", "--epochs 0 must be at least 1"),
    ("seed=int:-5:3", "--seed -5"),
    ("criterion=focal", "two or more"),
    ("criterion=focal,focal", "two or more different"),
    ("criterion=focal,", "two or more"),
    ("criterion=focal,nosuch", "nosuch"),
    ("augmentation=FaceAugmentation,Nope", "Nope"),
    ("resize=int:64:128", "not a range"),
    ("model=log:1:2", "not a range"),
    ("gpu_aug=yes,no", "a switch: list true,false"),
    ("ema=yes,no", "invalid float value: 'yes'"),
    ("batch_size=32,abc", "invalid int value"),
    ("name=a,b", "cannot be searched"),
    ("eval_metric=loss,accuracy", "cannot be searched"),
]


@pytest.mark.parametrize(("item", "expected"), BAD_SPACE, ids=[i for i, _ in BAD_SPACE])
def test_a_bad_space_item_exits_2_with_one_line_naming_it(tmp_path, item, expected):
    done = run_script("sweep.py", "--name", "sw", "--trials", "2", "--space", item, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: --space {item}: ") and expected in lines[0], lines[0]
    assert "expected FLAG=log:LOW:HIGH" in lines[0] and not (tmp_path / "model").exists()


BAD_CALLS = [
    (["--space", "lr=log:1e-3:1e-2", "lr=float:1e-3:1e-2"], "given twice"),
    (["--space", "lr=log:1e-3:1e-2", "--", "--lr", "0.1"], "--lr is searched (--space) and fixed (after --)"),
    (["--space", "channels_last=true,false", "--", "--no-channels_last"], "--channels_last is searched"),
    (["--trials", "0", "--space", "lr=log:1e-3:1e-2"], "--trials 0 must be at least 1"),
    (["--space", "lr=log:1e-3:1e-2", "--", "--name", "x"], "--name after --"),
    (["--space", "lr=log:1e-3:1e-2", "--", "--epochz", "3"], "did you mean --epochs"),
    (["--space", "lr=log:1e-3:1e-2", "--", "--fold", "all"], "--fold all after --"),
    (["--space", "warmup_epochs=int:1:9", "--", "--epochs", "4"], "must not exceed --epochs 4"),
    (["--space", "lr=log:1e-3:1e-2", "--storage", "nosuchdb://x/y"], "--storage nosuchdb://x/y: cannot open"),
    (["--spacer", "lr=log:1e-3:1e-2"], "did you mean --space"),
    (["--space", "lr=log:1e-3:1e-2", "--storage", "."], "--storage . is a folder, not a file: give the journal"),
    (["--trials", "2"], "--space is missing"),
    (["--space", "warmup_epochs=3,4", "epochs=1,2"], "narrow --space so that every combination is valid"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_CALLS, ids=[e for _, e in BAD_CALLS])
def test_a_bad_sweep_command_exits_2_with_one_line(tmp_path, argv, expected):
    done = run_script("sweep.py", "--name", "sw", *argv, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr


def test_sweep_refuses_torchrun(tmp_path):
    done = run_script("sweep.py", "--space", "lr=log:1e-3:1e-2", cwd=tmp_path, env={"WORLD_SIZE": "2"})
    assert done.returncode == 2 and "CUDA_VISIBLE_DEVICES" in done.stderr and len(done.stderr.splitlines()) == 1


def test_a_trial_left_running_by_a_killed_process_is_queued_again_to_resume(tmp_path):
    import optuna

    import sweep

    study = optuna.create_study(study_name="sw", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / "trial0"
    run_dir.mkdir()
    (run_dir / "last.pth").write_bytes(b"checkpoint")
    for pid in (dead.pid, os.getpid()):  # the first process is gone; the second (this one) still runs
        trial = study.ask()
        trial.suggest_float("lr", 1e-3, 1e-2, log=True)
        for key, value in {"host": sweep.HOST, "pid": pid, "run_dir": str(run_dir)}.items():
            trial.set_user_attr(key, value)
    sweep.recover_stale(study)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states == ["FAIL", "RUNNING", "WAITING"]
    waiting = study.trials[2]
    assert waiting.user_attrs["retry_of"] == 0 and waiting.user_attrs["resume_from"] == str(run_dir)
    again = study.ask()  # the queued trial, with the first one's values
    assert again.number == 2 and again.suggest_float("lr", 1e-3, 1e-2, log=True) == study.trials[0].params["lr"]
