"""Hard voting over finished submissions: several ImageID,ans CSVs -> one, each photo taking the (weighted) majority.

Every file must be a submission of the same eval set: columns ImageID and ans (a whole number 0..17),
the same ImageIDs in the same order, none twice. Anything else stops the vote before a file is written,
naming the file and the first row that differs. Each file gives its answer `--weights` votes (1 each
by default); the class with the most votes wins. A tie goes to the first file: if the first file's
answer is among the tied classes it wins, otherwise the tied class of the earliest file that voted for
one. Only answers are voted on; to vote with probabilities, use `predict.py --ensemble hard` (ties to
the soft ensemble) on checkpoints or --save-probs files. Run it as

    python -m mtl.vote sub_a.csv sub_b.csv sub_c.csv --out vote.csv
    python -m mtl.vote sub_a.csv sub_b.csv sub_c.csv --weights 1 1 2 --out vote.csv
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mtl import labels
from mtl.cli import ArgumentParser, main_guard
from mtl.data import Problem, format_problems, read_csv_checked
from mtl.ensemble import check_weights, hard_vote, tied_classes, vote_counts
from mtl.errors import ConfigError, DataError
from mtl.io import atomic_write_csv
from mtl.outputs import check_output

SUBMISSION_COLUMNS = ("ImageID", "ans")
MIN_FILES = 2


def read_submission(path) -> pd.DataFrame:
    """A submission CSV -> DataFrame(ImageID str, ans int64); bad answers and repeated ImageIDs raise, all named."""
    path = Path(path)
    table = read_csv_checked(path, SUBMISSION_COLUMNS, "submission CSV")
    if len(table) == 0:
        raise DataError(f"{path}: holds no rows")
    ids = table["ImageID"].str.strip()
    problems = []
    for row, value in enumerate(table["ans"], start=2):
        text = str(value).strip()
        if re.fullmatch(r"\d+", text) is None or int(text) >= labels.NUM_JOINT:
            problems.append(Problem(f"{path} row {row}", f"ans must be a whole number 0..{labels.NUM_JOINT - 1}, "
                                                         f"got {value!r} (ImageID {ids.iat[row - 2]!r})"))
    for row in np.flatnonzero(ids.duplicated().to_numpy()):
        problems.append(Problem(f"{path} row {row + 2}", f"ImageID {ids.iat[row]!r} is listed more than once"))
    if problems:
        raise DataError(format_problems(problems, "bad submission row"))
    return pd.DataFrame({"ImageID": ids, "ans": table["ans"].str.strip().astype(np.int64)})


def check_same_images(tables, paths):
    """Raise a DataError naming the first file, row and ImageID that differs from the first file's list."""
    first, first_path = tables[0]["ImageID"].tolist(), paths[0]
    for table, path in zip(tables[1:], paths[1:]):
        ids = table["ImageID"].tolist()
        if ids == first:
            continue
        for i, (a, b) in enumerate(zip(first, ids)):
            if a != b:
                raise DataError(f"{path} row {i + 2} has ImageID {b!r} where {first_path} row {i + 2} has {a!r}; "
                                f"submissions to vote on must list the same ImageIDs in the same order")
        longer, shorter = (first_path, path) if len(first) > len(ids) else (path, first_path)
        n = min(len(first), len(ids))
        extra = (first if len(first) > len(ids) else ids)[n]
        raise DataError(f"{path} has {len(ids)} rows but {first_path} has {len(first)}: {longer} row {n + 2} "
                        f"(ImageID {extra!r}) is missing from {shorter}")


def answers_of(table) -> np.ndarray:
    """The ans column of a submission table, or a plain sequence of answers, as int64."""
    return np.asarray(table["ans"] if isinstance(table, pd.DataFrame) else table, dtype=np.int64)


def vote(tables, weights=None) -> np.ndarray:
    """Weighted hard vote per photo over submissions (tables or answer arrays, one order); ties to the first file.

    Among the classes tied for the most votes, the first file's answer wins when it is one of them,
    else the answer of the earliest file that voted for a tied class (`ensemble.hard_vote`).
    """
    answers = np.stack([answers_of(t) for t in tables])
    return hard_vote(answers, check_weights(weights, len(answers), "submission", positive=True))[0]


def run(paths, out, weights=None, log=print) -> pd.DataFrame:
    """Read and check every submission, vote, write ImageID,ans to out atomically; return the table written."""
    paths = [Path(p) for p in paths]
    if len(paths) < MIN_FILES:
        raise ConfigError(f"give at least {MIN_FILES} submissions to vote on, got {len(paths)}")
    weights = check_weights(weights, len(paths), "submission", positive=True)
    out = check_output(out)
    tables = [read_submission(p) for p in paths]
    check_same_images(tables, paths)
    pred = vote(tables, weights)
    result = pd.DataFrame({"ImageID": tables[0]["ImageID"].to_numpy(), "ans": pred})
    atomic_write_csv(result, out)
    first = answers_of(tables[0])
    ties = int((tied_classes(vote_counts([answers_of(t) for t in tables], weights), weights).sum(1) > 1).sum())
    changed = int((pred != first).sum())
    agreement = ", ".join(f"{p.name} {float((answers_of(t) == pred).mean()):.1%}" for p, t in zip(paths, tables))
    log(f"wrote {out}: {len(pred)} rows voted from {len(paths)} submissions"
        + (f" (weights {' '.join(f'{w:g}' for w in weights)})" if len(set(weights.tolist())) > 1 else ""))
    log(f"{changed} answer(s) ({changed / len(pred):.1%}) differ from {paths[0].name}; "
        f"{ties} tie(s) broken by file order; agreement with the vote: {agreement}")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mtl.vote", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submissions", nargs="+", metavar="CSV",
                        help=f"submission CSVs (ImageID,ans), at least {MIN_FILES}; the first one breaks ties")
    parser.add_argument("--weights", type=float, nargs="+", metavar="W",
                        help="votes per file, one positive number per CSV in the same order (default: 1 each)")
    parser.add_argument("--out", required=True, help="voted submission CSV to write (its folder must exist)")
    return parser


def main(argv=None) -> pd.DataFrame:
    """python -m mtl.vote: parse the command line (argv, default sys.argv) and vote."""
    args = get_args_parser().parse_args(argv)
    return run(args.submissions, args.out, args.weights)


if __name__ == "__main__":
    main_guard(main)
