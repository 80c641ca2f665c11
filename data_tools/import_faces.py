"""Bring external face photos that carry only some labels into an "extra" table training can add.

Teams of the competition added outside photos, above all for the rare 60+ group. Outside sets rarely
carry all three labels: UTKFace file names (`<age>_<gender>_<race>_<date>.jpg`, gender 0 male, 1 female)
give age and gender but no mask state; a folder-per-mask-class set (wear/, incorrect/, not_wear/ or
the aliases in MASK_FOLDERS) gives the mask state only. This command writes OUT/extra.csv (columns
path,mask,gender,age,person_id; -1 = unknown, see mtl.data.read_extra), and training adds it with
`train_multitask.py --extra OUT/extra.csv`; a task whose label is unknown leaves that photo out of its
loss. Photos are referenced where they are (absolute paths) unless --copy or --link puts them under
OUT/images/. A model trained on face crops (data_tools.crop_faces) should get its extra photos cropped the
same way: --crop-like DATA_faces crops each photo to the face with the settings DATA_faces/face_crop.json
records and writes the crops under OUT/images/ (and that record to OUT/face_crop.json). Every photo is
decoded once first: an unreadable one stops the import, naming it, unless --skip-bad. Run it as

    python -m data_tools.import_faces UTKFace/ extra/utk60 --format utkface --min-age 60
    python -m data_tools.import_faces facemask/ extra/masks --format folder --copy
    python -m data_tools.import_faces facemask/ extra/masks --format folder --crop-like data_faces
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mtl import data, labels
from mtl.cli import ArgumentParser, main_guard
from mtl.data import Problem
from mtl.errors import ConfigError, DataError
from mtl.images import check_images

FORMATS = ("utkface", "folder")
MASK_FOLDERS = {"wear": 0, "with_mask": 0, "mask": 0,
                "incorrect": 1, "mask_weared_incorrect": 1, "incorrect_mask": 1,
                "not_wear": 2, "without_mask": 2, "normal": 2}
MASK_NAMES = {"wear": 0, "incorrect": 1, "not_wear": 2}
UTKFACE_NAME = re.compile(r"^(\d{1,3})_([01])_")  # NOTE: only age and gender are needed; a few names lack race
EXTRA_FILE = "extra.csv"
WRITTEN = {"copy": "copied", "link": "linked", "crop": "face-cropped"}  # how the photos got under OUT/images/


# ---------------------------------------------------------------- reading a source
def image_files(folder: Path) -> list[Path]:
    """Every photo (.jpg/.jpeg/.png) under a folder, sorted; hidden files and resource forks left out."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not data.is_ignored(d))
        found += [Path(parent) / f for f in sorted(files)
                  if not data.is_ignored(f) and Path(f).suffix.lower() in labels.IMAGE_EXTENSIONS]
    return found


def folder_key(name: str) -> str:
    """A class folder's name as looked up in MASK_FOLDERS: 'Not wear', 'with-mask' -> 'not_wear', 'with_mask'."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def read_utkface(src: Path) -> tuple[list, list]:
    """UTKFace photos -> (rows of (path, person_id, mask, gender, age), [Problem] for names that do not parse)."""
    rows, problems = [], []
    for path in image_files(src):
        match = UTKFACE_NAME.match(path.name)
        if match is None:
            problems.append(Problem(str(path), "name does not start with <age>_<gender 0|1>_ (UTKFace: "
                                               "age_gender_race_date.jpg)"))
            continue
        rows.append((str(path), f"utkface:{path.name.split('.')[0]}", labels.UNKNOWN, int(match.group(2)),
                     int(match.group(1))))
    return rows, problems


def read_folders(src: Path) -> tuple[list, list]:
    """Folder-per-mask-class photos -> (rows, [Problem]); an unknown class folder is an error naming it."""
    classes = sorted(e for e in src.iterdir() if e.is_dir() and not data.is_ignored(e.name))
    unknown = [e.name for e in classes if folder_key(e.name) not in MASK_FOLDERS]
    if unknown:
        raise DataError(f"{src}: unknown mask-class folder(s) {', '.join(repr(u) for u in unknown)}; a folder "
                        f"must be named one of {', '.join(MASK_FOLDERS)} (case, spaces and '-' do not matter)")
    if not classes:
        raise DataError(f"{src} holds no mask-class folders (expected e.g. wear/, incorrect/, not_wear/)")
    rows = []
    for folder in classes:
        mask = MASK_FOLDERS[folder_key(folder.name)]
        for path in image_files(folder):
            person = f"{src.name}:{path.relative_to(src).with_suffix('').as_posix()}"
            rows.append((str(path), person, mask, labels.UNKNOWN, labels.UNKNOWN))
    loose = [p for p in image_files(src) if p.parent == src]
    return rows, [Problem(str(p), "photo outside a mask-class folder (no label)") for p in loose]


# ---------------------------------------------------------------- placing photos
def place(path: Path, src: Path, out: Path, how: str) -> Path:
    """The photo's path in the table: in place, or copied / symlinked to OUT/images/<path under SRC>."""
    if how == "in place":
        return Path(os.path.abspath(path))
    target = out / "images" / path.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    if how == "copy":
        shutil.copyfile(path, tmp)
    else:
        os.symlink(path.resolve(), tmp)
    os.replace(tmp, target)  # NOTE: a kill leaves no half photo under its real name
    return Path(os.path.abspath(target))  # NOTE: not resolve(), which would follow a --link back to SRC


