"""Search train.py's flags with Optuna: every trial is an ordinary run directory, pruned epoch by epoch.

python sweep.py --name sw --trials 8 --space lr=log:1e-4:1e-2 criterion=cross_entropy,focal -- --epochs 4
python sweep.py --data_dir /data/train/images --name sw --trials 20 --space epochs=int:12:36 -- --batch_size 64
python sweep.py --name sw --storage postgresql://team@db-host/sweeps --trials 40 --space lr=log:1e-4:1e-2
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import io
import math
import os
import random
import shlex
import socket
import sys
import time
import warnings
from argparse import Namespace
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cache as cache_module
import engine
import options
import report
import rundir
import settings
import train
import utils
from utils import UserError

FORMS = "FLAG=log:LOW:HIGH, FLAG=float:LOW:HIGH, FLAG=int:LOW:HIGH or FLAG=A,B,..."
OWN_FLAGS = ("name", "model_dir", "resume")  # the sweep names and places its trials
NOT_SEARCHED = (*OWN_FLAGS, "config", "eval_metric")  # the recipe goes after --; one metric is the objective
HOST = socket.gethostname()


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(
        description=__doc__ + "\nWords after -- go to every trial's train.py unchanged.",
        usage="python sweep.py [--name NAME] [--trials N] --space ITEM [ITEM ...] [options] [-- TRAIN.PY FLAGS]",
    )
    p.add_argument("--name", default="sweep", help="the study's name and its folder under --model_dir; the same name "
                   "continues the study")  # fmt: skip
    p.add_argument("--model_dir", default=settings.env_value("SM_MODEL_DIR", "./model"),
                   help="where the sweep folder is created [$SM_MODEL_DIR]")  # fmt: skip
    p.add_argument("--data_dir", default=None, help="train.py's --data_dir for every trial [$SM_CHANNEL_TRAIN]")
    p.add_argument("--trials", type=int, default=20, help="finished trials (complete or pruned) the study ends with, "
                   "counted over every process that shares it")  # fmt: skip
    p.add_argument("--space", nargs="+", default=[], metavar="ITEM", help=f"what to search, each {FORMS}: "
                   "lr=log:1e-4:1e-2 epochs=int:12:36 criterion=focal,label_smoothing ema=true,false "
                   "'resize=128 96,256 192'")  # fmt: skip
    p.add_argument("--prune", choices=("median", "hyperband", "none"), default="median",
                   help="median: stop a trial whose score at an epoch is below the median of finished trials' scores "
                   "at that epoch; hyperband: successive halving over epochs")  # fmt: skip
    p.add_argument("--prune_warmup", type=int, default=2, help="epochs every trial trains before it can be pruned")
    p.add_argument("--prune_startup", type=int, default=4,
                   help="finished trials before --prune median prunes any (its reference)")  # fmt: skip
    p.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help="how Optuna picks each trial's values")
    p.add_argument("--storage", default=None, help="an Optuna storage URL (sqlite:///F.db, postgresql://USER@HOST/DB, "
                   "mysql://...) or the path of a journal file (for a shared network folder); default "
                   "sqlite:///MODEL_DIR/NAME/study.db")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="the sampler's seed (default: none, so that processes "
                   "sharing a study draw different values)")  # fmt: skip
    return p


def parse_args(argv: Sequence[str]) -> Namespace:
    """The sweep's flags, and in `train_argv` the words after `--` (for every trial)."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = get_parser().parse_args(argv[:cut])
    args.train_argv = argv[cut + 1 :]
    return args


# ---------------------------------------------------------------------------------------------------
# The search space: strict items over train.py's own flags.
def train_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in train.get_parser()._actions if a.option_strings and a.dest != "help"}


def parse_train(words: Sequence[str]) -> Namespace:
    """train.py's flags from `words` (recipe first), checked as train.py checks them, a mistake as a UserError."""
    parser, said = train.get_parser(), io.StringIO()
    parser.prog = Path(train.__file__).name
    try:
        with contextlib.redirect_stderr(said):
            known, _ = parser.parse_known_args(list(words))
            recipe = train.recipe_argv(known.config) if known.config else []
            args = parser.parse_args([*recipe, *words])
    except SystemExit:  # argparse's error, one line (utils.ArgumentParser)
        raise UserError(said.getvalue().strip().removeprefix("error: ")) from None
    options.check_args(args, train.flag_defaults())
    return args


