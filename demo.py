"""The demo data set: small, synthetic and deterministic, in exactly the competition layout.

    python -c "import demo; demo.make_demo_data('data/demo')"
    python train.py          # with no data configured, generates data/demo once and trains on it

The mask covers nose and mouth (wear), only mouth and chin (incorrect) or nothing (not wear); hair is
short for men and long for women; hair gets lighter with age (dark below 30, grey, white from 60), so a
small model learns every task in a few epochs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

import settings
from labels import GENDER_NAMES, MASK_FILES, age_band, encode
from utils import UserError

DEMO_SIZE = (512, 384)  # (H, W) of the competition's portrait photos
_MASK_COLORS = [(236, 236, 236), (150, 190, 230), (40, 40, 45), (230, 160, 185), (90, 150, 90)]


def _draw_photo(
    person: dict[str, Any], mask_style: int | None, mask_kind: int, rng: np.random.Generator, noise: float = 6.0
) -> Image.Image:
    """One 384x512 photo of `person`; mask_kind 0 wear, 1 incorrect, 2 none; `noise`: std of the per-pixel noise."""
    H, W = DEMO_SIZE
    image = Image.new("RGB", (W, H), person["background"])
    draw = ImageDraw.Draw(image)
    cx = person["cx"] + rng.integers(-12, 13)
    cy = person["cy"] + rng.integers(-12, 13)
    rx, ry = person["rx"], person["ry"]
    draw.rectangle([0, H - 70, W, H], fill=person["stripe"])  # floor/background variation
    draw.ellipse([cx - 1.6 * rx, cy + ry - 10, cx + 1.6 * rx, cy + 3.5 * ry], fill=person["shirt"])  # shoulders
    hair = person["hair"]
    if person["gender"] == 1:  # long hair behind the face, down to the shoulders
        draw.rounded_rectangle([cx - 1.25 * rx, cy - 1.15 * ry, cx + 1.25 * rx, cy + 1.3 * ry], radius=60, fill=hair)
    draw.rectangle([cx - 0.35 * rx, cy + 0.8 * ry, cx + 0.35 * rx, cy + 1.2 * ry], fill=person["skin"])  # neck
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=person["skin"])
    if person["gender"] == 0:  # short hair: a cap on top of the head
        draw.chord([cx - 1.05 * rx, cy - 1.12 * ry, cx + 1.05 * rx, cy + 0.1 * ry], 180, 360, fill=hair)
    else:  # fringe
        draw.chord([cx - 1.05 * rx, cy - 1.12 * ry, cx + 1.05 * rx, cy - 0.2 * ry], 180, 360, fill=hair)
    for side in (-1, 1):  # eyes
        ex, ey = cx + side * 0.38 * rx, cy - 0.12 * ry
        draw.ellipse([ex - 11, ey - 7, ex + 11, ey + 7], fill=(250, 250, 250))
        draw.ellipse([ex - 5, ey - 5, ex + 5, ey + 5], fill=(35, 30, 30))
    for k in range(person["wrinkles"]):  # forehead lines come with age
        y = cy - 0.38 * ry + 9 * k
        draw.line([cx - 0.35 * rx, y, cx + 0.35 * rx, y], fill=tuple(int(c * 0.7) for c in person["skin"]), width=3)
    nose = tuple(int(c * 0.8) for c in person["skin"])
    draw.polygon([(cx, cy + 0.02 * ry), (cx - 0.13 * rx, cy + 0.3 * ry), (cx + 0.13 * rx, cy + 0.3 * ry)], fill=nose)
    draw.ellipse([cx - 0.25 * rx, cy + 0.48 * ry, cx + 0.25 * rx, cy + 0.62 * ry], fill=(175, 60, 70))  # mouth
    if mask_kind < 2:
        top = cy + (0.0 if mask_kind == 0 else 0.4) * ry
        color = _MASK_COLORS[mask_style]
        draw.rounded_rectangle([cx - 0.92 * rx, top, cx + 0.92 * rx, cy + 0.95 * ry], radius=25, fill=color)
        if mask_style == 4:  # a patterned mask
            for x in range(int(cx - 0.8 * rx), int(cx + 0.8 * rx), 18):
                draw.line([x, top + 8, x, cy + 0.85 * ry], fill=(60, 110, 60), width=4)
        for side in (-1, 1):  # ear straps
            draw.line([cx + side * 0.9 * rx, top + 10, cx + side * 1.02 * rx, cy - 0.05 * ry], fill=color, width=4)
    gain = rng.uniform(0.85, 1.15)  # lighting differs between photos
    array = np.asarray(image, dtype=np.float32) * gain + rng.normal(0, noise, (H, W, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _random_person(rng: np.random.Generator) -> dict[str, Any]:
    H, W = DEMO_SIZE
    gender = int(rng.random() < 0.6)  # the competition has more women than men
    band = int(rng.choice(3, p=[0.45, 0.42, 0.13]))  # and few people over 60
    age = int(rng.integers(18, 30)) if band == 0 else int(rng.integers(30, 60)) if band == 1 else 60
    # Hair lightness grows with age, with spread, so the age bands overlap a little near 30 and 60.
    light = float(np.clip(35 + (age - 18) * 4.4 + rng.normal(0, 12), 15, 240))
    tint = rng.uniform(0.75, 0.95) if age < 60 else 0.97
    skin_base = rng.uniform(0.55, 1.0)
    return {
        "gender": gender,
        "age": age,
        "hair": (int(light), int(light * tint), int(light * tint * tint)),
        "wrinkles": 0 if age < 30 else 2 if age < 60 else 4,
        "skin": (int(235 * skin_base), int(190 * skin_base), int(160 * skin_base)),
        "background": tuple(int(v) for v in rng.integers(60, 230, 3)),
        "stripe": tuple(int(v) for v in rng.integers(40, 200, 3)),
        "shirt": tuple(int(v) for v in rng.integers(20, 235, 3)),
        "cx": W // 2 + int(rng.integers(-20, 21)),
        "cy": int(H * 0.42) + int(rng.integers(-20, 21)),
        "rx": int(rng.integers(82, 100)),
        "ry": int(rng.integers(108, 126)),
    }


def _person_photos(person: dict[str, Any], rng: np.random.Generator, noise: float) -> dict[str, Image.Image]:
    """The seven shots of one person, by file stem."""
    incorrect_style = int(rng.integers(0, 5))
    photos = {f"mask{i + 1}": _draw_photo(person, i, 0, rng, noise) for i in range(5)}
    photos["incorrect_mask"] = _draw_photo(person, incorrect_style, 1, rng, noise)
    photos["normal"] = _draw_photo(person, None, 2, rng, noise)
    return photos


def make_demo_data(
    root: str | os.PathLike, n_train: int = 150, n_eval: int = 40, seed: int = 0, noise: float = 6.0
) -> Path:
    """Write the demo data set to `root` (train/images, train/train.csv, eval/images, eval/info.csv and
    eval/truth.csv with the true classes) and return `root`. Deterministic for a seed.

    `noise` is the std of independent per-pixel noise (0-255 scale). The default 6 gives 44 KiB JPEGs; 1.5
    gives 16 KiB, the size of the real 384x512 face photos at hand, whose decoding is cheaper (bench_data.py).

    Built in a temporary directory and renamed into place, so an interrupted run never leaves half a set.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        rng = np.random.default_rng(seed)
        rows = []
        (tmp / "train/images").mkdir(parents=True)
        for i in range(n_train):
            person = _random_person(rng)
            folder = f"{i + 1:06d}_{GENDER_NAMES[person['gender']]}_Asian_{person['age']}"
            (tmp / "train/images" / folder).mkdir()
            for stem, photo in _person_photos(person, rng, noise).items():
                photo.save(tmp / "train/images" / folder / f"{stem}.jpg", quality=90)
            rows.append(
                {
                    "id": f"{i + 1:06d}",
                    "gender": GENDER_NAMES[person["gender"]],
                    "race": "Asian",
                    "age": person["age"],
                    "path": folder,
                }
            )
        pd.DataFrame(rows).to_csv(tmp / "train/train.csv", index=False)

        (tmp / "eval/images").mkdir(parents=True)
        truth = []
        for i in range(n_eval):
            person = _random_person(rng)
            for stem, photo in _person_photos(person, rng, noise).items():
                name = hashlib.sha1(f"demo-{seed}-{i}-{stem}".encode()).hexdigest() + ".jpg"
                photo.save(tmp / "eval/images" / name, quality=90)
                truth.append((name, encode(MASK_FILES[stem], person["gender"], age_band(person["age"]))))
        order = rng.permutation(len(truth))  # the competition's eval images come in no particular order
        truth = pd.DataFrame([truth[i] for i in order], columns=["ImageID", "ans"])
        truth.assign(ans=0).to_csv(tmp / "eval/info.csv", index=False)
        truth.to_csv(tmp / "eval/truth.csv", index=False)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


