"""The mask competition's label rules (class = mask * 6 + gender * 3 + age band) and hand-made label fixes.

python -c "import labels; print(labels.mask_class_names()[labels.encode(1, 1, 2)])"
python -c "import labels; print(labels.read_label_fixes('fixes.csv'))"

A label-fix file is a CSV with the columns id,field,value (others, e.g. a note, are ignored; lines starting
with # and blank lines too). `id` is a person (or group) id, fixing all of its images, or an image path
relative to the data folder or absolute, fixing that image only (a folder path: every image in it).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import utils
from utils import UserError

# ---------------------------------------------------------------------------------------------------
# Labels of the mask competition: class = mask * 6 + gender * 3 + age.
MASK_FILES = {f"mask{i}": 0 for i in range(1, 6)} | {"incorrect_mask": 1, "normal": 2}
MASK_NAMES = ("wear", "incorrect", "not wear")
GENDERS = {"male": 0, "female": 1}
GENDER_NAMES = ("male", "female")
DEFAULT_AGE_BOUNDS = (30, 60)
# The label's three fields and their number of values, in the order of `encode`'s arguments and `decode`'s result:
# class = mask * 6 + gender * 3 + age is the row-major index into a (3, 2, 3) grid, which is how a multi-head
# model combines its heads (model.combine_tasks). The names are its heads' names, so checkpoints hold heads.mask, ...
TASKS = {"mask": len(MASK_NAMES), "gender": len(GENDER_NAMES), "age": 3}


def age_band(age: int, bounds: Sequence[int] = DEFAULT_AGE_BOUNDS) -> int:
    """0 below bounds[0], 1 from bounds[0] to bounds[1] - 1, 2 from bounds[1] on."""
    return int(age >= bounds[0]) + int(age >= bounds[1])


def band_probabilities(ages: Sequence[int], bounds: Sequence[int] = DEFAULT_AGE_BOUNDS, sigma: float = 0.0) -> Any:
    """(N, 3) float32 probabilities of the age bands for ages in whole years: one-hot at `sigma` 0, else the chance
    that an age drawn from a normal distribution around the middle of the person's year (age + 0.5, spread `sigma`
    years) falls in each band. A band's own share stays above one half, and shrinks only near its edges: at bounds
    (30, 60) and sigma 2, a 59-year-old is 0.60 30-59 and 0.40 >=60, a 45-year-old 30-59 alone."""
    from scipy.special import ndtr  # the normal CDF

    ages = np.asarray(ages, dtype=np.float64)
    if sigma <= 0:
        bands = np.asarray([age_band(int(a), bounds) for a in ages], dtype=np.int64)
        return np.eye(3, dtype=np.float32)[bands].reshape(len(ages), 3)
    below = ndtr((np.asarray(bounds, dtype=np.float64)[None, :] - (ages[:, None] + 0.5)) / sigma)  # P(age < bound)
    cumulative = np.concatenate([np.zeros((len(ages), 1)), below, np.ones((len(ages), 1))], axis=1)
    return np.diff(cumulative, axis=1).astype(np.float32)


def age_names(bounds: Sequence[int] = DEFAULT_AGE_BOUNDS) -> tuple[str, str, str]:
    """The names of the three age bands, e.g. ('<30', '30-59', '>=60')."""
    return (f"<{bounds[0]}", f"{bounds[0]}-{bounds[1] - 1}", f">={bounds[1]}")


def encode(mask: Any, gender: Any, age: Any) -> Any:
    """18-class label from mask (0-2), gender (0-1) and age band (0-2); works on ints and arrays."""
    return mask * 6 + gender * 3 + age


def decode(label: Any) -> tuple[Any, Any, Any]:
    """(mask, gender, age band) of an 18-class label; works on ints and arrays."""
    return label // 6, (label // 3) % 2, label % 3


def model_kwargs() -> dict[str, Any]:
    """The keyword arguments of `model.build_model` that come from the labels: `tasks`, the heads of a multi-head
    model (model.py imports nothing from the project, so it is told). Training and inference both build their
    models with it, so a run's model is rebuilt as it was trained."""
    return {"tasks": dict(TASKS)}


def mask_class_names(bounds: Sequence[int] = DEFAULT_AGE_BOUNDS) -> list[str]:
    """The 18 class names, e.g. 'wear/female/<30', in label order."""
    names = []
    for label in range(18):
        m, g, a = decode(label)
        names.append(f"{MASK_NAMES[m]}/{GENDER_NAMES[g]}/{age_names(bounds)[a]}")
    return names


def parse_profile(name: str) -> tuple[str, int, str, int]:
    """(id, gender, race, age) of a person folder `{id}_{gender}_{race}_{age}`; ValueError saying why not."""
    parts = name.split("_")
    if len(parts) != 4:
        raise ValueError("expected {id}_{gender}_{race}_{age}")
    pid, gender, race, age = parts
    if gender.lower() not in GENDERS:
        raise ValueError(f"gender '{gender}' is not male or female")
    if not age.isdigit():
        raise ValueError(f"age '{age}' is not a whole number")
    return pid, GENDERS[gender.lower()], race, int(age)


