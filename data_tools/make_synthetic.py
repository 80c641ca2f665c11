"""Write a synthetic data set in the competition layout: drawn people whose labels can be seen in the photo.

Each synthetic person is a procedurally drawn face (skin, eyes, nose, mouth, hair, ears, shoulders) on a varied
background, photographed seven times: ``mask1``..``mask5`` with a mask over nose and mouth, ``incorrect_mask``
with the mask pulled below the nose or down onto the chin, ``normal`` without one. Every photo has its own
placement, scale, rotation, lighting, colour cast, noise and sometimes blur; the person's skin tone, hair colour
and style and face shape stay the same across their seven photos. Gender shows in hair length (long for most
women), brow thickness, stubble, eyeliner, lipstick and earrings, with about 8% of people atypical (short-haired
women, long-haired men); age shows in hair greyness and wrinkles, both continuous in age so that people near the
60 boundary are genuinely ambiguous. The label mix follows the real data (ages 18..60 with only ~8% at 60, ~60%
female, ~70% Asian). Train people go to ``train/`` (``train.csv`` + ``images/<path>/``), other people to
``eval/`` (``info.csv`` + ``images/<hex>.jpg``) with their true labels in ``eval_truth.csv``. The same
arguments give byte-identical files (``--workers`` only changes the speed). Run it as

    python -m data_tools.make_synthetic --out data/synthetic --people 800 --seed 0
    python -m data_tools.make_synthetic --out /tmp/tiny --people 40 --seed 1 --size 96 128 --quiet
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from mtl import labels
from mtl.cli import ArgumentParser
from mtl.errors import ConfigError, MTLError

RACES = ("Asian", "White", "Black", "Other")
RACE_P = (0.70, 0.20, 0.05, 0.05)
FEMALE_P = 0.60
AGE_GROUP_P = (0.45, 0.47, 0.08)  # 18..29, 30..59, exactly 60 (the real data tops out at 60)
EXTENSIONS = (".jpg", ".jpeg", ".png")
EXTENSION_P = (0.80, 0.10, 0.10)
# NOTE: the atypical share: 10% of women have short hair, 5% of men long hair -> ~8% of all people
ATYPICAL_HAIR_P = {"female": 0.10, "male": 0.05}
DEFAULT_SIZE = (384, 512)
MIN_SIDE = 32
WORK_WIDTH = 192  # photos are drawn at this width, then resized to --size
TRAIN_SPLIT, EVAL_SPLIT, LABEL_STREAM, ID_STREAM = 1, 2, 3, 4

SKIN = {"Asian": (226, 192, 160), "White": (236, 203, 182), "Black": (118, 80, 58), "Other": (178, 132, 98)}
HAIR = {"Asian": ((28, 24, 24), (45, 34, 28), (62, 44, 32)),
        "White": ((96, 66, 42), (196, 166, 112), (62, 44, 32), (132, 62, 36), (40, 32, 28)),
        "Black": ((24, 20, 20), (36, 28, 24)),
        "Other": ((30, 25, 24), (58, 40, 30), (90, 62, 40))}
LIPSTICK = ((178, 40, 58), (200, 80, 100), (150, 30, 40), (214, 110, 120))
MASK_COLOURS = ((236, 238, 240), (150, 196, 226), (32, 32, 36), (110, 112, 118), (38, 48, 84),
                (232, 150, 176), (80, 120, 90), (196, 210, 120))


@dataclass(frozen=True)
class Person:
    """One synthetic person: the labels and the identity features shared by their seven photos."""
    person_id: str
    gender: str
    race: str
    age: int
    ext: str
    skin: tuple
    hair: tuple
    hair_style: str        # "short" or "long"
    hair_length: float     # how far long hair falls below the chin, in face heights
    hair_volume: float
    bangs: bool
    recedes: bool
    grey_offset: float
    face_aspect: float     # face height / face width
    brow_width: float      # in face widths
    stubble: float         # 0 for none, else the shading's opacity 0..1
    lipstick: tuple | None
    earrings: bool
    eyeliner: bool
    glasses: bool
    iris: tuple

    @property
    def path(self) -> str:
        """The folder name in train/images, as in the real data: id_gender_race_age."""
        return f"{self.person_id}_{self.gender}_{self.race}_{self.age}"

    @property
    def gender_code(self) -> int:
        """Gender task label (male=0, female=1)."""
        return labels.GENDER_CODE[self.gender]


@dataclass(frozen=True)
class View:
    """The nuisance of one photo: placement, scale, rotation, background, mask look, lighting and noise."""
    cx: float              # face centre, fraction of the width
    cy: float              # face centre, fraction of the height
    face_frac: float       # face width / photo width
    angle: float           # degrees, anticlockwise
    bg_top: tuple
    bg_bottom: tuple
    bg_shapes: tuple       # ((x0, y0, x1, y1) as fractions, colour), ...
    shirt: tuple
    mask_colour: tuple
    mask_colour2: tuple
    mask_pattern: str      # "plain", "pleats", "stripes" or "dots"
    mask_period: float
    strap: tuple
    chin_only: bool        # an incorrect mask on the chin only (mouth visible), else over mouth and chin
    brightness: float
    contrast: float
    cast: tuple
    light_slope: float
    noise_sigma: float
    blur: float            # Gaussian blur radius at the working size, 0 for none
    noise_seed: int


def sample_ages(n: int, rng: np.random.Generator) -> np.ndarray:
    """Ages 18..60 skewed like the real data: ~45% below 30, ~47% from 30 to 59, ~8% exactly 60."""
    group = rng.choice(3, size=n, p=AGE_GROUP_P)
    young = np.where(rng.random(n) < 0.7, rng.integers(18, 25, n), rng.integers(25, 30, n))
    middle = np.where(rng.random(n) < 0.5, rng.integers(30, 50, n), rng.integers(50, 60, n))
    return np.select([group == 0, group == 1], [young, middle], 60).astype(np.int64)


def _jitter_colour(rng: np.random.Generator, colour, spread: float) -> tuple:
    """A colour with each channel moved by up to +-spread, clipped to 0..255."""
    return tuple(int(v) for v in np.clip(np.asarray(colour) + rng.uniform(-spread, spread, 3), 0, 255))


def sample_people(n: int, rng: np.random.Generator, first_id: int = 1) -> list[Person]:
    """Draw n people: labels with the real data's mix, then identity features that show the labels."""
    ages = sample_ages(n, rng)
    people = []
    for i in range(n):
        gender = "female" if rng.random() < FEMALE_P else "male"
        race = RACES[rng.choice(len(RACES), p=RACE_P)]
        ext = EXTENSIONS[rng.choice(len(EXTENSIONS), p=EXTENSION_P)]
        # skin tone loosely follows the race label: 15% of people take another race's palette
        tone_race = race if rng.random() > 0.15 else RACES[rng.integers(len(RACES))]
        skin = _jitter_colour(rng, SKIN[tone_race], 14)
        palette = HAIR[tone_race]
        hair = _jitter_colour(rng, palette[rng.integers(len(palette))], 8)
        female = gender == "female"
        long_hair = female != (rng.random() < ATYPICAL_HAIR_P[gender])
        people.append(Person(
            person_id=f"{first_id + i:06d}", gender=gender, race=race, age=int(ages[i]), ext=ext,
            skin=skin, hair=hair, hair_style="long" if long_hair else "short",
            hair_length=float(rng.uniform(0.25, 0.8) if female else rng.uniform(0.1, 0.4)),
            hair_volume=float(rng.uniform(0.6, 1.4)),
            bangs=bool(long_hair and rng.random() < 0.3),
            recedes=bool(not female and rng.random() < 0.6),
            grey_offset=float(rng.normal(0.0, 0.05)),
            face_aspect=float(rng.uniform(1.22, 1.36) if female else rng.uniform(1.16, 1.32)),
            brow_width=float(rng.uniform(0.014, 0.026) if female else rng.uniform(0.04, 0.06)),
            stubble=float(rng.uniform(0.3, 0.6)) if not female and rng.random() < 0.45 else 0.0,
            lipstick=LIPSTICK[rng.integers(len(LIPSTICK))] if female and rng.random() < 0.5 else None,
            earrings=bool(female and rng.random() < 0.4),
            eyeliner=bool(female and rng.random() < 0.7),
            glasses=bool(rng.random() < 0.12),
            iris=_jitter_colour(rng, (60, 42, 30) if race != "White" else (70, 90, 110), 20)))
    return people


