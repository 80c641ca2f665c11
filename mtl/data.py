"""Data tables: read the competition layout and external partial-label tables into one sample table.

A sample table is a pandas DataFrame with one row per photo and the columns in SAMPLE_COLUMNS:
`image_path` (absolute), `person_id`, `photo` (file stem, e.g. 'mask3'), `mask`, `gender`, `age`
(years), `source` ('train', 'extra:<file>', 'eval'). A label the sample does not carry is
labels.UNKNOWN (-1). Age groups are not stored: they follow from `age` and the threshold
(labels.age_group), so the threshold can change without touching the data.

Problems with the input (a missing column, a person folder with missing or extra photos, an
unreadable or tiny photo, an implausible age, a path leading out of the data set) are collected as
`Problem`s and raised together as one DataError naming every offending file, before any training
starts; `skip_bad=True` drops the bad photos instead.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mtl import labels
from mtl.errors import DataError

TRAIN_COLUMNS = ("id", "gender", "race", "age", "path")
EVAL_COLUMNS = ("ImageID",)
RELABEL_COLUMNS = ("id",)            # plus at least one of gender, age
EXTRA_COLUMNS = ("path", "mask", "gender", "age")
SAMPLE_COLUMNS = ("image_path", "person_id", "photo", "mask", "gender", "age", "source")
FACE_CROP_RECORD = "face_crop.json"  # written by data_tools.crop_faces next to train/ and eval/
# NOTE: the youngest and oldest plausible age; 0 because UTKFace (a usual extra data set) labels babies 0
PLAUSIBLE_AGES = (0, 120)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: the file (or folder) and what is wrong with it."""
    path: str
    reason: str

    def __str__(self):
        return f"{self.path}: {self.reason}"