@dataclass(frozen=True)
class Dimension:
    """One searched flag: a range (`log`, `float`, `int`) or a list of `choices`."""

    flag: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()
    integer: bool = False  # the flag takes whole numbers
    switch: bool = False  # --flag / --no-flag

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.flag, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.flag, int(self.low), int(self.high), log=self.kind == "log")
        return trial.suggest_float(self.flag, self.low, self.high, log=self.kind == "log")

    def words(self, value: Any) -> list[str]:
        """The train.py words that give the flag `value`."""
        if self.switch:
            return [f"--{self.flag}" if value == "true" else f"--no-{self.flag}"]
        return [f"--{self.flag}", *str(value).split()]


def space_error(item: str, problem: str, flag: str | None = None) -> UserError:
    close = difflib.get_close_matches(flag, list(train_actions()), n=1, cutoff=0.5) if flag else []
    hint = f" (did you mean {close[0]}?)" if close else ""
    return UserError(f"--space {item}: {problem}{hint}; expected {FORMS}, FLAG one of train.py's (train.py --help)")


def parse_item(item: str, base: Sequence[str]) -> Dimension:
    """One --space item, each bound or choice checked as train.py would check it on top of `base`."""
    flag, eq, spec = item.partition("=")
    flag = flag.removeprefix("--")
    actions = train_actions()
    if not eq or not flag or not spec:
        raise space_error(item, "not FLAG=SPEC", flag or None)
    if flag not in actions:
        raise space_error(item, f"--{flag} is not a train.py flag", flag)
    if flag in NOT_SEARCHED:
        raise space_error(item, f"--{flag} cannot be searched (the sweep sets --name/--model_dir/--resume; give "
                          "--config and --eval_metric after --)")  # fmt: skip
    action = actions[flag]
    switch = isinstance(action, argparse.BooleanOptionalAction)
    integer = action.type is int
    kind, colon, rest = spec.partition(":")
    if colon and kind in ("log", "float", "int"):
        dimension = parse_range(item, flag, kind, rest, action, integer)
        values: list[Any] = [dimension.low, dimension.high]
    elif colon and "," not in spec and kind.isalpha():
        raise space_error(item, f"'{kind}:' is not a range: log:, float: or int:")
    else:
        choices = [c.strip() for c in spec.split(",")]
        if len(choices) < 2 or not all(choices) or len(set(choices)) < len(choices):
            raise space_error(item, "a list needs two or more different values, comma-separated")
        if switch and not set(choices) <= {"true", "false"}:
            raise space_error(item, f"--{flag} is a switch: list true,false")
        numeric = action.type in (int, float) and action.nargs is None
        values = [action.type(c) if numeric and is_number(c, action.type) else c for c in choices]
        dimension = Dimension(flag, "choice", choices=tuple(values), switch=switch)
    for value in values:
        words = dimension.words(int(value) if integer and dimension.kind != "choice" else value)
        try:
            parse_train([*base, *words])
        except UserError as e:
            raise space_error(item, f"{shlex.join(words)} is refused by train.py: {utils.one_line(str(e))}") from None
    return dimension


def is_number(text: str, kind: type) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def parse_range(item: str, flag: str, kind: str, rest: str, action: argparse.Action, integer: bool) -> Dimension:
    if action.type not in (int, float) or action.nargs is not None:
        raise space_error(item, f"--{flag} takes {'a name' if action.type is None else 'several values'}, not a "
                          "range: give a comma list")  # fmt: skip
    if kind == "float" and integer:
        raise space_error(item, f"--{flag} takes whole numbers: use int:LOW:HIGH or log:LOW:HIGH")
    bounds = rest.split(":")
    parse = int if kind == "int" or integer else float
    if len(bounds) != 2 or not all(is_number(b, parse) for b in bounds):
        raise space_error(item, f"{kind}: needs two {'whole numbers' if parse is int else 'numbers'}, LOW:HIGH")
    low, high = (parse(b) for b in bounds)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise space_error(item, f"LOW {low} must be below HIGH {high}")
    if kind == "log" and low <= 0:
        raise space_error(item, f"log: LOW {low} must be above 0")
    return Dimension(flag, kind, low, high, integer=integer or kind == "int")