def crop_like_record(photos: list, src: Path, out: Path, record: dict, device, workers, progress, log) -> list:
    """Face-crop photos into OUT/images/<path under SRC> as `record` says; write the record to OUT; the crops' paths."""
    from data_tools.crop_faces import crop_photos
    from mtl.face_crop import detector_for
    from mtl.io import atomic_write_text
    targets = [out / "images" / Path(p).relative_to(src) for p in photos]
    crops = crop_photos(photos, targets, detector_for(record, device), record, workers, progress)
    fallbacks = [p for p, crop in zip(photos, crops) if crop.fallback]
    log(f"face-cropped {len(photos)} photos like {data.FACE_CROP_RECORD} says ({record['size'][0]}x"
        f"{record['size'][1]}, margin {record['margin']})"
        + (f"; no face found in {len(fallbacks)}, cropped around the usual place (e.g. {fallbacks[0]})"
           if fallbacks else ""))
    atomic_write_text(json.dumps(record, indent=2), out / data.FACE_CROP_RECORD)
    return [os.path.abspath(t) for t in targets]


def label_counts(samples: pd.DataFrame, schema: labels.LabelSchema | None = None) -> dict:
    """{task: {class name: photos, 'unknown': photos}} of a sample table."""
    schema = schema or labels.LabelSchema()
    groups = schema.group(samples["age"].to_numpy()) if len(samples) else np.zeros(0, int)
    values = {"mask": samples["mask"].to_numpy(), "gender": samples["gender"].to_numpy(), "age": groups}
    counts = {}
    for task, v in values.items():
        names = schema.class_names[task]
        counts[task] = {name: int((v == k).sum()) for k, name in enumerate(names)}
        counts[task]["unknown"] = int((v < 0).sum())
    return counts


def import_faces(src, out, fmt, how="in place", limit=None, min_age=None, max_age=None, assume_mask=None,
                 skip_bad=False, overwrite=False, seed=0, workers=2, progress=True, crop_like=None, device="auto",
                 log=print) -> pd.DataFrame:
    """Read SRC in a format, check every photo (face-crop it like `crop_like`), write OUT/extra.csv.

    Returns the sample table written.
    """
    src, out = Path(src), Path(out)
    record = None
    if crop_like is not None:
        if how != "in place":
            raise ConfigError(f"--crop-like writes face crops under OUT/images/; it cannot go with --{how}")
        record = data.read_face_crop_record(crop_like)
        if record is None:
            raise ConfigError(f"--crop-like {crop_like}: no {data.FACE_CROP_RECORD} there; crop that data set "
                              "with data_tools.crop_faces first, or leave --crop-like out")
        how = "crop"
    if not src.is_dir():
        raise DataError(f"SRC folder not found: {src}")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "folder" and (min_age is not None or max_age is not None or assume_mask is not None):
        raise ConfigError("--min-age, --max-age and --assume-mask are for --format utkface (folders carry the "
                          "mask label only)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {out} is a file, not a folder")
    if (out / EXTRA_FILE).exists() and not overwrite:
        raise ConfigError(f"{out / EXTRA_FILE} exists; pass --overwrite to replace it, or choose another OUT")
    if how != "in place" and out.resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"OUT {out} is inside SRC {src}: the photos written there would be imported again next time")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")

    rows, problems = read_utkface(src) if fmt == "utkface" else read_folders(src)
    data.raise_or_skip(problems, skip_bad, log, "bad file name" if fmt == "utkface" else "unlabelled photo")
    table = pd.DataFrame(rows, columns=["image_path", "person_id", "mask", "gender", "age"])
    if min_age is not None:
        table = table[table["age"] >= min_age]
    if max_age is not None:
        table = table[table["age"] <= max_age]
    if assume_mask is not None:
        table = table.assign(mask=MASK_NAMES[assume_mask])
    if limit is not None and limit < len(table):
        # NOTE: a random subset (sorted names run by age, so the first N would all be alike)
        keep = np.sort(np.random.default_rng(seed).choice(len(table), size=limit, replace=False))
        table = table.iloc[keep]
    if table.empty:
        raise DataError(f"no photos to import from {src} (format {fmt}"
                        + (f", ages {min_age or 0}..{max_age or 'any'}" if fmt == "utkface" else "") + ")")
    bad = check_images(table["image_path"], workers=workers, progress=progress, desc="checking photos")
    data.raise_or_skip(bad, skip_bad, log, "unreadable photo")
    table = table[~table["image_path"].isin({p.path for p in bad})]

    out.mkdir(parents=True, exist_ok=True)
    if record is not None:
        paths = crop_like_record(table["image_path"].tolist(), src, out, record, device, workers, progress, log)
    else:
        paths = [str(place(Path(p), src, out, how)) for p in table["image_path"]]
    samples = data.sample_table([(path, person, Path(path).stem, m, g, a, f"extra:{EXTRA_FILE}")
                                 for path, (person, m, g, a) in
                                 zip(paths, table[["person_id", "mask", "gender", "age"]].itertuples(index=False))])
    data.write_extra(samples, out / EXTRA_FILE)
    return samples


