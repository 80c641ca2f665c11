"""Day-one look at a data set in the competition layout: counts, ages, photo formats, duplicates, problems.

Reads DATA/train (train.csv + a folder of seven photos per person) and, when present, DATA/eval
(info.csv + photos) and DATA/eval_truth.csv, and writes a Markdown report with PNG plots: people and
photos per 18-class label and per task, the age histogram with the age threshold marked, a gender x
age table, photo sizes and formats, groups of byte-identical photos, and every problem the training
loader would reject (a missing or extra photo, an unreadable, truncated or tiny one, an implausible
age, a missing eval photo, a path that leads out of the data set), each by name; 16-bit PNGs and
unusual ages are listed as worth a look. Exits 1 when the loader would reject the data, 0 otherwise
(2 for unusable input, such as a missing train.csv). Nothing is written into DATA. Run it as

    python -m data_tools.report data/train_data                     # writes ./report_train_data/
    python -m data_tools.report DATA --out reports/day1 --age-threshold 59
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mtl import data, labels
from mtl.cli import ArgumentParser, main_guard
from mtl.data import Problem
from mtl.errors import DataError
from mtl.images import check_images
from mtl.io import atomic_write_text

EXIF_ORIENTATION = 0x0112
FORMAT_EXTENSIONS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",)}
PNG_SIGNATURE, PNG_BIT_DEPTH = b"\x89PNG\r\n\x1a\n", 24  # the IHDR's bit depth byte follows the width and height
LIST_LIMIT = 200  # NOTE: at most this many names per list in report.md; the summary says how many more


# ---------------------------------------------------------------- reading
def file_facts(path: str) -> dict:
    """sha1 of the bytes, bits per sample of a PNG, and the format, size and EXIF orientation from the header (no
    full decode)."""
    facts = {"path": path, "sha1": None, "format": None, "width": 0, "height": 0, "rotated": False, "bits": 8}
    try:
        with open(path, "rb") as f:
            content = f.read()
        facts["sha1"] = hashlib.sha1(content).hexdigest()
        if content.startswith(PNG_SIGNATURE) and len(content) > PNG_BIT_DEPTH:
            facts["bits"] = content[PNG_BIT_DEPTH]
        with Image.open(path) as im:
            facts.update(format=im.format, width=im.size[0], height=im.size[1],
                         rotated=im.getexif().get(EXIF_ORIENTATION, 1) not in (1, None))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        pass  # NOTE: check_images names the file; here it only has no format
    return facts


def scan_files(paths, workers=4, progress=True) -> pd.DataFrame:
    """file_facts for every path (threads), as a table in the order given."""
    paths = list(paths)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        rows = list(tqdm(pool.map(file_facts, paths), total=len(paths), desc="hashing photos", unit="img",
                         disable=not progress, dynamic_ncols=True))
    return pd.DataFrame(rows, columns=["path", "sha1", "format", "width", "height", "rotated", "bits"])


def read_eval(root: Path) -> tuple[pd.DataFrame | None, list, list]:
    """DATA/eval -> (table of ImageID, path; [Problem] the loader rejects; [Problem] worth a look), or None."""
    if not (root / "eval" / "info.csv").is_file():
        return None, [], []
    _, samples, errors = data.read_eval(root)
    table = pd.DataFrame({"ImageID": samples["person_id"], "path": samples["image_path"]})
    listed = set(table["ImageID"])
    image_dir = root / "eval" / "images"
    notes = []
    if image_dir.is_dir():
        notes = [Problem(e.path, "in eval/images but not in info.csv (never predicted)")
                 for e in sorted(os.scandir(image_dir), key=lambda e: e.name)
                 if not data.is_ignored(e.name) and e.name not in listed]
    return table, errors, notes


def read_eval_truth(root: Path, eval_table, schema: labels.LabelSchema) -> tuple[pd.DataFrame | None, list]:
    """DATA/eval_truth.csv (ImageID + mask,gender,age or ans), as per-photo labels, or None; and [Problem]."""
    path = root / "eval_truth.csv"
    if not path.is_file() or eval_table is None:
        return None, []
    try:
        truth = data.read_csv_checked(path, ("ImageID",), "eval_truth.csv")
        if {"mask", "gender", "age"} <= set(truth.columns):
            mask, gender = truth["mask"].astype(int), truth["gender"].astype(int)
            group = schema.group(truth["age"].astype(int).to_numpy())
            truth = pd.DataFrame({"ImageID": truth["ImageID"], "mask": mask, "gender": gender, "age_group": group,
                                  "age": truth["age"].astype(int)})
        elif "ans" in truth.columns:
            m, g, a = labels.decode(truth["ans"].astype(int).to_numpy())
            truth = pd.DataFrame({"ImageID": truth["ImageID"], "mask": m, "gender": g, "age_group": a, "age": -1})
        else:
            return None, [Problem(str(path), "has neither mask,gender,age nor ans columns: eval counts left out")]
    except (DataError, ValueError) as exc:
        return None, [Problem(str(path), f"cannot be used ({str(exc).splitlines()[0]}): eval counts left out")]
    truth = truth[truth["ImageID"].isin(set(eval_table["ImageID"]))]
    return truth.reset_index(drop=True), []


def duplicate_groups(files: pd.DataFrame) -> list[list[str]]:
    """Groups of byte-identical files (same sha1), each sorted, largest groups first."""
    hashed = files.dropna(subset=["sha1"])
    groups = [sorted(g["path"]) for _, g in hashed.groupby("sha1") if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def unlisted_folders(root: Path, people: pd.DataFrame) -> list:
    """Folders in train/images that train.csv does not name: the loader never reads them."""
    images = root / "train" / "images"
    if not images.is_dir():
        return []
    listed = set(people["path"])
    return [Problem(e.path, "folder not listed in train.csv (never read)")
            for e in sorted(os.scandir(images), key=lambda e: e.name)
            if e.is_dir() and not data.is_ignored(e.name) and e.name not in listed]


def format_notes(files: pd.DataFrame) -> list:
    """Photos whose content format does not match the extension, and 16-bit PNGs (the loader reads them anyway)."""
    notes = []
    for row in files.dropna(subset=["format"]).itertuples():
        ext = Path(row.path).suffix.lower()
        expected = FORMAT_EXTENSIONS.get(row.format)
        if expected is not None and ext not in expected:
            notes.append(Problem(row.path, f"{row.format} content with a {ext or 'missing'} extension"))
        if row.bits == 16:
            notes.append(Problem(row.path, "16-bit PNG: the loader keeps the top 8 bits of each value"))
    return notes


def collect(data_root, age_threshold=labels.DEFAULT_AGE_THRESHOLD, workers=4, progress=True) -> dict:
    """Read and check everything; return the facts the report shows (tables, problems, duplicates)."""
    root = Path(data_root).resolve()
    if not root.is_dir():
        raise DataError(f"data folder not found: {data_root}")
    schema = labels.LabelSchema(age_threshold)  # NOTE: the age groups of every table and plot
    samples, errors = data.train_samples(root, log=lambda *_: None)
    people = data.read_people(root)
    eval_table, eval_errors, notes = read_eval(root)
    errors = errors + eval_errors
    truth, truth_notes = read_eval_truth(root, eval_table, schema)
    notes += truth_notes + unlisted_folders(root, people)

    paths = list(samples["image_path"]) + ([] if eval_table is None else list(eval_table["path"]))
    files = scan_files(paths, workers, progress)
    errors += check_images(paths, workers=max(1, workers), progress=progress, desc="decoding photos")
    notes += format_notes(files)
    # NOTE: unusual but plausible ages; implausible ones (data.PLAUSIBLE_AGES) are already errors
    odd = people[people["age"].between(*data.PLAUSIBLE_AGES) & ((people["age"] < 10) | (people["age"] > 100))]
    notes += [Problem(str(root / "train" / "images" / p.path), f"age {p.age} looks wrong") for p in odd.itertuples()]
    samples = samples.assign(age_group=schema.group(samples["age"].to_numpy()))
    people = people.assign(age_group=schema.group(people["age"].to_numpy()))
    return {"root": root, "schema": schema, "threshold": schema.age_threshold, "people": people, "samples": samples,
            "eval": eval_table, "truth": truth, "files": files, "duplicates": duplicate_groups(files),
            "errors": errors, "notes": notes}


# ---------------------------------------------------------------- tables
def class_table(facts) -> pd.DataFrame:
    """One row per 18-class label: train people and photos (and eval photos with eval_truth.csv)."""
    samples, truth = facts["samples"], facts["truth"]
    joint = labels.encode(samples["mask"].to_numpy(), samples["gender"].to_numpy(), samples["age_group"].to_numpy())
    table = pd.DataFrame({"class": range(labels.NUM_JOINT), "name": facts["schema"].joint_names})
    table["train people"] = [samples["person_id"][joint == c].nunique() for c in range(labels.NUM_JOINT)]
    table["train photos"] = np.bincount(joint, minlength=labels.NUM_JOINT) if len(joint) else 0
    if truth is not None:
        ans = labels.encode(truth["mask"].to_numpy(), truth["gender"].to_numpy(), truth["age_group"].to_numpy())
        table["eval photos"] = np.bincount(ans, minlength=labels.NUM_JOINT) if len(ans) else 0
    return table


def task_tables(facts) -> dict:
    """{task: table of train people, train photos (and eval photos) per class of that task}."""
    samples, truth, people = facts["samples"], facts["truth"], facts["people"]
    names = facts["schema"].class_names
    columns = {"mask": "mask", "gender": "gender", "age": "age_group"}
    tables = {}
    for task, column in columns.items():
        k = len(names[task])
        table = pd.DataFrame({task: names[task]})
        if task == "mask":
            table["train people"] = [samples["person_id"][samples["mask"] == c].nunique() for c in range(k)]
        else:
            table["train people"] = np.bincount(people[column], minlength=k)[:k] if len(people) else 0
        table["train photos"] = np.bincount(samples[column], minlength=k)[:k] if len(samples) else 0
        if truth is not None:
            table["eval photos"] = np.bincount(truth[column], minlength=k)[:k] if len(truth) else 0
        tables[task] = table
    return tables


def gender_age_table(facts) -> pd.DataFrame:
    """People per gender (rows) and age group (columns)."""
    people = facts["people"]
    table = pd.crosstab(people["gender"], people["age_group"]).reindex(index=[0, 1], columns=[0, 1, 2], fill_value=0)
    table.index = list(labels.GENDER_NAMES)
    table.columns = list(facts["schema"].age_names)
    return table


def size_format_tables(facts) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Photo counts per size (W x H) and per format + extension."""
    files = facts["files"]
    sizes = Counter(f"{w}x{h}" if w else "unreadable" for w, h in zip(files["width"], files["height"]))
    size_table = pd.DataFrame(sizes.most_common(), columns=["size", "photos"])
    formats = Counter(f"{fmt or 'unreadable'} ({Path(p).suffix.lower() or 'no extension'})"
                      for fmt, p in zip(files["format"], files["path"]))
    format_table = pd.DataFrame(formats.most_common(), columns=["format (extension)", "photos"])
    return size_table, format_table


