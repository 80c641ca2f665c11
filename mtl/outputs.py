"""What predictions are written as: the submission, probability files (--save-probs), and writing them safely.

`submission_table` is the competition's ImageID,ans; `probs_table`/`read_probs` are the probability files
(one row per photo and ensemble member: ImageID, checkpoint, age_threshold, mask_0..2, gender_0..1,
age_0..2, + joint_0..17 and age_reg when the model has them) that `predict.py --from-probs` ensembles
again, each member read back as a `SavedMember`. `check_output` checks an output path before any compute;
`write_all` writes several outputs so that one that fails (a full disk) is named after the others are written.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from mtl import labels
from mtl.data import read_csv_checked
from mtl.errors import ConfigError, DataError, MTLError
from mtl.io import WriteError, check_parent, check_writable

HEAD_COLUMNS = {"mask": [f"mask_{i}" for i in range(3)], "gender": [f"gender_{i}" for i in range(2)],
                "age": [f"age_{i}" for i in range(3)], "joint": [f"joint_{i}" for i in range(labels.NUM_JOINT)],
                "age_reg": ["age_reg"]}
REQUIRED_HEADS = ("mask", "gender", "age")


# ---------------------------------------------------------------- output paths and writes
def check_output(path, flag="--out") -> Path:
    """An output file path whose folder exists and can be written (check_writable), and which is not itself a
    folder or a device."""
    path = check_parent(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{flag} {path} is not a regular file; give a file name")
    check_writable(path.parent, flag)
    return path


def write_all(writes, log=print):
    """Run each (path, write, message) in turn; one that fails (a full disk) is named after the others are written."""
    failed = []
    for path, write, message in writes:
        try:
            write()
        except WriteError as exc:  # NOTE: mtl.io's atomic writes name the file and the reason themselves
            failed.append(f"{exc.path} ({exc.reason})")
        except OSError as exc:
            failed.append(f"{path} ({exc.strerror or exc})")
        else:
            if message:
                log(message)
    if failed:
        rest = "; the other outputs were written" if len(failed) < len(writes) else ""
        raise MTLError(f"could not write {'; '.join(failed)}{rest}")


# ---------------------------------------------------------------- probability files
def probs_table(image_ids, probs: dict, checkpoint: str, schema: labels.LabelSchema) -> pd.DataFrame:
    """One member's probabilities as a table: ImageID, checkpoint, age_threshold, mask_0.. (see module doc)."""
    table = {"ImageID": list(image_ids), "checkpoint": checkpoint, "age_threshold": schema.age_threshold}
    for head, columns in HEAD_COLUMNS.items():
        if head in probs:
            values = np.asarray(probs[head], dtype=np.float32).reshape(len(table["ImageID"]), -1)
            table.update({c: values[:, j] for j, c in enumerate(columns)})
    return pd.DataFrame(table)


@dataclasses.dataclass(frozen=True)
class SavedMember:
    """One ensemble member read back from a probability file: its name ('file [checkpoint]'), its label schema (None
    when the file has no age_threshold column), its per-task probabilities and the photos they answer."""
    name: str
    schema: labels.LabelSchema | None
    probs: dict
    image_ids: list


def read_probs(paths) -> tuple[list, list[SavedMember]]:
    """Probability files -> (ImageIDs, [SavedMember]); all members list the same photos, with one schema.

    A file without the age_threshold column (written by hand) is taken to share the others' schema.
    """
    required = ["ImageID"] + [c for head in REQUIRED_HEADS for c in HEAD_COLUMNS[head]]
    members = []
    for path in paths:
        table = read_csv_checked(path, required, "probabilities CSV")
        if len(table) == 0:
            raise DataError(f"{path}: holds no rows")
        names = table["checkpoint"] if "checkpoint" in table.columns else pd.Series([""] * len(table))
        for name in dict.fromkeys(names):
            part = table[(names == name).to_numpy()]
            probs = {}
            for head, columns in HEAD_COLUMNS.items():
                if all(c in part.columns for c in columns):
                    try:
                        values = part[columns].astype(np.float32).to_numpy()
                    except ValueError as exc:
                        raise DataError(f"{path}: column(s) {', '.join(columns)} must be numbers ({exc})") from None
                    probs[head] = values[:, 0] if head == "age_reg" else values
            member_name = f"{path}" + (f" [{name}]" if name else "")
            schema = None
            if "age_threshold" in part.columns:
                found = sorted(set(part["age_threshold"].str.strip()))
                if len(found) != 1:
                    raise DataError(f"{member_name}: column age_threshold holds {', '.join(found)}; one member has "
                                    f"one threshold")
                try:
                    schema = labels.LabelSchema(found[0])
                except ConfigError as exc:
                    raise DataError(f"{member_name}: column age_threshold: {exc}") from None
            members.append(SavedMember(member_name, schema, probs, part["ImageID"].tolist()))
    first = members[0]
    for other in members[1:]:
        if other.image_ids != first.image_ids:
            raise DataError(f"{other.name} and {first.name} do not list the same photos in the same order; "
                            f"only probabilities of one data set can be ensembled")
    known = [(m.name, m.schema) for m in members if m.schema is not None]
    if known:
        labels.check_same_schema(known)
    return first.image_ids, members


# ---------------------------------------------------------------- the submission
def submission_table(image_ids, pred) -> pd.DataFrame:
    """The competition's format: ImageID,ans with ans 0..17, in the given (info.csv) order."""
    return pd.DataFrame({"ImageID": list(image_ids), "ans": np.asarray(pred, dtype=np.int64)})


def class_counts_line(pred) -> str:
    counts = np.bincount(np.asarray(pred, dtype=np.int64), minlength=labels.NUM_JOINT)
    return " ".join(f"{c}:{n}" for c, n in enumerate(counts) if n)