def sample_view(rng: np.random.Generator) -> View:
    """Draw the nuisance of one photo; every field is drawn whatever the photo's mask state."""
    shapes = []
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(-0.2, 0.9, 2)
        w, h = rng.uniform(0.1, 0.6, 2)
        shapes.append(((float(x0), float(y0), float(x0 + w), float(y0 + h)), _jitter_colour(rng, (128,) * 3, 110)))
    return View(
        cx=float(np.clip(rng.normal(0.5, 0.05), 0.38, 0.62)),
        cy=float(np.clip(rng.normal(0.47, 0.04), 0.38, 0.56)),
        face_frac=float(rng.uniform(0.35, 0.6)),
        angle=float(np.clip(rng.normal(0.0, 5.0), -12.0, 12.0)),
        bg_top=_jitter_colour(rng, (128,) * 3, 120), bg_bottom=_jitter_colour(rng, (128,) * 3, 120),
        bg_shapes=tuple(shapes),
        shirt=_jitter_colour(rng, (128,) * 3, 125),
        mask_colour=_jitter_colour(rng, MASK_COLOURS[rng.integers(len(MASK_COLOURS))], 12),
        mask_colour2=_jitter_colour(rng, (128,) * 3, 125),
        mask_pattern=("plain", "pleats", "stripes", "dots")[rng.choice(4, p=(0.4, 0.3, 0.15, 0.15))],
        mask_period=float(rng.uniform(0.05, 0.12)),
        strap=_jitter_colour(rng, (235, 235, 235), 20) if rng.random() < 0.6 else _jitter_colour(rng, (40,) * 3, 30),
        chin_only=bool(rng.random() < 0.3),
        brightness=float(rng.uniform(0.72, 1.22)),
        contrast=float(rng.uniform(0.75, 1.2)),
        cast=tuple(float(c) for c in rng.normal(1.0, 0.05, 3)),
        light_slope=float(rng.uniform(-0.35, 0.35)),
        noise_sigma=float(rng.uniform(1.5, 9.0)),
        blur=float(rng.uniform(0.5, 1.6)) if rng.random() < 0.25 else 0.0,
        noise_seed=int(rng.integers(2 ** 31)))