# ---------------------------------------------------------------- plots
def plot_classes(table: pd.DataFrame):
    """Horizontal bars of photos per 18-class label (train, and eval when known)."""
    from mtl.plots import plt  # NOTE: matplotlib only when plotting (crop_faces imports this module)
    fig, ax = plt.subplots(figsize=(7.5, 6))
    y = np.arange(len(table))
    series = [c for c in ("train photos", "eval photos") if c in table.columns]
    height = 0.8 / len(series)
    for i, column in enumerate(series):
        ax.barh(y + (i - (len(series) - 1) / 2) * height, table[column], height, label=column)
    ax.set_yticks(y, [f"{c:2d} {n}" for c, n in zip(table["class"], table["name"])], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("photos")
    ax.set_title("photos per class")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_ages(people: pd.DataFrame, schema: labels.LabelSchema):
    """Histogram of people's ages, one bar per year, coloured by age group, the threshold marked."""
    from mtl.plots import plt
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    if len(people):
        ages = people["age"].to_numpy()
        bins = np.arange(ages.min(), ages.max() + 2) - 0.5
        names, threshold = schema.age_names, schema.age_threshold
        for group in range(3):
            chosen = ages[people["age_group"].to_numpy() == group]
            ax.hist(chosen, bins=bins, label=f"{names[group]} ({len(chosen)})", color=f"C{group}")
        for line, text in ((labels.YOUNG_BELOW, str(labels.YOUNG_BELOW)), (threshold, f"threshold {threshold}")):
            ax.axvline(line - 0.5, color="k", linestyle="--", linewidth=1)
            ax.text(line - 0.5, ax.get_ylim()[1] * 0.95, f" {text}", fontsize=8, va="top")
        ax.legend(fontsize=8)
    ax.set_xlabel("age (years)")
    ax.set_ylabel("people")
    ax.set_title("age of the train people")
    fig.tight_layout()
    return fig


def plot_gender_age(table: pd.DataFrame):
    """Heatmap of people per gender x age group, with the counts written in."""
    from mtl.plots import plt
    fig, ax = plt.subplots(figsize=(4.8, 2.8))
    values = table.to_numpy()
    ax.imshow(values, cmap="Blues", vmin=0, vmax=max(int(values.max()), 1))
    ax.set_xticks(range(values.shape[1]), table.columns)
    ax.set_yticks(range(values.shape[0]), table.index)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > values.max() / 2 else "black")
    ax.set_title("people per gender and age group")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- writing