def parse_space(items: Sequence[str], base: Sequence[str]) -> list[Dimension]:
    space = [parse_item(item, base) for item in items]
    flags = [d.flag for d in space]
    twice = sorted({f for f in flags if flags.count(f) > 1})
    if twice:
        raise UserError(f"--space: --{twice[0]} is given twice: one item per flag")
    given = train.given_flags(base)
    fixed = [f for f in flags if f in given]
    if fixed:
        raise UserError(
            f"--{fixed[0]} is searched (--space) and fixed (after --): each trial would take the searched value; "
            "drop one of the two"
        )
    return space


def check_base(args: Namespace) -> list[str]:
    """The words every trial starts from (--data_dir, then those after --), checked once before any trial."""
    words = [*(["--data_dir", args.data_dir] if args.data_dir else []), *args.train_argv]
    try:
        base = parse_train(words)
    except UserError as e:
        raise UserError(f"the flags after -- ({shlex.join(args.train_argv)}): {utils.one_line(str(e))}") from None
    given = train.given_flags(words)
    for flag in OWN_FLAGS:
        if flag in given:
            raise UserError(f"--{flag} after --: the sweep names its trials (MODEL_DIR/NAME/trialN); give --name and "
                            "--model_dir before --; the same command again continues a sweep")  # fmt: skip
    if base.fold == "all":
        raise UserError("--fold all after --: a trial reports one validation score per epoch; search one fold "
                        "(--fold 0), then train the winner with --fold all")  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("sweep.py runs one process per GPU, not under torchrun: start one per device with "
                        "CUDA_VISIBLE_DEVICES=N python sweep.py ... (the same --name shares the study)")  # fmt: skip
    return words


# ---------------------------------------------------------------------------------------------------
# The study: storage, sampler, pruner.
def open_storage(url: str | None, sweep_dir: Path) -> Any:
    import optuna

    if url is None:
        return f"sqlite:///{sweep_dir.resolve() / 'study.db'}"
    if "://" in url:
        return url
    from optuna.storages.journal import JournalFileBackend

    path = Path(url).expanduser()
    if path.is_dir():
        raise UserError(
            f"--storage {url} is a folder, not a file: give the journal file's path in it, e.g. {path / 'journal.log'}"
        )
    settings.make_dir(path.resolve().parent, "--storage", "the journal file's folder")
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_study(args: Namespace, sweep_dir: Path, direction: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    sampler = (
        optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=min(10, max(2, args.trials // 3)))
        if args.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=args.seed)
    )
    pruner: optuna.pruners.BasePruner
    if args.prune == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=args.prune_startup, n_warmup_steps=args.prune_warmup)
    elif args.prune == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=max(1, args.prune_warmup))
    else:
        pruner = optuna.pruners.NopPruner()
    storage = open_storage(args.storage, sweep_dir)
    shown = args.storage or storage
    try:
        study = create_or_load(optuna, args.name, storage, sampler, pruner, direction)
    except ImportError:  # Optuna's wrap of SQLAlchemy's: the dialect's driver module is missing
        raise UserError(f"--storage {shown}: its database driver is not installed: pip install 'psycopg[binary]' "
                        "(PostgreSQL) or pymysql (mysql+pymysql://...)") from None  # fmt: skip
    except Exception as e:  # SQLAlchemy's errors for a bad URL, a server that is down, a password refused
        raise UserError(f"--storage {shown}: cannot open the study ({utils.one_line(utils.reason(e))}); check the "
                        "URL, that the server runs and that the database exists") from None  # fmt: skip
    if study.direction.name.lower() != direction:
        raise UserError(f"--name {args.name}: the study in {shown} {study.direction.name.lower()}s its objective, and "
                        f"this --eval_metric asks to {direction}: use another --name")  # fmt: skip
    return study