def format_problems(problems, what="problem", limit=50) -> str:
    """A summary line followed by one indented line per problem (at most `limit`)."""
    lines = [f"{len(problems)} {what if len(problems) == 1 else plural(what)} found:"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def plural(what: str) -> str:
    """'bad row in train.csv' -> 'bad rows in train.csv', 'unreadable photo' -> 'unreadable photos'."""
    words = what.split(" ")
    at = next((i for i, w in enumerate(words) if i and w in ("in", "with", "of", "from")), len(words))
    words[at - 1] += "s"
    return " ".join(words)


def raise_or_skip(problems, skip_bad: bool, log=print, what="bad input"):
    """Raise a DataError listing every problem, or (skip_bad) log how many were skipped."""
    if not problems:
        return
    if not skip_bad:
        raise DataError(format_problems(problems, what) + "\nFix them, or rerun with --skip-bad to leave them out.")
    log(f"--skip-bad: skipping {len(problems)} {what}(s); first: {problems[0]}")


def is_ignored(name: str) -> bool:
    """macOS resource forks, Jupyter checkpoints and hidden files are not photos."""
    return name.startswith("._") or name.startswith(".") or name == ".ipynb_checkpoints"


def read_csv_checked(path: Path, required, what: str) -> pd.DataFrame:
    """Read a CSV as strings, or raise a DataError naming the file and any missing column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({str(exc).strip().splitlines()[0]})") from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(expected {','.join(required)}; found {','.join(table.columns)})")
    return table


def _parse_int(value, path, row, column, problems, allow_unknown=False):
    text = str(value).strip()
    if allow_unknown and text in ("", "-1"):
        return labels.UNKNOWN
    if re.fullmatch(r"-?\d+", text) is None or (int(text) < 0):
        problems.append(Problem(f"{path} row {row}", f"column {column} must be a whole number >= 0, got {value!r}"))
        return labels.UNKNOWN
    return int(text)


def age_error(age) -> str | None:
    """Why an age (years) cannot be a person's, or None; UNKNOWN (-1) is not an age and passes."""
    low, high = PLAUSIBLE_AGES
    if age != labels.UNKNOWN and not low <= age <= high:
        return f"age {age} is outside the plausible range {low}..{high}"
    return None


def _parse_gender(value, path, row, problems, allow_unknown=False):
    text = str(value).strip().lower()
    if text in labels.GENDER_CODE:
        return labels.GENDER_CODE[text]
    if text in ("0", "1"):
        return int(text)
    if allow_unknown and text in ("", "-1", "unknown"):
        return labels.UNKNOWN
    problems.append(Problem(f"{path} row {row}", f"column gender must be male or female, got {value!r}"))
    return labels.UNKNOWN


def read_people(data_root) -> pd.DataFrame:
    """DATA/train/train.csv -> one row per person: id, gender (0/1), race, age (int), path."""
    csv_path = Path(data_root) / "train" / "train.csv"
    table = read_csv_checked(csv_path, TRAIN_COLUMNS, "train.csv")
    problems = []
    genders = [_parse_gender(v, csv_path, i + 2, problems) for i, v in enumerate(table["gender"])]
    ages = [_parse_int(v, csv_path, i + 2, "age", problems) for i, v in enumerate(table["age"])]
    dup = table["path"][table["path"].duplicated()]
    problems += [Problem(str(csv_path), f"folder {p!r} is listed more than once") for p in dup]
    if problems:
        raise DataError(format_problems(problems, "bad row in train.csv"))
    people = pd.DataFrame({"id": table["id"].str.strip(), "gender": genders, "race": table["race"],
                           "age": ages, "path": table["path"].str.strip()})
    return people


def apply_relabel(people: pd.DataFrame, relabel_csv, log=print) -> pd.DataFrame:
    """Apply an `id,gender,age` fix table (either label column may be blank) and log each change."""
    relabel_csv = Path(relabel_csv)
    table = read_csv_checked(relabel_csv, RELABEL_COLUMNS, "relabel CSV")
    if "gender" not in table.columns and "age" not in table.columns:
        raise DataError(f"{relabel_csv}: needs a gender or an age column besides id")
    people = people.copy()
    index = {pid: i for i, pid in enumerate(people["id"])}
    problems, changes = [], []
    for row, fix in enumerate(table.to_dict("records"), start=2):
        pid = str(fix["id"]).strip()
        if pid not in index:
            problems.append(Problem(f"{relabel_csv} row {row}", f"id {pid!r} is not in train.csv"))
            continue
        i = index[pid]
        for column in ("gender", "age"):
            text = str(fix.get(column, "")).strip()
            if not text:
                continue
            value = (_parse_gender(text, relabel_csv, row, problems) if column == "gender"
                     else _parse_int(text, relabel_csv, row, column, problems))
            if column == "age" and age_error(value):
                problems.append(Problem(f"{relabel_csv} row {row}", age_error(value)))
                continue
            old = int(people.at[i, column])
            if value != labels.UNKNOWN and value != old:
                people.at[i, column] = value
                changes.append(f"{pid} {column} {old}->{value}")
    if problems:
        raise DataError(format_problems(problems, "bad row in the relabel CSV"))
    log(f"relabel: {len(changes)} change(s) from {relabel_csv.name}" + (f": {'; '.join(changes[:20])}"
                                                                         + (" ..." if len(changes) > 20 else "")
                                                                         if changes else ""))
    return people


def inside(folder, name: str, real_folder=None) -> Path | None:
    """folder/name when name is a relative path that stays inside folder (no '..', no link out of it), else None.

    real_folder is os.path.realpath(folder), when the caller has it already.
    """
    rel = Path(name)
    if not name.strip() or rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    path = Path(folder) / rel
    if len(rel.parts) == 1 and not os.path.islink(path):  # NOTE: a plain entry of folder: no realpath needed
        return path
    real_folder = real_folder or os.path.realpath(folder)
    return path if Path(os.path.realpath(path)).is_relative_to(real_folder) else None


def scan_person(folder: Path, real_root=None):
    """Photos of one person folder -> ({stem: path}, [Problem]) for missing, extra or doubled photos (and, given
    real_root, photos that are links to files outside it)."""
    photos, problems = {}, []
    if not folder.is_dir():
        return photos, [Problem(str(folder), "person folder listed in train.csv does not exist")]
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_ignored(entry.name):
            continue
        stem, ext = os.path.splitext(entry.name)
        if not entry.is_file() or stem not in labels.PHOTO_MASK or ext.lower() not in labels.IMAGE_EXTENSIONS:
            problems.append(Problem(entry.path, "extra file (expected only mask1..mask5, incorrect_mask, normal "
                                                "with .jpg/.jpeg/.png)"))
        elif stem in photos:
            problems.append(Problem(entry.path, f"second photo for {stem} (also {Path(photos[stem]).name})"))
        elif real_root and entry.is_symlink() and not Path(os.path.realpath(entry.path)).is_relative_to(real_root):
            problems.append(Problem(entry.path, f"links to {os.path.realpath(entry.path)}, outside {real_root}"))
            photos[stem] = None
        else:
            photos[stem] = entry.path
    problems += [Problem(str(folder / stem), "photo missing") for stem in labels.PHOTO_STEMS if stem not in photos]
    return {stem: path for stem, path in photos.items() if path is not None}, problems


def train_samples(data_root, relabel_csv=None, log=print):
    """Read DATA/train into (sample table, [Problem]); the problems are the layout's, not yet the pixels'.

    A person whose age is implausible or whose folder lies outside train/images is a problem, as is a photo
    that links outside it: nothing outside the data set is read.
    """
    root = Path(data_root).resolve()
    people = read_people(root)
    if relabel_csv:
        people = apply_relabel(people, relabel_csv, log=log)
    rows, problems = [], []
    csv_path, images = root / "train" / "train.csv", root / "train" / "images"
    real_images = os.path.realpath(images)
    for row, person in enumerate(people.itertuples(index=False), start=2):
        folder = inside(images, person.path, real_images)
        if age_error(person.age) or folder is None:
            problems.append(Problem(f"{csv_path} row {row}", age_error(person.age) or
                                    f"path {person.path!r} does not name a folder inside {images}"))
            continue
        photos, person_problems = scan_person(folder, real_images)
        problems += person_problems
        for stem, path in photos.items():
            rows.append((path, person.id, stem, labels.PHOTO_MASK[stem], person.gender, person.age, "train"))
    return sample_table(rows), problems


def sample_table(rows) -> pd.DataFrame:
    """Rows of SAMPLE_COLUMNS tuples -> a sample table with integer label columns."""
    table = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))
    for column in ("mask", "gender", "age"):
        table[column] = table[column].astype(np.int64)
    return table


