"""Where a flag's value comes from, as a class of input: every numeric flag of every script has a range, and a
value from the environment or `.env` that is malformed, empty or out of range stops every script on one line
that names where it was set, before anything is read or written (never a silent fallback to a default)."""

from __future__ import annotations

import importlib

import pytest

import options
import settings
from conftest import one_error_line, run_script, tiny_run_args

SCRIPTS = {"train.py": "options", "inference.py": "inference", "runs.py": "runs", "sweep.py": "sweep"}
RANGES = {"train.py": "FLAG_RANGES", "inference.py": "RANGES", "runs.py": "RANGES", "sweep.py": "RANGES"}


def parser_of(script: str):
    if script == "train.py":
        import train

        return train.get_parser()
    return importlib.import_module(SCRIPTS[script]).get_parser()


def ranges_of(script: str) -> dict:
    return getattr(importlib.import_module(SCRIPTS[script]), RANGES[script])


def numeric_actions(script: str) -> dict:
    return {a.dest: a for a in parser_of(script)._actions if a.type in (int, float)}


def nothing_written(cwd) -> bool:
    """No run, sweep, output or demo data folder: the script stopped before doing anything."""
    return not any((cwd / name).exists() for name in ("model", "output", "data", "cache"))


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_numeric_flag_of_every_script_has_a_range(script):
    assert set(numeric_actions(script)) == set(ranges_of(script)), script


CASES = [(script, flag) for script in SCRIPTS if script != "train.py" for flag in numeric_actions(script)]