def create_or_load(optuna: Any, name: str, storage: Any, sampler: Any, pruner: Any, direction: str) -> Any:
    """The study, created by the first process that gets there: processes started together race to create the
    database's tables and the study (seen with two on one SQLite file: the loser's alembic version row fails), so
    a failure is tried again a few times before it counts."""

    def create() -> Any:
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                   direction=direction, load_if_exists=True)  # fmt: skip

    for attempt in range(3):
        try:
            return create()
        except ImportError:
            raise
        except Exception:  # noqa: BLE001 (the last try below reports it)
            time.sleep(0.5 * (attempt + 1) + random.random() * 0.5)
    return create()


def close_study(study: Any) -> None:
    """Closes the study's database connections now, not when the garbage collector finds them (psycopg warns
    about a connection deleted while open, into whatever the process prints next)."""
    storage = getattr(study, "_storage", None)
    backend = getattr(storage, "_backend", storage)
    if hasattr(backend, "remove_session"):
        backend.remove_session()
    engine = getattr(backend, "engine", None)
    if engine is not None:
        engine.dispose()


def trial_states() -> Any:
    from optuna.trial import TrialState

    return TrialState


def counted(study: Any, below: int | None = None) -> int:
    """Trials that finished or are running (in any process), those numbered below `below` if given."""
    ts = trial_states()
    trials = study.get_trials(deepcopy=False, states=(ts.COMPLETE, ts.PRUNED, ts.RUNNING))
    return sum(1 for t in trials if below is None or t.number < below)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(study: Any) -> None:
    """Trials left running by a process of this machine that no longer exists (killed, or the machine rebooted):
    failed, and queued again to resume from their last.pth."""
    for trial in study.get_trials(deepcopy=False, states=(trial_states().RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") == HOST and attrs.get("pid") != os.getpid() and not process_alive(attrs.get("pid", 0)):
            print(f"Trial {trial.number}: its process {attrs.get('pid')} is gone; queued again")
            study.tell(trial.number, state=trial_states().FAIL, skip_if_finished=True)
            retry(study, trial.number, trial.params, attrs.get("run_dir"))


def retry(study: Any, number: int, params: dict[str, Any], run_dir: str | None) -> None:
    """Queue `params` again, resuming `run_dir` when it holds a last.pth (else from the start)."""
    resume = run_dir if run_dir and (Path(run_dir) / "last.pth").is_file() else None
    study.enqueue_trial(params, user_attrs={"retry_of": number, "resume_from": resume})


# ---------------------------------------------------------------------------------------------------
# One trial: one train.py run in this process.
@contextlib.contextmanager
def as_train_command(argv: Sequence[str]) -> Iterator[None]:
    """sys.argv as `python train.py argv` while the trial runs: config.json's `command` repeats the trial alone."""
    saved, sys.argv = sys.argv, [str(Path(train.__file__).name), *argv]
    try:
        yield
    finally:
        sys.argv = saved


def best_value(run_dir: Path, direction: str) -> tuple[float, int]:
    """(the best `score` in the run's log.csv, its number of epochs)."""
    rows = report.read_log(run_dir / "log.csv")
    scores = [float(r["score"]) for r in rows]
    if not scores:
        raise UserError(f"{run_dir / 'log.csv'} holds no epoch: the trial trained nothing")
    return (max(scores) if direction == "maximize" else min(scores)), len(scores)


def run_trial(study: Any, trial: Any, space: list[Dimension], base: list[str], sweep_dir: Path, direction: str) -> None:
    ts = trial_states()
    sampled = [w for d in space for w in d.words(d.suggest(trial))]
    resume = trial.user_attrs.get("resume_from")
    if resume and (Path(resume) / "last.pth").is_file():
        run_dir, where = Path(resume), ["--resume", resume]
        for row in report.read_log(run_dir / "log.csv"):  # the epochs before the interruption, reported again
            trial.report(float(row["score"]), int(row["epoch"]))
    else:
        run_dir = sweep_dir.resolve() / f"trial{trial.number}"  # absolute: another process may resume it
        where = ["--model_dir", str(sweep_dir), "--name", run_dir.name]
        if run_dir.exists():
            raise UserError(f"{run_dir} exists but is not trial {trial.number} of this study (another --storage?): "
                            "use another --name")  # fmt: skip
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("params", shlex.join(sampled))
    argv = [*base, *sampled, *where]
    print(f"Trial {trial.number}: python train.py {shlex.join(argv)}", flush=True)

    def on_epoch(row: dict[str, Any]) -> bool:
        trial.report(float(row["score"]), int(row["epoch"]))
        return trial.should_prune()

    start = time.time()
    try:
        args = parse_train(argv)
    except UserError as e:  # each value was checked alone: these ones do not go together
        study.tell(trial, state=ts.FAIL)
        message = f"{utils.one_line(str(e))}; narrow --space so that every combination is valid"
        raise UserError(f"trial {trial.number} ({shlex.join(sampled)}) is refused by train.py: {message}") from None
    args.sweep = {"study": study.study_name, "trial": trial.number, "host": HOST}
    try:
        with as_train_command(argv):
            train.main(args, argv, on_epoch=on_epoch)
    except engine.Pruned as e:
        trial.set_user_attr("seconds", time.time() - start)
        study.tell(trial, state=ts.PRUNED)
        print(f"Trial {trial.number}: pruned after epoch {e.epoch}")
        return
    except (utils.Stopped, KeyboardInterrupt) as e:
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=ts.FAIL)
        if not resume and run_dir.is_dir() and not (run_dir / "last.pth").is_file():
            rundir.remove_unused(run_dir)  # stopped before its first checkpoint: the retry starts afresh
        retry(study, trial.number, trial.params, str(run_dir))
        print(f"Trial {trial.number}: interrupted; the same command continues the study (this trial resumes)")
        raise e if isinstance(e, utils.Stopped) else utils.Stopped("SIGINT", run_dir) from None
    except BaseException as e:
        trial.set_user_attr("error", utils.one_line(str(e))[:500])
        study.tell(trial, state=ts.FAIL)
        raise
    value, epochs = best_value(run_dir, direction)
    trial.set_user_attr("seconds", time.time() - start)
    study.tell(trial, value)
    print(f"Trial {trial.number}: {value:.4f} after {epochs} epochs in {time.time() - start:.0f}s")


def run_trials(study: Any, args: Namespace, space: list[Dimension], base: list[str], sweep_dir: Path) -> None:
    """Ask for trials until --trials are finished or running, over every process on the study."""
    ts, direction = trial_states(), study.direction.name.lower()
    while counted(study) < args.trials:
        trial = study.ask()
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", os.getpid())
        if counted(study, below=trial.number) >= args.trials:  # another process asked at the same moment
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=ts.FAIL)
            break
        try:
            run_trial(study, trial, space, base, sweep_dir, direction)
        finally:
            write_table(study, sweep_dir / "sweep.csv")