def read_eval(data_root) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """DATA/eval/info.csv -> (info as read, sample table of the listed photos that exist, [Problem] for each
    listed photo that is missing, each ImageID that does not name a file inside eval/images (an absolute path,
    '..', a link out) and each ImageID listed twice)."""
    root = Path(data_root).resolve()
    info_path = root / "eval" / "info.csv"
    info = read_csv_checked(info_path, EVAL_COLUMNS, "eval info.csv")
    image_dir = root / "eval" / "images"
    real_dir = os.path.realpath(image_dir)
    ids = info["ImageID"].str.strip()
    rows, problems = [], []
    for row, image_id in enumerate(ids, start=2):
        path = inside(image_dir, image_id, real_dir)
        if path is None:
            problems.append(Problem(f"{info_path} row {row}",
                                    f"ImageID {image_id!r} does not name a file inside {image_dir}"))
        elif not path.is_file():
            problems.append(Problem(str(path), "listed in info.csv but not found"))
        else:
            rows.append((str(path), image_id, "eval", labels.UNKNOWN, labels.UNKNOWN, labels.UNKNOWN, "eval"))
    problems += [Problem(str(info_path), f"ImageID {i!r} is listed more than once") for i in ids[ids.duplicated()]]
    return info, sample_table(rows), problems


def eval_samples(data_root) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DATA/eval/info.csv -> (info table as read, sample table in info.csv order); missing photos raise, all named."""
    info, samples, problems = read_eval(data_root)
    if problems:
        raise DataError(format_problems(problems, "problem with the eval photos"))
    return info, samples


def read_extra(csv_path) -> pd.DataFrame:
    """An external partial-label table (path,mask,gender,age[,person_id]) -> sample table.

    Paths are absolute or relative to the CSV's folder; a blank or -1 label is UNKNOWN. This is
    the format data_tools.import_faces and data_tools.pseudo_label write.
    """
    csv_path = Path(csv_path).resolve()
    table = read_csv_checked(csv_path, EXTRA_COLUMNS, "extra-data CSV")
    problems, rows = [], []
    for row, rec in enumerate(table.to_dict("records"), start=2):
        path = Path(rec["path"])
        path = path if path.is_absolute() else csv_path.parent / path
        mask = _parse_int(rec["mask"], csv_path, row, "mask", problems, allow_unknown=True)
        if mask >= labels.NUM_CLASSES["mask"]:
            problems.append(Problem(f"{csv_path} row {row}", f"mask must be 0, 1, 2 or -1, got {mask}"))
        gender = _parse_gender(rec["gender"], csv_path, row, problems, allow_unknown=True)
        age = _parse_int(rec["age"], csv_path, row, "age", problems, allow_unknown=True)
        if age_error(age):
            problems.append(Problem(f"{csv_path} row {row}", age_error(age)))
        if not path.is_file():
            problems.append(Problem(str(path), f"listed in {csv_path.name} row {row} but not found"))
        person = str(rec.get("person_id") or f"{csv_path.stem}:{row}")
        rows.append((str(path), person, Path(path).stem, mask, gender, age, f"extra:{csv_path.name}"))
    if problems:
        raise DataError(format_problems(problems, "bad row in the extra-data CSV"))
    return sample_table(rows)


def _inside(path, folder) -> bool:
    """Whether path lies in folder, without following symbolic links (linked photos stay relative)."""
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def write_extra(samples: pd.DataFrame, csv_path) -> Path:
    """Write a partial-label table (paths relative to the CSV's folder when inside it), atomically."""
    from mtl.io import atomic_write_csv
    csv_path = Path(csv_path).resolve()
    out = pd.DataFrame({
        "path": [os.path.relpath(p, csv_path.parent) if _inside(p, csv_path.parent) else p
                 for p in samples["image_path"]],
        "mask": samples["mask"].astype(int), "gender": samples["gender"].astype(int),
        "age": samples["age"].astype(int), "person_id": samples["person_id"]})
    return atomic_write_csv(out, csv_path)


# the face_crop.json keys that decide what a crop looks like (not e.g. the facenet-pytorch version)
FACE_CROP_SETTINGS = ("detector", "choice", "margin", "size", "min_face", "detect_max_side", "fallback",
                      "fallback_centre", "fallback_side", "pad")


def read_face_crop_record(data_root) -> dict | None:
    """The crop settings data_tools.crop_faces recorded for DATA, or None for uncropped data."""
    import json
    record = Path(data_root) / FACE_CROP_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def same_face_crop(a: dict | None, b: dict | None) -> bool:
    """Whether two face_crop.json records (or None: uncropped) describe the same crop."""
    if a is None or b is None:
        return a is None and b is None
    return all(a.get(k) == b.get(k) for k in FACE_CROP_SETTINGS)