def md_table(table: pd.DataFrame, index=False) -> str:
    """A pandas table as a Markdown table (no extra dependency)."""
    if index:
        table = table.reset_index().rename(columns={"index": ""})
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def relative(path, root: Path) -> str:
    """A path inside DATA as DATA-relative text (the names people see in the report)."""
    text = str(path)
    if text.startswith(str(root) + os.sep):
        return text[len(str(root)) + 1:]
    return text


def problem_lines(problems, root: Path, limit=LIST_LIMIT) -> list[str]:
    """Markdown list lines, one per problem, at most `limit`."""
    lines = [f"- `{relative(p.path, root)}`: {p.reason}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"- ... and {len(problems) - limit} more")
    return lines


def render(facts, plots: dict) -> str:
    """The Markdown report."""
    root, threshold = facts["root"], facts["threshold"]
    people, samples, errors = facts["people"], facts["samples"], facts["errors"]
    n_eval = 0 if facts["eval"] is None else len(facts["eval"])
    verdict = (f"**{len(errors)} error(s)**: the training loader would reject this data set (listed below)."
               if errors else "**No errors**: the training loader accepts this data set.")
    out = [f"# Data report: `{root}`", "",
           f"{len(people)} people, {len(samples)} train photos, {n_eval} eval photos; age threshold {threshold}. "
           + verdict, ""]
    out += ["## People and photos per class", "", md_table(class_table(facts)), "",
            f"![photos per class]({plots['classes']})", ""]
    if facts["truth"] is None:
        out += ["Eval photos are unlabelled (no `eval_truth.csv`).", ""]
    out += ["## Per task", ""]
    for task, table in task_tables(facts).items():
        out += [f"### {task}", "", md_table(table), ""]
    out += ["## Age", ""]
    if len(people):
        ages = people["age"]
        near = people["age"].between(threshold - 3, threshold - 1).sum()
        out += [f"Ages {ages.min()}..{ages.max()} (median {ages.median():g}); {near} people aged "
                f"{threshold - 3}..{threshold - 1}, just below the threshold.", ""]
    out += [f"![age histogram]({plots['ages']})", "", "### Gender x age group (people)", "",
            md_table(gender_age_table(facts), index=True), "", f"![gender x age]({plots['gender_age']})", ""]
    if len(people):
        races = people["race"].value_counts()
        out += ["### Race (people)", "", md_table(races.rename_axis("race").reset_index(name="people")), ""]
    sizes, formats = size_format_tables(facts)
    rotated = int(facts["files"]["rotated"].sum())
    out += ["## Photo sizes and formats", "", md_table(sizes.head(20)), ""]
    if len(sizes) > 20:
        out += [f"... and {len(sizes) - 20} more sizes.", ""]
    out += [md_table(formats), "", f"{rotated} photo(s) carry an EXIF rotation (the loader applies it).", ""]
    groups = facts["duplicates"]
    out += ["## Duplicate photos (identical bytes)", ""]
    if groups:
        out += [f"{len(groups)} group(s) of identical files, {sum(map(len, groups))} files in all:", ""]
        for group in groups[:LIST_LIMIT]:
            names = [relative(p, root) for p in group]
            leak = {n.split(os.sep)[0] for n in names} >= {"train", "eval"}
            out.append("- " + ", ".join(f"`{n}`" for n in names) + (" (**in train and in eval**)" if leak else ""))
        if len(groups) > LIST_LIMIT:
            out.append(f"- ... and {len(groups) - LIST_LIMIT} more groups")
    else:
        out += ["None."]
    out += ["", f"## Errors: what the loader would reject ({len(errors)})", ""]
    out += problem_lines(errors, root) or ["None."]
    out += ["", f"## Worth a look ({len(facts['notes'])})", ""]
    out += problem_lines(facts["notes"], root) or ["Nothing."]
    return "\n".join(out) + "\n"


def write_report(facts, out_dir) -> Path:
    """Write report.md and its PNG plots into out_dir (created); return the report's path."""
    from mtl.plots import save_png
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"classes": "class_counts.png", "ages": "age_histogram.png", "gender_age": "gender_age.png"}
    save_png(plot_classes(class_table(facts)), out_dir / plots["classes"])
    save_png(plot_ages(facts["people"], facts["schema"]), out_dir / plots["ages"])
    save_png(plot_gender_age(gender_age_table(facts)), out_dir / plots["gender_age"])
    return atomic_write_text(render(facts, plots), out_dir / "report.md")