def work_size(size) -> tuple[int, int]:
    """The drawing size for a photo size: WORK_WIDTH wide with the photo's aspect ratio."""
    return WORK_WIDTH, max(MIN_SIDE, round(WORK_WIDTH * size[1] / size[0]))


def face_box(person: Person, view: View, size) -> tuple[float, float, float, float]:
    """The face ellipse's box (x0, y0, x1, y1) in photo pixels, before rotation."""
    w, h = work_size(size)
    fw = view.face_frac * w
    fh = fw * person.face_aspect
    cx, cy = view.cx * w, view.cy * h
    sx, sy = size[0] / w, size[1] / h
    return (cx - fw / 2) * sx, (cy - fh / 2) * sy, (cx + fw / 2) * sx, (cy + fh / 2) * sy


def grey_fraction(age: float) -> float:
    """Share of grey strands in the hair: none below ~28, salt-and-pepper through the 40s-50s, all at 60."""
    return float(np.clip((age - 28) / 32, 0.0, 1.0))


def _grey_level(age: float) -> float:
    """Brightness of the grey strands: mid grey in the 30s-40s, turning white towards 60."""
    return 140.0 + 100.0 * float(np.clip((age - 40) / 20, 0.0, 1.0))


def _hair_texture(person: Person, shape, rng: np.random.Generator) -> Image.Image:
    """Hair of the person's colour with grey strands, their share a continuous function of age."""
    h, w = shape
    f = float(np.clip(grey_fraction(person.age) + person.grey_offset, 0.0, 1.0))
    level = _grey_level(person.age)
    rows = h // 5 + 1  # strands are 5 pixels long: draw one row per strand, then repeat it
    shade = rng.uniform(0.8, 1.2, (rows, w, 1)).astype(np.float32)
    grey = rng.random((rows, w, 1), dtype=np.float32) < f
    hair = np.where(grey, level * (0.9 + 0.2 * shade), np.asarray(person.hair, np.float32) * shade)
    hair = hair * (1 - 0.35 * f) + level * 0.35 * f
    return Image.fromarray(np.repeat(np.clip(hair, 0, 255).astype(np.uint8), 5, axis=0)[:h])


def _scale(colour, factor) -> tuple:
    """A colour times a factor (or per-channel factors), clipped to 0..255."""
    return tuple(int(v) for v in np.clip(np.asarray(colour, np.float32) * factor, 0, 255))


def _mask_polygon(cx, cy, fw, fh, y_top, depth, peak) -> list[tuple[float, float]]:
    """The part of a slightly enlarged face ellipse below y_top, with a peak over the nose bridge."""
    a, b = 0.54 * fw, depth * fh
    c = float(np.clip((y_top - cy) / b, -0.99, 0.99))
    t_max = math.acos(c)
    pts = [(cx + a * math.sin(t), cy + b * math.cos(t)) for t in np.linspace(-t_max, t_max, 25)]
    return pts + [(cx, y_top - peak * fh)]