# ---------------------------------------------------------------------------------------------------
# Values a fix file may write; each parser raises ValueError saying what is allowed.
def parse_gender(value: str) -> int:
    if value.lower() not in GENDERS:
        raise ValueError(f"gender '{value}' is not male or female")
    return GENDERS[value.lower()]


def parse_age(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"age '{value}' is not a whole number of years")
    return int(value)


def parse_mask(value: str) -> int:
    """wear / incorrect / normal (or 'not wear'), or a shot's name: mask1..mask5, incorrect_mask, normal."""
    name = value.lower()
    if name in MASK_FILES:
        return MASK_FILES[name]
    if name in MASK_NAMES:
        return MASK_NAMES.index(name)
    raise ValueError(f"mask '{value}' is not wear, incorrect or normal (or mask1..mask5, incorrect_mask)")


def class_parser(class_names: Sequence[str]) -> Callable[[str], int]:
    """A parser of class names (exact, as the folders or label column spell them) into class ids."""
    ids = {name: i for i, name in enumerate(class_names)}

    def parse(value: str) -> int:
        if value not in ids:
            raise ValueError(f"class '{value}' is not one of {utils.listing(list(class_names), 10)}")
        return ids[value]

    return parse


# ---------------------------------------------------------------------------------------------------
# Label fixes.
FIX_COLUMNS = ("id", "field", "value")


@dataclass(frozen=True)
class LabelFix:
    """One row of a label-fix file."""

    row: int  # the row a spreadsheet shows: the file's line number (header, comments and blank lines count)
    key: str  # person/group id or image path, as written
    field: str  # lower case
    value: str  # as written, stripped


@dataclass
class FixableField:
    """A per-image label that a fix file may set."""

    values: list[Any]  # one per image, changed in place
    parse: Callable[[str], Any]  # written value -> stored value; ValueError saying what is allowed
    show: Callable[[Any], str] = str  # stored value -> how the report writes it
    per_image: bool = False  # only by image path: e.g. a person has all three mask values


def look_alike_classes(names: Sequence[str]) -> list[list[str]]:
    """Groups of class names that differ only in case, spacing or leading zeros ('Cat', 'cat'; '7', '07'): most
    often one class written two ways, which would train as two."""
    groups: dict[str, list[str]] = {}
    for name in names:
        key = " ".join(str(name).split()).casefold()
        key = str(int(key)) if key.lstrip("+-").isdigit() else key
        groups.setdefault(key, []).append(str(name))
    return [g for g in groups.values() if len(g) > 1]


def read_label_fixes(path: str | os.PathLike) -> list[LabelFix]:
    """The rows of a label-fix file; a `UserError` naming the row when one is not id,field,value."""
    name = f"--label_fixes {path}"
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark before the header.
        with open(path, newline="", encoding="utf-8-sig") as f:
            records = []
            reader = csv.reader(f)
            start = 1
            for cells in reader:
                records.append((start, [c.strip() for c in cells]))
                start = reader.line_num + 1  # a quoted value may span lines
    except FileNotFoundError:
        raise UserError(f"{name} does not exist: pass a CSV with the columns id,field,value") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(
            f"{name} cannot be read ({utils.reason(e)}): save it as a UTF-8 CSV with the columns id,field,value"
        ) from None
    records = [(row, cells) for row, cells in records if any(cells) and not cells[0].startswith("#")]
    if not records:
        raise UserError(f"{name} is empty: give a header id,field,value and one row per fix")
    header_row, header = records[0]
    header = [h.lower() for h in header]
    if not set(FIX_COLUMNS) <= set(header):
        raise UserError(
            f"{name} row {header_row}: the header must name the columns id,field,value (found {','.join(header)})"
        )
    where = [header.index(c) for c in FIX_COLUMNS]
    fixes = []
    for row, cells in records[1:]:
        values = [cells[i] if i < len(cells) else "" for i in where]
        for column, value in zip(FIX_COLUMNS, values, strict=True):
            if not value:
                raise UserError(f"{name} row {row}: no {column}; write id,field,value or delete the row")
        fixes.append(LabelFix(row, values[0], values[1].lower(), values[2]))
    if not fixes:
        raise UserError(
            f"{name} has a header and no fixes: add one id,field,value row per fix, or train without --label_fixes"
        )
    return fixes