def summary(facts, report_path) -> str:
    """The few lines printed at the end: counts, errors (the first ones by name), where the report is."""
    root, errors = facts["root"], facts["errors"]
    n_eval = 0 if facts["eval"] is None else len(facts["eval"])
    lines = [f"{len(facts['people'])} people, {len(facts['samples'])} train photos, {n_eval} eval photos; "
             f"{len(facts['duplicates'])} duplicate group(s); {len(facts['notes'])} note(s); {len(errors)} error(s)"]
    lines += [f"  {relative(p.path, root)}: {p.reason}" for p in errors[:10]]
    if len(errors) > 10:
        lines.append(f"  ... and {len(errors) - 10} more")
    lines.append(f"report: {report_path}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m data_tools.report", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", metavar="DATA", help="data folder with train/ (and eval/), the competition layout")
    parser.add_argument("--out", help="folder for report.md and the PNG plots (default: ./report_<DATA name>)")
    parser.add_argument("--age-threshold", default=labels.DEFAULT_AGE_THRESHOLD,
                        help=f"age from which a person counts as old (default {labels.DEFAULT_AGE_THRESHOLD})")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes decoding photos (default: CPU count, at most 4)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def main(argv=None) -> int:
    """Write the report; return 1 if the loader would reject the data, else 0."""
    args = get_args_parser().parse_args(argv)
    threshold = labels.check_threshold(args.age_threshold)
    out = Path(args.out) if args.out else Path(f"report_{Path(args.data).resolve().name}")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    facts = collect(args.data, threshold, args.workers, args.progress)
    path = write_report(facts, out)
    print(summary(facts, path))
    return 1 if facts["errors"] else 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