def _draw_mask(layer: Image.Image, stem: str, view: View, geo: dict) -> None:
    """Draw a mask for the photo's stem: over nose and mouth (mask1..5), too low (incorrect_mask)."""
    cx, cy, fw, fh, y0 = geo["cx"], geo["cy"], geo["fw"], geo["fh"], geo["y0"]
    if stem == "incorrect_mask":
        y_top = geo["mouth_y"] + 0.055 * fh if view.chin_only else geo["nose_y"] + 0.065 * fh
        pts = _mask_polygon(cx, cy, fw, fh, y_top, 0.64 if view.chin_only else 0.58, 0.01)
    else:
        pts = _mask_polygon(cx, cy, fw, fh, geo["eye_y"] + 0.1 * fh, 0.54, 0.05)
    w, h = layer.size
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    period = max(3.0, view.mask_period * fw)
    cloth = np.empty((h, w, 3), np.float32)
    cloth[:] = view.mask_colour
    if view.mask_pattern == "stripes":
        cloth[((xx + yy) / period) % 2 < 1] = view.mask_colour2
    elif view.mask_pattern == "dots":
        dots = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 4) ** 2
        cloth[dots] = view.mask_colour2
    cloth *= (1.0 - 0.25 * np.clip((yy - pts[0][1] + 0.3 * fh) / fh, 0, 1))[:, :, None]  # darker lower down
    cloth_img = Image.fromarray(np.clip(cloth, 0, 255).astype(np.uint8))
    dc = ImageDraw.Draw(cloth_img)
    if view.mask_pattern == "pleats":
        top = min(p[1] for p in pts)
        for k in (1, 2, 3):
            y = top + k * 0.09 * fh
            dc.line([(0, y), (w, y)], fill=_scale(view.mask_colour, 0.72), width=max(1, round(0.02 * fw)))
    shape = Image.new("L", layer.size, 0)
    ImageDraw.Draw(shape).polygon(pts, fill=255)
    layer.paste(cloth_img, (0, 0), shape)
    draw = ImageDraw.Draw(layer)
    draw.line(pts + [pts[0]], fill=_scale(view.mask_colour, 0.6) + (255,), width=max(1, round(0.012 * fw)))
    strap_w = max(1, round(0.024 * fw))
    ear_top, ear_bottom = y0 + 0.42 * fh, y0 + 0.6 * fh
    for side, (top_pt, mid_pt) in ((-1, (pts[0], pts[6])), (1, (pts[24], pts[18]))):
        ear_x = cx + side * 0.5 * fw
        draw.line([top_pt, (ear_x, ear_top)], fill=view.strap + (255,), width=strap_w)
        draw.line([mid_pt, (ear_x, ear_bottom)], fill=view.strap + (255,), width=strap_w)


def _face_geometry(person: Person, view: View, shape) -> dict:
    """Where the face sits at the working size: centre, size, box (x0, y0, x1, y1), eye, nose and mouth heights."""
    h, w = shape
    fw = view.face_frac * w
    fh = fw * person.face_aspect
    cx, cy = view.cx * w, view.cy * h
    x0, y0, x1, y1 = cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2
    return dict(w=w, h=h, cx=cx, cy=cy, fw=fw, fh=fh, x0=x0, y0=y0, x1=x1, y1=y1, eye_y=y0 + 0.45 * fh,
                nose_y=y0 + 0.66 * fh, mouth_y=y0 + 0.8 * fh)


def _draw_shoulders_and_back_hair(layer, person: Person, view: View, g: dict, hair_img) -> None:
    """Shoulders, then hair behind the head: to the ears when short, over the shoulders when long."""
    cx, fw, fh, x0, y0, x1, y1, vol = g["cx"], g["fw"], g["fh"], g["x0"], g["y0"], g["x1"], g["y1"], person.hair_volume
    ImageDraw.Draw(layer).ellipse((cx - 1.2 * fw, y1 + 0.28 * fh, cx + 1.2 * fw, y1 + 1.9 * fh), fill=view.shirt)
    back = Image.new("L", (g["w"], g["h"]), 0)
    db = ImageDraw.Draw(back)
    if person.hair_style == "long":
        db.ellipse((x0 - 0.14 * fw, y0 - 0.12 * vol * fh, x1 + 0.14 * fw, y0 + 0.8 * fh), fill=255)
        db.rectangle((x0, y0 + 0.5 * fh, x1, y1 + 0.2 * fh), fill=255)  # behind the neck
        for lock_x0 in (x0 - 0.17 * fw, x1 - 0.13 * fw):  # a lock on each side, over the shoulders
            db.rounded_rectangle((lock_x0, y0 + 0.3 * fh, lock_x0 + 0.3 * fw, y1 + person.hair_length * fh),
                                 radius=0.1 * fw, fill=255)
    else:
        db.ellipse((x0 - 0.07 * fw, y0 - 0.09 * vol * fh, x1 + 0.07 * fw, y0 + 0.6 * fh), fill=255)
    layer.paste(hair_img, (0, 0), back)