class FixTargets:
    """Which images a row of a fix file names: a person/group id, an image path, or a folder of images."""

    def __init__(
        self, image_paths: Sequence[Path], root: Path, ids: Sequence[str] | None, id_noun: str, no_ids_hint: str
    ) -> None:
        self.image_paths, self.root, self.ids = image_paths, root, ids
        self.id_noun, self.no_ids_hint = id_noun, no_ids_hint
        self.by_id: dict[str, list[int]] = {}
        for i, key in enumerate(ids or ()):
            self.by_id.setdefault(key, []).append(i)
        self.real: dict[str, int] = {}  # real path -> index of every image, made once and only if a row names a path

    def select(self, fix: LabelFix, where: str) -> tuple[list[int], bool]:
        """Indices of the images a row names, and whether it named one image by its path."""
        if fix.key in self.by_id:
            return self.by_id[fix.key], False
        if not self.real:
            self.real.update((os.path.realpath(p), i) for i, p in enumerate(self.image_paths))
        root = self.root
        target = os.path.realpath(Path(fix.key) if Path(fix.key).is_absolute() else root / fix.key)
        if target in self.real:
            return [self.real[target]], True
        inside = [i for p, i in self.real.items() if p.startswith(target + os.sep)]
        if inside:
            return inside, False
        if "/" in fix.key or os.sep in fix.key or Path(fix.key).suffix:
            raise UserError(
                f"{where}: {fix.key} names no image of the data set in {root}; give a path relative to that folder "
                "or an absolute one, or delete the row"
            )
        if self.ids is None:
            raise UserError(
                f"{where}: {fix.key} is not an image under {root}, and the images have no {self.id_noun} ids "
                f"({self.no_ids_hint}); give the image's path or delete the row"
            )
        padded = [k for k in self.by_id if k.isdigit() and fix.key.isdigit() and int(k) == int(fix.key)]
        hint = f" (did you mean {padded[0]}? a spreadsheet may have dropped its leading zeros)" if padded else ""
        raise UserError(
            f"{where}: id {fix.key} is not a {self.id_noun} in {root}{hint}; correct the id or delete the row"
        )


def plan_fixes(
    fixes: Sequence[LabelFix], fields: dict[str, FixableField], targets: FixTargets, name: str
) -> list[tuple[LabelFix, list[int], Any]]:
    """Every row checked before anything changes, so a bad file leaves the labels as they were: (row, the
    images it names, the parsed value)."""
    plan: list[tuple[LabelFix, list[int], Any]] = []
    seen: dict[tuple[str, str], LabelFix] = {}
    for fix in fixes:
        where = f"{name} row {fix.row}"
        if fix.field not in fields:
            raise UserError(
                f"{where}: field '{fix.field}' cannot be fixed; use one of {', '.join(fields)} or delete the row"
            )
        rule = fields[fix.field]
        indices, one_image = targets.select(fix, where)
        if rule.per_image and not one_image:
            raise UserError(
                f"{where}: {fix.field} is a label of one image, not of {fix.key}: give the image's path "
                f"(relative to {targets.root}) instead"
            )
        try:
            value = rule.parse(fix.value)
        except ValueError as e:
            raise UserError(f"{where}: {e}; correct the value or delete the row") from None
        earlier = seen.setdefault((fix.key, fix.field), fix)
        if earlier is not fix and rule.parse(earlier.value) != value:
            raise UserError(
                f"{where}: {fix.key} {fix.field} is set to {earlier.value} on row {earlier.row} already; "
                "keep one of the two rows"
            )
        plan.append((fix, indices, value))
    return plan


def apply_label_fixes(
    path: str | os.PathLike,
    fields: dict[str, FixableField],
    image_paths: Sequence[Path],
    root: Path,
    ids: Sequence[str] | None = None,
    id_noun: str = "person",
    no_ids_hint: str = "",
) -> dict[str, Any]:
    """Check every row of the fix file at `path`, then set the fields' values in place; returns the report.

    `ids` is the person/group id of every image (None: images can be named by path only, `no_ids_hint` says
    how to give them ids). Nothing changes unless every row is valid. Rows apply in file order; the same id
    (or path) and field twice with different values is an error. Prints one line with the counts; the report
    (file, rows, images_changed, groups_changed, changes as [id or path, field, old, new]) is for config.json.
    """
    fixes = read_label_fixes(path)
    targets = FixTargets(image_paths, root, ids, id_noun, no_ids_hint)
    plan = plan_fixes(fixes, fields, targets, f"--label_fixes {path}")
    before = {f: list(rule.values) for f, rule in fields.items()}
    changes = []
    for fix, indices, value in plan:
        values = fields[fix.field].values
        old = [values[i] for i in indices if values[i] != value]
        for i in indices:
            values[i] = value
        if old:
            show = fields[fix.field].show
            changes.append([fix.key, fix.field, "|".join(dict.fromkeys(show(v) for v in old)), show(value)])
    changed = [i for i in range(len(image_paths)) if any(before[f][i] != r.values[i] for f, r in fields.items())]
    groups = len({ids[i] for i in changed}) if ids is not None else None
    counts = f" ({groups} {id_noun}s)" if groups is not None else ""
    print(f"Label fixes from {path}: {len(fixes)} row(s), {len(changed)} image label(s) changed{counts}")
    return {
        "file": str(path),
        "rows": len(fixes),
        "images_changed": len(changed),
        "groups_changed": groups,
        "changes": changes,
    }