# ---------------------------------------------------------------------------------------------------
# What the sweep leaves: sweep.csv, figures (PNG and TensorBoard).
def table_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if attrs.get("surplus"):
            continue
        note = "interrupted" if attrs.get("interrupted") else attrs.get("error", "")
        if attrs.get("retry_of") is not None:
            note = f"retry of trial {attrs['retry_of']}"
        run_dir = attrs.get("run_dir", "")
        epochs = len(report.read_log(Path(run_dir) / "log.csv")) if run_dir else 0
        rows.append({
            "trial": t.number, "state": t.state.name, "value": t.value if t.value is not None else "",
            "epochs": epochs, "seconds": round(attrs.get("seconds", 0.0), 1), "params": attrs.get("params", ""),
            "run_dir": run_dir, "host": attrs.get("host", ""), "note": note,
        })  # fmt: skip
    return rows


def write_table(study: Any, path: Path) -> None:
    import pandas as pd

    columns = ["trial", "state", "value", "epochs", "seconds", "params", "run_dir", "host", "note"]
    table = pd.DataFrame(table_rows(study), columns=columns)
    utils.atomic_write(path, lambda f: table.to_csv(f, index=False))


def write_figures(study: Any, sweep_dir: Path) -> list[Path]:
    """The optimization history, parameter importances and parallel coordinates as PNGs and in TensorBoard; a
    figure that cannot be drawn yet (too few finished trials) is skipped with a warning."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as plots
    from torch.utils.tensorboard import SummaryWriter

    written = []
    finished = len(study.get_trials(deepcopy=False, states=(trial_states().COMPLETE,)))
    with warnings.catch_warnings(), contextlib.closing(SummaryWriter(str(sweep_dir))) as writer:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib's and the importance evaluator's on few trials
        for name, plot in (("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances),
                           ("parallel_coordinate", plots.plot_parallel_coordinate)):  # fmt: skip
            try:
                axes = plot(study)
            except Exception as e:  # noqa: BLE001 (Optuna's reasons: too few trials, one value only, ...)
                print(f"warning: no {name} figure yet: {utils.one_line(utils.reason(e))}", file=sys.stderr)
                continue
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            figure.set_size_inches(9, 5)
            path = sweep_dir / f"{name}.png"
            utils.atomic_write(
                path, functools.partial(figure.savefig, format="png", dpi=100, bbox_inches="tight"), True
            )
            writer.add_figure(f"sweep/{name}", figure, global_step=finished)
            written.append(path)
    return written


def summary(study: Any, sweep_dir: Path) -> None:
    complete = study.get_trials(deepcopy=False, states=(trial_states().COMPLETE,))
    if not complete:
        print(f"No complete trial yet in {sweep_dir}")
        return
    best = study.best_trial
    run_dir = best.user_attrs.get("run_dir", "")
    print(f"Best: trial {best.number}, {best.value:.4f} ({best.user_attrs.get('params', '')}) in {run_dir}; "
          f"{len(complete)} complete of {len(study.trials)} trials, listed in {sweep_dir / 'sweep.csv'}")  # fmt: skip
    print(f"Next: python inference.py --model_dir {shlex.quote(run_dir)}")


# ---------------------------------------------------------------------------------------------------
RANGES: dict[str, settings.Range] = {  # every numeric flag: what it must be (settings.check_ranges)
    "trials": settings.at_least(1),
    "prune_warmup": ("0 or more", lambda v: v >= 0),
    "prune_startup": ("0 or more", lambda v: v >= 0),
    "seed": ("0 or more (numpy takes no negative seed)", lambda v: 0 <= v < 2**32),
}


def main(args: Namespace) -> Any:
    settings.check_ranges(args, RANGES)
    rundir.check_run_name(args.name)
    if not args.space:
        raise UserError(f"--space is missing: what to search, each {FORMS} (e.g. --space lr=log:1e-4:1e-2)")
    base = check_base(args)
    space = parse_space(args.space, base)
    eval_metric = parse_train(base).eval_metric
    direction = "minimize" if eval_metric == "loss" else "maximize"
    sweep_dir = settings.make_dir(Path(args.model_dir) / args.name, "--model_dir", "SM_MODEL_DIR")
    study = open_study(args, sweep_dir, direction)
    try:
        recover_stale(study)
        print(f"Sweep {args.name}: {counted(study)} of {args.trials} trials finished or running; {eval_metric} is "
              f"{direction}d, study in {args.storage or sweep_dir / 'study.db'}")  # fmt: skip
        try:
            with cache_module.reuse_within_process():
                run_trials(study, args, space, base, sweep_dir)
        finally:
            write_table(study, sweep_dir / "sweep.csv")
        write_figures(study, sweep_dir)
        summary(study, sweep_dir)
    finally:
        close_study(study)
    return study


if __name__ == "__main__":
    utils.run_main(lambda argv: main(parse_args(argv)), sys.argv[1:])