def _draw_head(draw, person: Person, g: dict) -> None:
    """Neck, ears (hidden by long hair), face."""
    cx, cy, fw, fh, x0, y0, x1, y1 = (g[k] for k in ("cx", "cy", "fw", "fh", "x0", "y0", "x1", "y1"))
    skin = person.skin
    draw.rectangle((cx - 0.21 * fw, cy + 0.2 * fh, cx + 0.21 * fw, y1 + 0.34 * fh), fill=_scale(skin, 0.88))
    if person.hair_style != "long":
        for ex0 in (x0 - 0.07 * fw, x1 - 0.07 * fw):
            draw.ellipse((ex0, y0 + 0.4 * fh, ex0 + 0.14 * fw, y0 + 0.63 * fh), fill=_scale(skin, 0.92))
    draw.ellipse((x0, y0, x1, y1), fill=skin)


def _draw_stubble(layer, person: Person, g: dict, hair_img) -> None:
    """Stubble on the jaw: the hair's texture (greying with it) shown through at low opacity."""
    if person.stubble > 0:
        stubble = Image.new("L", (g["w"], g["h"]), 0)
        ds = ImageDraw.Draw(stubble)
        ds.ellipse((g["x0"], g["y0"], g["x1"], g["y1"]), fill=round(255 * person.stubble))
        ds.rectangle((0, 0, g["w"], g["y0"] + 0.7 * g["fh"]), fill=0)
        layer.paste(hair_img, (0, 0), stubble)


def _draw_wrinkles(draw, person: Person, g: dict) -> None:
    """Wrinkles from ~40 on, more and thicker with age: forehead, crow's feet, under the eyes, nose to mouth."""
    cx, fw, fh, y0, eye_y, nose_y, mouth_y = (g[k] for k in ("cx", "fw", "fh", "y0", "eye_y", "nose_y", "mouth_y"))
    wrinkle = float(np.clip((person.age - 38) / 22, 0.0, 1.0))
    if wrinkle <= 0:
        return
    line = _scale(person.skin, 0.78 - 0.22 * wrinkle) + (255,)
    width = max(1, round((0.01 + 0.016 * wrinkle) * fw))
    for k in range(1 + round(2.6 * wrinkle)):
        y = y0 + (0.3 - 0.045 * k) * fh
        draw.arc((cx - 0.26 * fw, y, cx + 0.26 * fw, y + 0.12 * fh), 200, 340, fill=line, width=width)
    for side in (-1, 1):
        ex = cx + side * 0.31 * fw
        for k in (-1, 0, 1):
            draw.line([(ex, eye_y + k * 0.02 * fh), (ex + side * 0.09 * fw, eye_y + k * 0.05 * fh)],
                      fill=line, width=width)
        draw.arc((cx + side * 0.2 * fw - 0.1 * fw, eye_y + 0.01 * fh, cx + side * 0.2 * fw + 0.1 * fw,
                  eye_y + 0.07 * fh), 20, 160, fill=line, width=width)
        if wrinkle > 0.3:
            draw.line([(cx + side * 0.1 * fw, nose_y), (cx + side * 0.2 * fw, mouth_y + 0.02 * fh)],
                      fill=line, width=width)


def _draw_nose_mouth_eyes(draw, person: Person, g: dict) -> None:
    """Nose and nostrils, lips (lipstick or the skin's red), eyes (eyeliner for some women)."""
    cx, fw, fh, eye_y, nose_y, mouth_y = (g[k] for k in ("cx", "fw", "fh", "eye_y", "nose_y", "mouth_y"))
    skin = person.skin
    draw.polygon([(cx, eye_y + 0.02 * fh), (cx - 0.1 * fw, nose_y + 0.01 * fh), (cx + 0.1 * fw, nose_y + 0.01 * fh)],
                 fill=_scale(skin, 0.72))
    for side in (-1, 1):
        nx = cx + side * 0.05 * fw
        draw.ellipse((nx - 0.035 * fw, nose_y - 0.015 * fh, nx + 0.035 * fw, nose_y + 0.015 * fh),
                     fill=_scale(skin, 0.35))
    lips = person.lipstick or _scale(skin, (0.85, 0.58, 0.58))
    draw.ellipse((cx - 0.17 * fw, mouth_y - 0.035 * fh, cx + 0.17 * fw, mouth_y + 0.035 * fh), fill=lips)
    draw.line([(cx - 0.16 * fw, mouth_y), (cx + 0.16 * fw, mouth_y)], fill=_scale(lips, 0.45),
              width=max(1, round(0.012 * fw)))
    for side in (-1, 1):
        ex = cx + side * 0.2 * fw
        draw.ellipse((ex - 0.09 * fw, eye_y - 0.04 * fw, ex + 0.09 * fw, eye_y + 0.04 * fw), fill=(240, 240, 235))
        draw.ellipse((ex - 0.04 * fw, eye_y - 0.04 * fw, ex + 0.04 * fw, eye_y + 0.04 * fw), fill=person.iris)
        draw.ellipse((ex - 0.015 * fw, eye_y - 0.015 * fw, ex + 0.015 * fw, eye_y + 0.015 * fw), fill=(10, 10, 10))
        if person.eyeliner:
            draw.arc((ex - 0.1 * fw, eye_y - 0.05 * fw, ex + 0.1 * fw, eye_y + 0.05 * fw), 190, 350,
                     fill=(20, 16, 16), width=max(1, round(0.03 * fw)))


