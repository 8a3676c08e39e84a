"""Helpers shared by every script: errors, name lookup, metrics, atomic checkpoints, figures, flags.

Devices, DDP ranks and the random state live in devices.py; where a flag's value comes from (.env, the
environment) and what it must be, in settings.py.

This module imports nothing from the project, so every other file can import it.

    python -c "import utils; print(utils.default_num_workers())"
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, NoReturn

import numpy as np
import torch


class UserError(Exception):
    """A mistake the user can fix (bad path, flag or name); scripts print it on one line and exit 2."""


class UnreadableImageError(UserError):
    """An image file that cannot be decoded (truncated, empty, not an image, too large)."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None) -> None:
        if reason is None:  # re-created from its message, as DataLoader does with errors raised in workers
            super().__init__(str(path))
            self.path, self.reason = "", str(path)
            return
        super().__init__(f"cannot read image {path} ({reason}); remove or replace the file")
        self.path, self.reason = str(path), reason


class Stopped(Exception):  # noqa: N818 (not an error: the run was asked to stop, and saved first)
    """A run stopped by a signal after saving last.pth, in `run_dir` (the one to --resume)."""

    def __init__(self, signal_name: str | None, run_dir: Path | None = None) -> None:
        super().__init__(f"stopped by {signal_name or 'a signal'}")
        self.signal_name, self.run_dir = signal_name or "SIGTERM", run_dir

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
        return 128 + int(signal.Signals[self.signal_name])