DEMO_DIR = Path("data/demo")


def ensure_demo_data(root: str | os.PathLike = DEMO_DIR) -> Path:
    """The demo data set at `root`, generated once (with a message saying where) if it is not there yet."""
    root = Path(root)
    if not (root / "train/images").is_dir():
        print(f"No data directory configured: generating the demo data set in {root} (once, ~30 s)", flush=True)
        make_demo_data(root)
    return root


DEFAULT_TRAIN_DIR = "/opt/ml/input/data/train/images"  # the competition server's layout


def resolve_train_dir(data_dir: str | None, files_ok: bool = False) -> Path:
    """The configured training folder (flag or $SM_CHANNEL_TRAIN), else the competition server's, else the demo
    data (generated once). train.py and eda.ipynb both find their data here. `files_ok`: a file (a CSV of
    labels) is a valid answer too."""
    if data_dir:
        if files_ok and Path(data_dir).is_file():
            return Path(data_dir)
        if not Path(data_dir).is_dir():
            problem = settings.missing(data_dir, folder=True)
            given = settings.given("--data_dir", data_dir, "SM_CHANNEL_TRAIN")
            raise UserError(f"{given} {problem}: pass the folder of person folders (train/images)")
        return Path(data_dir)
    if Path(DEFAULT_TRAIN_DIR).is_dir():
        return Path(DEFAULT_TRAIN_DIR)
    return ensure_demo_data() / "train/images"