def _draw_front_hair(layer, person: Person, g: dict, hair_img) -> None:
    """Hair over the face: the cap down to the hairline (higher for older men who recede), sides, bangs."""
    fw, fh, x0, y0, x1, y1, vol = g["fw"], g["fh"], g["x0"], g["y0"], g["x1"], g["y1"], person.hair_volume
    front = Image.new("L", (g["w"], g["h"]), 0)
    df = ImageDraw.Draw(front)
    hairline = 0.27 if person.bangs else 0.18
    if person.recedes:
        hairline -= 0.11 * float(np.clip((person.age - 35) / 25, 0.0, 1.0))
    df.ellipse((x0 - 0.03 * fw, y0 - 0.09 * vol * fh, x1 + 0.03 * fw, y1), fill=255)
    df.rectangle((0, y0 + hairline * fh, g["w"], g["h"]), fill=0)
    if person.hair_style == "long":  # strands falling over the sides of the face
        for sx0 in (x0 - 0.05 * fw, x1 - 0.07 * fw):
            df.rectangle((sx0, y0 + 0.1 * fh, sx0 + 0.12 * fw, y0 + 0.75 * fh), fill=255)
    else:  # sideburns
        for sx0 in (x0 - 0.02 * fw, x1 - 0.06 * fw):
            df.rectangle((sx0, y0 + 0.1 * fh, sx0 + 0.08 * fw, y0 + 0.42 * fh), fill=255)
    layer.paste(hair_img, (0, 0), front)


def _draw_brows(draw, person: Person, g: dict) -> None:
    """Brows: hair-coloured, greying more slowly; thick and straight for men, thin and arched for women."""
    cx, fw, fh, eye_y = g["cx"], g["fw"], g["fh"], g["eye_y"]
    brow_grey = 0.6 * grey_fraction(person.age)
    brow = _scale(np.asarray(person.hair) * (1 - brow_grey) + _grey_level(person.age) * brow_grey, 0.8)
    brow_w = max(1, round(person.brow_width * fw))
    for side in (-1, 1):
        ex = cx + side * 0.2 * fw
        if person.gender == "female":
            draw.arc((ex - 0.12 * fw, eye_y - 0.13 * fh, ex + 0.12 * fw, eye_y - 0.03 * fh), 200, 340,
                     fill=brow, width=brow_w)
        else:
            draw.line([(ex - side * 0.12 * fw, eye_y - 0.075 * fh), (ex + side * 0.11 * fw, eye_y - 0.09 * fh)],
                      fill=brow, width=brow_w)


def _draw_glasses_and_earrings(draw, person: Person, g: dict) -> None:
    """Glasses (two frames and a bridge) and earrings, for the people who wear them."""
    cx, fw, fh, x0, y0, x1, eye_y = (g[k] for k in ("cx", "fw", "fh", "x0", "y0", "x1", "eye_y"))
    if person.glasses:
        for side in (-1, 1):
            ex = cx + side * 0.2 * fw
            draw.rectangle((ex - 0.13 * fw, eye_y - 0.07 * fw, ex + 0.13 * fw, eye_y + 0.08 * fw),
                           outline=(30, 30, 30), width=max(1, round(0.015 * fw)))
        draw.line([(cx - 0.07 * fw, eye_y), (cx + 0.07 * fw, eye_y)], fill=(30, 30, 30),
                  width=max(1, round(0.015 * fw)))
    if person.earrings:
        for ex in (x0 - 0.01 * fw, x1 + 0.01 * fw):
            draw.ellipse((ex - 0.035 * fw, y0 + 0.63 * fh, ex + 0.035 * fw, y0 + 0.7 * fh), fill=(226, 190, 80))


