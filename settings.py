"""Where a flag's value comes from and what it must be: flag > environment variable > .env file > default, each
value checked before anything runs, and the errors that name the place to change it.

    python -c "import settings; print(settings.env_value('SM_MODEL_DIR', './model'))"
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from utils import UserError, reason


def read_dotenv(path: str | os.PathLike = ".env") -> dict[str, str | None]:
    """The NAME=value lines of `path` (python-dotenv's parser; {} when there is no such file). A line it cannot
    parse, or a file it cannot read, is a `UserError` naming the file and line: python-dotenv would only warn and
    skip the line, and the flag would silently take its default (the demo data instead of $SM_CHANNEL_TRAIN)."""
    path = Path(path)
    if not path.is_file():
        return {}
    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path.resolve()} cannot be read ({reason(e)}): write NAME=value lines in UTF-8") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            raise UserError(
                f"{path.resolve()} line {binding.original.line}: cannot parse {binding.original.string.strip()!r}: "
                "write NAME=value (quote values with spaces), or # before a comment"
            )
    return dotenv_values(stream=io.StringIO(text))


def env_value(name: str, default: Any = None, dotenv_path: str | os.PathLike = ".env") -> Any:
    """The value of environment variable `name`, else of `name` in `.env` (current directory), else default.

    `.env` is read without being loaded into `os.environ`, so a real environment variable always wins. One that
    is set but empty (`NAME=`, or `NAME` alone in .env) is a `UserError`: no setting means what the user meant.
    """
    if name in os.environ:
        value, where = os.environ[name], f"${name}"
    else:
        values = read_dotenv(dotenv_path)
        if name not in values:
            return default
        value, where = values[name], f"{name} in {Path(dotenv_path).resolve()}"
    if not value:
        raise UserError(f"{where} is set but empty: give it a value, or remove it to use the default")
    return value


def env_int(name: str, default: int, flag: str, minimum: int = 0) -> int:
    """`env_value` of a whole number of at least `minimum`, the default of `flag`; else a `UserError` naming where
    it was set (checked here: argparse would blame the flag, which the user never typed)."""
    value = env_value(name)
    if value is None:
        return default
    with contextlib.suppress(ValueError):
        if int(value) >= minimum:
            return int(value)
    where = value_origin(flag, name) or f"${name}"
    raise UserError(f"{where}: {value!r} must be a whole number, {minimum} or more (it sets {flag}'s default)")


def given(flag: str, value: Any, env: str | None) -> str:
    """'FLAG VALUE' for an error message, with '(from $ENV)' or '(from ENV in /abs/.env)' when the value came from
    there (`value_origin`): the user who never typed the flag learns what to change."""
    origin = value_origin(flag, env)
    return f"{flag} {value}" + (f" (from {origin})" if origin else "")


def value_origin(flag: str, env: str | None, dotenv_path: str | os.PathLike = ".env") -> str:
    """Where the value of `flag` came from, for an error message: '' when the flag was given (or its default
    applies), else '$ENV' or 'ENV in /abs/.env': the place to change it."""
    if any(a == flag or a.startswith(f"{flag}=") for a in sys.argv[1:]) or not env:
        return ""
    if env in os.environ:
        return f"${env}"
    if read_dotenv(dotenv_path).get(env) is not None:
        return f"{env} in {Path(dotenv_path).resolve()}"
    return ""


# ---------------------------------------------------------------------------------------------------
# What each numeric flag must be: each script's table of flag -> (rule, test), checked before anything runs.
Range = tuple[str, Callable[[float], bool]]


def at_least(low: float) -> Range:
    return f"at least {low:g}", lambda v: v >= low


def check_ranges(args: Any, ranges: dict[str, Range]) -> None:
    """Every numeric flag of `ranges` within its range, finite: nan and inf pass no comparison here."""
    for flag, (rule, ok) in ranges.items():
        value = getattr(args, flag, None)
        values = list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
        if not all(math.isfinite(v) and ok(v) for v in values):
            shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
            raise UserError(f"--{flag} {shown} must be {rule}" + (" (each)" if len(values) > 1 else ""))


def missing(path: str | os.PathLike, folder: bool) -> str:
    """Why `path` is not the folder (or file) a flag wants: 'is a file, not a folder', 'is a folder, not a file',
    or 'does not exist' (a broken link too)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        return "is a file, not a folder"
    if not folder and path.is_dir():
        return "is a folder, not a file"
    return "does not exist"


def need(path: str | os.PathLike, folder: bool, name: str, fix: str) -> Path:
    """`path` when it is a folder (`folder`) or a file; else a UserError "{name} {what it is instead}: {fix}"."""
    path = Path(path)
    if path.is_dir() if folder else path.is_file():
        return path
    raise UserError(f"{name} {missing(path, folder)}: {fix}")


def make_dir(path: str | os.PathLike, flag: str, env: str | None = None) -> Path:
    """Create folder `path` (and its parents) for `flag`, or one line naming the flag, where its value was set,
    and what is in the way."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else (e.strerror or reason(e))
        origin = value_origin(flag, env)
        change = f"pass another folder as {flag}" + (f" or change {origin}" if origin else "")
        raise UserError(f"{given(flag, path, env)} cannot be created ({why}): {change}") from None