def run_main(main: Callable[[Any], Any], args: Any) -> None:
    """Run a script's `main(args)`, turning a `UserError` into one line on stderr and exit code 2, and a run
    stopped by a signal (after saving) into exit code 128 + the signal's number."""
    default_hook = threading.excepthook

    def thread_hook(hook_args: threading.ExceptHookArgs) -> None:
        # TensorBoard's writer thread keeps its error and raises it again in the main thread's next write or
        # close, which reports it in one line below: its own traceback would be a second report.
        if hook_args.exc_value is None or not out_of_space(hook_args.exc_value):
            default_hook(hook_args)

    threading.excepthook = thread_hook
    stdout, sys.stdout = sys.stdout, StdoutGuard(sys.stdout)
    try:
        main(args)
        sys.stdout.flush()  # what is still buffered may meet a closed pipe: the guard drops it
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        sys.exit(e.exit_code)
    except Exception as e:  # a writer outside atomic_write (TensorBoard's event file, a library) found the disk full
        if not out_of_space(e):
            raise
        where = next((f" to write {x.filename}" for x in error_chain(e) if getattr(x, "filename", None)), "")
        print(f"error: no space left on the device{where}: free some space and rerun; finished checkpoints are kept",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    finally:
        sys.stdout = stdout
        threading.excepthook = default_hook


class StdoutGuard:
    """sys.stdout for a script's run: once its reader has gone (`runs.py --suspects RUN | head`), what is printed is
    dropped instead of raising BrokenPipeError, so the script still finishes its work (the run, the CSV files it
    writes after printing) and exits as it would have. stdout's descriptor then points to /dev/null, so the
    interpreter's last flush and processes started later find no broken pipe either."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.reader_gone = stream, False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self.drop()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.drop()

    def drop(self) -> None:
        self.reader_gone = True
        with contextlib.suppress(OSError, ValueError):  # no descriptor (a StringIO in tests): nothing to redirect
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def one_line(message: str) -> str:
    """A UserError's message as the one line a script prints. Raised in a DataLoader worker, it arrives wrapped
    in the worker's traceback: its last line is the message. Any other line break is folded into a space, so
    nothing before it (the flag, the path) is lost."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if any(line.startswith(("Traceback (most recent", "Original Traceback")) for line in lines):
        return lines[-1].removeprefix(f"{UserError.__module__}.").removeprefix(f"{UserError.__name__}: ")
    return " ".join(lines)


def reason(error: BaseException, limit: int = 200) -> str:
    """`TypeName: message` of a library's exception, on one line and at most `limit` characters of message: the
    part of an error line that says why, after the flag or path that says what."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """Loader workers for this machine: one per CPU core left after the training process, at most 8."""
    return max(0, min(8, usable_cores() - 1))


# ---------------------------------------------------------------------------------------------------
# Names are the interface: classes are found by name, with the valid names in the error.
def module_classes(module: ModuleType, predicate: Callable[[type], bool] | None = None) -> dict[str, type]:
    """Classes *defined in* `module` (not imported into it) that satisfy `predicate`, by name."""
    return {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and obj.__module__ == module.__name__
        and not name.startswith("_")
        and (predicate is None or predicate(obj))
    }


def listing(items: Sequence[str], limit: int = 5, sep: str = ", ") -> str:
    """The first `limit` items joined, and how many more, for one-line messages."""
    items = list(items)
    return sep.join(items[:limit]) + (f"{sep}and {len(items) - limit} more" if len(items) > limit else "")


def unknown_name_message(flag: str, name: str, valid: Iterable[str], extra: str = "", more: Iterable[str] = ()) -> str:
    """One line naming the flag, the bad value, the closest valid name and all valid names.

    `more` are further valid names searched for the closest match but too many to list (e.g. timm's).
    """
    valid = sorted(valid)
    close = difflib.get_close_matches(name, [*valid, *more], n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{flag} '{name}' is unknown.{hint} Valid names: {', '.join(valid)}{extra}"


def find_class(module: ModuleType, name: str, flag: str, predicate: Callable[[type], bool] | None = None) -> type:
    """The class called `name` defined in `module`; a `UserError` listing the valid names otherwise."""
    classes = module_classes(module, predicate)
    if name not in classes:
        raise UserError(unknown_name_message(flag, name, classes))
    return classes[name]


def filter_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of `kwargs` that `fn` accepts, so one call site can feed classes with different arguments."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


# ---------------------------------------------------------------------------------------------------
# Metrics: sklearn.metrics, over exactly the samples that were scored. sklearn is imported on first use, so the
# scripts that only import utils (inference, the demo) start without it. sklearn refuses empty inputs; an empty
# split scores zeros here, as the counts it has are all zero.
def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts[i, j] of samples with truth i predicted as j (int64, num_classes x num_classes)."""
    from sklearn import metrics

    if len(targets) == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return metrics.confusion_matrix(targets, preds, labels=np.arange(num_classes))


def f1_per_class(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """F1 of each class; 0 for a class that is neither present nor predicted (sklearn's zero_division=0)."""
    from sklearn import metrics

    if len(targets) == 0:
        return np.zeros(num_classes)
    return metrics.f1_score(targets, preds, labels=np.arange(num_classes), average=None, zero_division=0)


def macro_f1(targets: np.ndarray, preds: np.ndarray, num_classes: int | None = None) -> float:
    """Macro F1 over the classes present in truth or prediction: `sklearn.metrics.f1_score(average="macro")`.
    `num_classes` does not change it (classes absent from both are not averaged); callers pass it for symmetry
    with f1_per_class."""
    from sklearn import metrics

    if len(targets) == 0:
        return 0.0
    return float(metrics.f1_score(targets, preds, average="macro", zero_division=0))


class EarlyStopping:
    """Stop when the monitored score (higher is better) has not improved for `patience` epochs; 0 disables."""

    def __init__(self, patience: int = 0, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = -float("inf")
        self.bad_epochs = 0

    def step(self, score: float) -> bool:
        """Record one epoch's score; True when training should stop."""
        if score > self.best + self.min_delta:
            self.best = score
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best, self.bad_epochs = state["best"], int(state["bad_epochs"])


# ---------------------------------------------------------------------------------------------------
# Files: written to a temporary name in the same directory, flushed to disk, then renamed over the target,
# so a killed process leaves either the old file or the new one, never half of one.
TMP_SUFFIX = ".tmp"  # atomic_write's temporary files: `.{name}.XXXXXXXX.tmp` beside the file they become


def current_umask() -> int:
    """The process's umask (read without changing it where /proc tells; os.umask can only set and return)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder` (not below it); returns them. Only for a
    folder this process owns now: a resumed run's directory."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False) -> None:
    """Call `write(file_object)` on a temporary file next to `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    if path.is_dir():  # os.replace would fail after the whole write, with a traceback
        raise UserError(f"{path} is a folder, not a file: move it away or write the file elsewhere")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide a shared run's files from the team
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if out_of_space(e, path.parent):
            raise UserError(
                f"no space left on the device to write {path}: free some space and rerun"
                + (f" (the previous {path.name} is kept)" if path.exists() else "")
            ) from None
        raise


def out_of_space(error: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether `error` means a full disk or quota: an ENOSPC/EDQUOT OSError anywhere in its chain (torch.save's
    zip writer reports it as a RuntimeError about an unexpected position, raised while handling it), or any
    RuntimeError while `folder`'s file system has less than 1 MiB left."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, RuntimeError) and folder is not None:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < 2**20
    return False


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers, and the project's own
    (a class with `wraps_module = True` holding the model as `.module`, such as predict.AutocastReplica)."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) or getattr(
            type(model), "wraps_module", False
        ):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip `module.` and `_orig_mod.` prefixes so a state dict loads into a bare model."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def save_checkpoint(path: str | os.PathLike, **state: Any) -> None:
    """Save a checkpoint dict atomically; a `model` entry is stored unwrapped, without prefixes."""
    if isinstance(state.get("model"), torch.nn.Module):
        state["model"] = clean_state_dict(unwrap_model(state["model"]).state_dict())
    atomic_write(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (tensors and plain Python types only)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist: train first or pass another --model_dir") from None
    except Exception as e:  # truncated or foreign file
        raise UserError(
            f"checkpoint {path} cannot be read ({reason(e)}): it is not a checkpoint of train.py, or damaged; retrain "
            "or pick another run"
        ) from None


# ---------------------------------------------------------------------------------------------------
def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current git commit of the code, when it lives in a git checkout."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide a run's numbers, for `config.json`."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "torchvision", "timm", "albumentations", "numpy", "pillow", "pandas"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


FIGURE_DPI = 72  # TensorBoard figures and worst_val.png


def image_grid(
    images: np.ndarray, titles: list[str], ncols: int = 4, colors: list[str] | None = None, cell: int = 216
) -> np.ndarray:
    """HWC uint8 `images` in a grid, each shrunk into a `cell`-pixel square under its (multi-line) title, as one
    HWC uint8 RGB array for TensorBoard's add_image or a PNG. Drawn with PIL: matplotlib took about a second for
    16 images, and a run draws one with every best.pth."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    band = 4 + 15 * max((t.count("\n") + 1 for t in titles), default=1)
    n, nrows = len(images), max(1, -(-len(images) // ncols))
    canvas = Image.new("RGB", (ncols * cell, nrows * (cell + band)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        image = Image.fromarray(np.ascontiguousarray(images[i]))
        image.thumbnail((cell - 8, cell - 8))
        x, y = (i % ncols) * cell, (i // ncols) * (cell + band)
        draw.multiline_text((x + cell // 2, y + 2), titles[i], fill=colors[i] if colors else "black", font=font,
                            anchor="ma", align="center")  # fmt: skip
        canvas.paste(image, (x + (cell - image.width) // 2, y + band + (cell - image.height) // 2))
    return np.asarray(canvas)


def figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure outside pyplot (nothing left in pyplot's registry of open figures, no GUI backend),
    laid out tightly when drawn."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=FIGURE_DPI, layout="tight")


def render(fig: Any) -> np.ndarray:
    """The figure drawn once, as an HWC uint8 RGB array: for TensorBoard's add_image and for a PNG file alike."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default and the script's docstring (its example commands) kept as written."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line naming the flag and the fix, exit code 2 (argparse's
    own prints the whole usage first, dozens of lines for train.py)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments: "):
            word = message.split(": ", 1)[1].split()[0].split("=")[0]
            close = difflib.get_close_matches(word, [o for a in self._actions for o in a.option_strings], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
        self.exit(2, f"error: {message}{hint} (python {self.prog} --help lists the flags)\n")


def describe(classes: dict[str, type]) -> str:
    """'Name (first docstring line); ...' for --help texts."""
    return "; ".join(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in classes.items())


# ---------------------------------------------------------------------------------------------------
# Signals, as a run stops and saves.


class StopRequest:
    """Catch SIGINT/SIGTERM during training: the current step finishes, then the loop saves and exits.

    A second signal stops at once (the default handler), for a run that does not react."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: finishing this step, then saving last.pth", file=sys.stderr, flush=True)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal is not None