def _draw_person(person: Person, stem: str, view: View, shape, rng: np.random.Generator) -> Image.Image:
    """The person on a transparent layer at the working size, upright, in the photo's mask state, back to front."""
    g = _face_geometry(person, view, shape)
    layer = Image.new("RGBA", (g["w"], g["h"]), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    hair_img = _hair_texture(person, shape, rng)
    _draw_shoulders_and_back_hair(layer, person, view, g, hair_img)
    _draw_head(draw, person, g)
    _draw_stubble(layer, person, g, hair_img)
    _draw_wrinkles(draw, person, g)
    _draw_nose_mouth_eyes(draw, person, g)
    _draw_front_hair(layer, person, g, hair_img)
    _draw_brows(draw, person, g)
    if stem != "normal":
        _draw_mask(layer, stem, view, g)
    _draw_glasses_and_earrings(draw, person, g)
    return layer


def draw_photo(person: Person, stem: str, view: View, size=DEFAULT_SIZE) -> Image.Image:
    """One RGB photo of the person in the mask state of the stem (a key of labels.PHOTO_MASK)."""
    if stem not in labels.PHOTO_MASK:
        raise ValueError(f"unknown photo stem {stem!r}; known: {', '.join(labels.PHOTO_STEMS)}")
    w, h = work_size(size)
    rng = np.random.default_rng(view.noise_seed)
    # 1. background: a gradient between two colours with a few blocks (doors, shelves, posters)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    bg = np.asarray(view.bg_top, np.float32) * (1 - t) + np.asarray(view.bg_bottom, np.float32) * t
    photo = Image.fromarray(np.repeat(bg.astype(np.uint8), w, axis=1))
    dp = ImageDraw.Draw(photo)
    for (bx0, by0, bx1, by1), colour in view.bg_shapes:
        dp.rectangle((bx0 * w, by0 * h, bx1 * w, by1 * h), fill=colour)
    # 2. the person, rotated about the face centre
    layer = _draw_person(person, stem, view, (h, w), rng)
    if view.angle:
        layer = layer.rotate(view.angle, resample=Image.BILINEAR, center=(view.cx * w, view.cy * h))
    photo.paste(layer, (0, 0), layer)
    # 3. lighting: contrast, brightness, colour cast, a light falling from one side; then sensor noise
    arr = np.asarray(photo, np.float32)
    mean = float(arr.mean())
    side_light = 1.0 + view.light_slope * np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :, None]
    gain = (view.brightness * np.asarray(view.cast, np.float32)) * side_light
    arr *= view.contrast * gain
    arr += mean * (1 - view.contrast) * gain
    arr += view.noise_sigma * _noise_crop((h, w), rng)
    photo = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if view.blur:
        photo = photo.filter(ImageFilter.GaussianBlur(view.blur))
    return photo.resize(tuple(size), Image.BILINEAR) if tuple(size) != (w, h) else photo


@functools.lru_cache(maxsize=4)
def _noise_bank(shape) -> np.ndarray:
    """Unit Gaussian noise a little larger than a photo; each photo takes a random crop (faster than drawing)."""
    h, w = shape
    return np.random.default_rng(0).standard_normal((h + 64, w + 64, 3), dtype=np.float32)


def _noise_crop(shape, rng: np.random.Generator) -> np.ndarray:
    """A photo-sized crop of the noise bank at a random offset."""
    h, w = shape
    oy, ox = rng.integers(0, 65, 2)
    return _noise_bank((h, w))[oy:oy + h, ox:ox + w]


def _photo_rng(seed: int, split: int, index: int, photo: int) -> np.random.Generator:
    """The generator of one photo's nuisance, independent of the order photos are made in."""
    return np.random.default_rng([seed, split, index, photo])


def _save(photo: Image.Image, path: Path) -> None:
    """Save a photo in the format its extension names, with fixed settings so bytes are reproducible."""
    if path.suffix == ".png":
        photo.save(path, format="PNG", compress_level=3)
    else:
        photo.save(path, format="JPEG", quality=90)


def _write_csv(path: Path, header, rows) -> None:
    """Write a CSV with '\\n' line ends whatever the platform."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _check(out: Path, people: int, eval_people: int, size, seed: int, overwrite: bool, workers: int) -> None:
    """Raise ConfigError for arguments that cannot make a data set, naming the command-line option."""
    if people < 1:
        raise ConfigError(f"--people must be at least 1, got {people}")
    if people + eval_people > 999_999:
        raise ConfigError("--people plus --eval-people must be at most 999999 (ids have six digits)")
    if eval_people < 0:
        raise ConfigError(f"--eval-people must be at least 0, got {eval_people}")
    if len(size) != 2 or min(size) < MIN_SIDE:
        raise ConfigError(f"--size must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {'x'.join(map(str, size))}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace its train/, eval/ and eval_truth.csv")


def _write_person(job) -> None:
    """Draw and save one person's photos: job = (seed, split, index, person, size, [(stem index, path), ...])."""
    seed, split, index, person, size, photos = job
    for k, path in photos:
        view = sample_view(_photo_rng(seed, split, index, k))
        _save(draw_photo(person, labels.PHOTO_STEMS[k], view, size), path)