@pytest.mark.parametrize(("script", "flag"), CASES)
def test_a_numeric_flag_out_of_range_or_not_finite_stops_the_script_on_one_line(script, flag, tmp_path):
    """train.py's flags: tests/test_bad_input_2.py. -1 is out of every range; nan and inf pass no comparison."""
    action = numeric_actions(script)[flag]
    count = action.nargs if isinstance(action.nargs, int) else 1
    for value in ["-1"] + (["nan", "inf"] if action.type is float else []):
        words = [f"--{flag}", *([value] * count)] + (["--space", "lr=log:1e-4:1e-2"] if script == "sweep.py" else [])
        line = one_error_line(run_script(script, *words, cwd=tmp_path))
        assert line.startswith(f"error: --{flag} ") and "must be" in line, line
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize(
    ("dotenv", "expected"),
    [
        ("SM_CHANNEL_TRAIN = /data\n=/oops\n", "line 2: cannot parse '=/oops'"),  # python-dotenv only warns
        ("SM_MODEL_DIR='unclosed\n", "line 1: cannot parse"),
        (b"\xff\xfeSM_MODEL_DIR=x\n", "cannot be read (UnicodeDecodeError"),
        ("SM_MODEL_DIR\n", "SM_MODEL_DIR in {env} is set but empty"),
        ("SM_MODEL_DIR=\n", "SM_MODEL_DIR in {env} is set but empty"),
    ],
)
def test_a_dotenv_file_that_cannot_be_used_stops_every_script_on_one_line(script, dotenv, expected, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_bytes(dotenv if isinstance(dotenv, bytes) else dotenv.encode())
    line = one_error_line(run_script(script, *(["--space", "lr=log:1e-4:1e-2"] * (script == "sweep.py")),
                                     cwd=tmp_path))  # fmt: skip
    assert str(env_file) in line and expected.format(env=env_file) in line, line
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("script", ["train.py", "inference.py", "runs.py"])
def test_an_empty_environment_variable_is_refused_not_taken_for_unset(script, tmp_path):
    env = {"SM_CHANNEL_TRAIN": "", "SM_MODEL_DIR": "", "SM_CHANNEL_MODEL": "", "SM_CHANNEL_EVAL": ""}
    line = one_error_line(run_script(script, cwd=tmp_path, env=env))
    assert "is set but empty" in line and line.split()[1].startswith("$SM_"), line
    assert nothing_written(tmp_path)


NUMERIC_ENV = [("NUM_WORKERS", "abc"), ("NUM_WORKERS", "-3"), ("NUM_WORKERS", "2.5"), ("PREFETCH_FACTOR", "0")]


@pytest.mark.parametrize(
    ("script", "name", "value"),
    [
        (s, n, v)
        for s in ("train.py", "inference.py")
        for n, v in NUMERIC_ENV
        if (s, n) != ("inference.py", "PREFETCH_FACTOR")
    ],
)
@pytest.mark.parametrize("where", ["environment", ".env"])
def test_a_numeric_default_from_the_environment_names_its_variable(script, name, value, where, tmp_path):
    env = {name: value} if where == "environment" else {}
    if where == ".env":
        (tmp_path / ".env").write_text(f"{name}={value}\n")
    line = one_error_line(run_script(script, cwd=tmp_path, env=env))
    origin = f"${name}" if where == "environment" else f"{name} in {tmp_path / '.env'}"
    flag = "--" + name.lower()
    assert line.startswith(f"error: {origin}: '{value}' must be a whole number") and flag in line, line
    assert nothing_written(tmp_path)


def test_values_from_the_environment_and_dotenv_still_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NUM_WORKERS", raising=False)
    monkeypatch.delenv("SM_MODEL_DIR", raising=False)
    (tmp_path / ".env").write_text("# comment\nNUM_WORKERS=3\nSM_MODEL_DIR='runs here'  # the runs\n")
    assert settings.env_int("NUM_WORKERS", 7, "--num_workers") == 3
    assert settings.env_value("SM_MODEL_DIR", "./model") == "runs here"
    assert settings.env_value("SM_CHANNEL_EVAL", "./eval") == "./eval"
    monkeypatch.setenv("NUM_WORKERS", "0")  # a real environment variable wins over .env
    assert settings.env_int("NUM_WORKERS", 7, "--num_workers") == 0
    assert options.FLAG_RANGES["num_workers"][1](0)


def test_a_teacher_that_does_not_exist_is_named_by_its_own_flag(tmp_path):
    line = one_error_line(run_script("train.py", "--teacher", "missing_run", cwd=tmp_path))
    assert line.startswith("error: --teacher missing_run does not exist"), line  # it said --model_dir
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("script", ["train.py", "sweep.py"])
@pytest.mark.parametrize("name", ["", ".", "..", "../beside", "a/b", "/abs", "a\\b"])
def test_a_run_name_that_is_not_one_folder_name_is_refused(script, name, tmp_path):
    """A run (or sweep) lives in --model_dir/NAME: '' made model2/ beside model/, ../x a run outside it, where
    runs.py and inference.py never look."""
    words = ["--name", name, "--data_dir", "never_read"] + (["--space", "lr=log:1e-4:1e-2"] * (script == "sweep.py"))
    line = one_error_line(run_script(script, *words, cwd=tmp_path))
    assert line == f"error: --name {name!r} must be one folder name (no '/', not '', '.' or '..'): the run goes in " \
        "--model_dir/NAME; to put runs elsewhere, pass --model_dir", line  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_run(demo_root, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    assert run_script("train.py", *tiny_run_args(demo_root), cwd=cwd).returncode == 0
    return cwd / "model/exp"


PATH_VARIABLES = [("train.py", "SM_CHANNEL_TRAIN", "--data_dir"), ("inference.py", "SM_CHANNEL_MODEL", "--model_dir"),
                  ("inference.py", "SM_CHANNEL_EVAL", "--data_dir")]  # fmt: skip


@pytest.mark.parametrize(("script", "name", "flag"), PATH_VARIABLES)
@pytest.mark.parametrize("where", ["environment", ".env"])
def test_a_path_that_does_not_exist_names_the_variable_it_came_from(script, name, flag, where, tiny_run, tmp_path):
    """The user never typed the flag: the line says which variable (or which .env) to change."""
    missing = tmp_path / "missing"
    env = {name: str(missing)} if where == "environment" else {}
    if where == ".env":
        (tmp_path / ".env").write_text(f"{name}={missing}\n")
    words = ["--model_dir", str(tiny_run)] if name == "SM_CHANNEL_EVAL" else []
    line = one_error_line(run_script(script, *words, cwd=tmp_path, env=env))
    origin = f"${name}" if where == "environment" else f"{name} in {tmp_path / '.env'}"
    assert line.startswith(f"error: {flag} {missing} (from {origin}) does not exist"), line
    given = one_error_line(run_script(script, *words, flag, str(missing), cwd=tmp_path, env=env))
    assert given.startswith(f"error: {flag} {missing} does not exist"), given  # typed: nothing to add