def summary(samples: pd.DataFrame, out: Path, how: str, data_folder="DATA") -> str:
    """What was imported, per label, and how to train with it (on `data_folder`)."""
    counts = label_counts(samples)
    lines = [f"imported {len(samples)} photos into {out / EXTRA_FILE} "
             f"({'referenced in place' if how == 'in place' else WRITTEN[how] + ' under ' + str(out / 'images')})"]
    for task, per_class in counts.items():
        known = ", ".join(f"{name} {n}" for name, n in per_class.items())
        lines.append(f"  {task + ':':8s}{known}" + (f" (age threshold {labels.DEFAULT_AGE_THRESHOLD})"
                                                     if task == "age" else ""))
    lines.append(f"train with: python train_multitask.py --data {data_folder} --extra {out / EXTRA_FILE}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m data_tools.import_faces", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="folder of outside photos (searched recursively)")
    parser.add_argument("out", metavar="OUT", help="folder to write extra.csv (and images/ with --copy/--link) into")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="utkface: labels from <age>_<gender>_<race>_<date>.jpg names (age, gender; mask "
                             "unknown); folder: one sub-folder per mask class (mask only; "
                             f"names: {', '.join(MASK_FOLDERS)})")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--copy", dest="how", action="store_const", const="copy",
                       help="copy the photos to OUT/images/ (OUT is then self-contained)")
    where.add_argument("--link", dest="how", action="store_const", const="link",
                       help="symlink the photos from OUT/images/ (SRC must stay where it is)")
    where.add_argument("--crop-like", metavar="DATA_FACES",
                       help="face-crop each photo as this data set was cropped (its face_crop.json, made by "
                            "data_tools.crop_faces) and write the crops under OUT/images/")
    parser.set_defaults(how="in place")
    pick = parser.add_argument_group("which photos and labels")
    pick.add_argument("--min-age", type=int, help="utkface: only people this old or older (e.g. 18, or 60 for "
                                                  "the rare 60+ group)")
    pick.add_argument("--max-age", type=int, help="utkface: only people this old or younger")
    pick.add_argument("--limit", type=int, help="import at most N photos, a random subset (see --seed)")
    pick.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    pick.add_argument("--assume-mask", choices=tuple(MASK_NAMES),
                      help="utkface: label every photo with this mask state (UTKFace faces are bare: not_wear); "
                           "default: mask unknown")
    run = parser.add_argument_group("run")
    run.add_argument("--skip-bad", action="store_true",
                     help="leave out unreadable photos and unusable names instead of stopping")
    run.add_argument("--overwrite", action="store_true", help="replace an existing OUT/extra.csv")
    run.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                     help="processes decoding photos to check them (default: CPU count, at most 4)")
    run.add_argument("--device", default="auto", help="--crop-like: where the face detector runs (default auto)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    samples = import_faces(args.src, args.out, args.format, args.how, args.limit, args.min_age, args.max_age,
                           args.assume_mask, args.skip_bad, args.overwrite, args.seed, args.workers, args.progress,
                           args.crop_like, args.device)
    print(summary(samples, Path(args.out), "crop" if args.crop_like else args.how, args.crop_like or "DATA"))
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