def _eval_image_ids(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct sha1-like eval file names: 40 hex digits + '.jpg'."""
    image_ids, seen = [], set()
    while len(image_ids) < n:
        image_id = rng.bytes(20).hex() + ".jpg"
        if image_id not in seen:
            seen.add(image_id)
            image_ids.append(image_id)
    return image_ids


def make_synthetic(out, people: int, seed: int, eval_people: int | None = None, size=DEFAULT_SIZE,
                   progress: bool = True, overwrite: bool = False, workers: int = 1) -> Path:
    """Write a synthetic data set of `people` train and `eval_people` eval people under out; return out."""
    out = Path(out)
    eval_people = max(4, people // 4) if eval_people is None else int(eval_people)
    size = tuple(int(s) for s in size)
    _check(out, int(people), eval_people, size, int(seed), overwrite, int(workers))
    for stale in (out / "train", out / "eval"):
        shutil.rmtree(stale, ignore_errors=True)
    (out / "eval_truth.csv").unlink(missing_ok=True)
    train_images, eval_images = out / "train" / "images", out / "eval" / "images"
    train_images.mkdir(parents=True)
    eval_images.mkdir(parents=True)

    # 1. labels and identities for everyone; the first `people` are train, the rest eval
    everyone = sample_people(people + eval_people, np.random.default_rng([seed, LABEL_STREAM]))
    train, held_out = everyone[:people], everyone[people:]
    # 2. eval photos in a shuffled order under random hex names
    id_rng = np.random.default_rng([seed, ID_STREAM])
    n_stems = len(labels.PHOTO_STEMS)
    eval_photos = [(j, k) for j in range(len(held_out)) for k in range(n_stems)]
    eval_photos = [eval_photos[i] for i in id_rng.permutation(len(eval_photos))]
    image_ids = _eval_image_ids(len(eval_photos), id_rng)
    # 3. one job per person; every photo has its own generator, so the order and the workers do not matter
    jobs = []
    for i, person in enumerate(train):
        folder = train_images / person.path
        folder.mkdir()
        jobs.append((seed, TRAIN_SPLIT, i, person, size,
                     [(k, folder / f"{stem}{person.ext}") for k, stem in enumerate(labels.PHOTO_STEMS)]))
    eval_jobs = [(seed, EVAL_SPLIT, j, person, size, []) for j, person in enumerate(held_out)]
    for image_id, (j, k) in zip(image_ids, eval_photos):
        eval_jobs[j][-1].append((k, eval_images / image_id))
    jobs += eval_jobs
    with tqdm(total=len(jobs), desc="synthetic people", unit="person", disable=not progress) as bar:
        if workers > 1:
            with multiprocessing.Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_person, jobs, chunksize=4):
                    bar.update()
        else:
            for job in jobs:
                _write_person(job)
                bar.update()
    # 4. the CSVs
    _write_csv(out / "train" / "train.csv", ("id", "gender", "race", "age", "path"),
               [(p.person_id, p.gender, p.race, p.age, p.path) for p in train])
    truth = []
    for image_id, (j, k) in zip(image_ids, eval_photos):
        person, mask = held_out[j], labels.PHOTO_MASK[labels.PHOTO_STEMS[k]]
        ans = labels.encode(mask, person.gender_code, labels.age_group(person.age))
        truth.append((image_id, ans, mask, person.gender_code, person.age))
    _write_csv(out / "eval" / "info.csv", ("ImageID", "ans"), [(row[0], 0) for row in truth])
    _write_csv(out / "eval_truth.csv", ("ImageID", "ans", "mask", "gender", "age"), truth)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: where to write, how many people, which seed, what photo size."""
    parser = ArgumentParser(prog="python -m data_tools.make_synthetic",
                            description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data set")
    data.add_argument("--out", type=Path, required=True, help="folder to write train/, eval/, eval_truth.csv into")
    data.add_argument("--people", type=int, required=True, help="number of train people (seven photos each)")
    data.add_argument("--eval-people", type=int, default=None,
                      help="number of other people in eval/ (default: max(4, people // 4))")
    data.add_argument("--seed", type=int, default=0, help="random seed; the same arguments give the same bytes")
    data.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("W", "H"),
                      help="photo width and height in pixels (default: 384 512, as in the real data)")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="processes drawing photos in parallel (default: CPU count, at most 8); same bytes")
    run.add_argument("--overwrite", action="store_true",
                     help="replace train/, eval/ and eval_truth.csv in a non-empty --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return parser


def main(argv=None) -> int:
    """Parse the command line and write the data set; bad arguments exit 2 with a one-line message."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        out = make_synthetic(args.out, args.people, args.seed, args.eval_people, args.size,
                             progress=not args.quiet, overwrite=args.overwrite, workers=args.workers)
    except MTLError as err:
        parser.error(str(err))
    if not args.quiet:
        n_eval = max(4, args.people // 4) if args.eval_people is None else args.eval_people
        print(f"wrote {args.people} train people and {n_eval} eval people "
              f"({7 * (args.people + n_eval)} photos, {args.size[0]}x{args.size[1]}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
