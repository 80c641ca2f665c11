"""mtl.vote: weighted hard voting over submission CSVs, ties to the first file, and every mismatch named."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl import vote
from mtl.cli import main_guard
from mtl.errors import ConfigError, DataError
from tests.helpers import ROOT

IDS = [f"{i:04x}.jpg" for i in range(6)]


def write_sub(path, answers, ids=IDS) -> Path:
    pd.DataFrame({"ImageID": ids, "ans": answers}).to_csv(path, index=False)
    return path


def run_vote(*argv) -> tuple[int, pd.DataFrame | None]:
    """The command line in-process, as `python -m mtl.vote` runs it: (exit code, the table written or None)."""
    try:
        table = main_guard(lambda: vote.main([str(a) for a in argv]))
    except SystemExit as exc:
        return exc.code, None
    return 0, table


def only_files(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.fixture
def three(tmp_path):
    a = write_sub(tmp_path / "a.csv", [0, 5, 7, 1, 2, 17])
    b = write_sub(tmp_path / "b.csv", [0, 5, 8, 3, 4, 16])
    c = write_sub(tmp_path / "c.csv", [1, 6, 8, 3, 9, 15])
    return a, b, c


def test_majority_wins_and_ties_go_to_the_first_file(three, tmp_path, capsys):
    code, table = run_vote(*three, "--out", tmp_path / "vote.csv")
    assert code == 0
    written = pd.read_csv(tmp_path / "vote.csv")
    assert list(written.columns) == ["ImageID", "ans"] and written["ImageID"].tolist() == IDS
    # rows 0-3: a 2-1 majority; rows 4-5: three different answers, a three-way tie -> a.csv's answer
    assert written["ans"].tolist() == [0, 5, 8, 3, 2, 17]
    assert np.array_equal(table["ans"].to_numpy(), written["ans"].to_numpy())
    printed = capsys.readouterr().out
    assert "2 answer(s) (33.3%) differ from a.csv" in printed and "2 tie(s)" in printed


def test_weights_shift_the_majority(three, tmp_path):
    tables = [vote.read_submission(p) for p in three]
    assert vote.vote(tables, [1, 1, 3]).tolist() == [1, 6, 8, 3, 9, 15]          # c.csv outweighs a and b together
    assert vote.vote(tables, [2.5, 1, 1]).tolist() == [0, 5, 7, 1, 2, 17]        # a.csv outweighs b and c together
    # 0.1 + 0.2 against 0.3 is a tie despite rounding: a.csv's answer wins it on rows where it is tied
    assert vote.vote(tables, [0.1, 0.2, 0.3]).tolist() == [0, 5, 8, 3, 9, 15]
    code, table = run_vote(*three, "--weights", "1", "1", "3", "--out", tmp_path / "w.csv")
    assert code == 0 and table["ans"].tolist() == [1, 6, 8, 3, 9, 15]


def test_a_tie_the_first_file_is_not_in_goes_to_the_earliest_tied_file():
    # a votes 0 (weight 1); b votes 4 and c votes 9 (weight 2 each): 4 and 9 tie, b comes before c
    assert vote.vote([[0], [4], [9]], [1, 2, 2]).tolist() == [4]
    assert vote.vote([[0], [9], [4]], [1, 2, 2]).tolist() == [9]
    # two files that disagree everywhere: the first file wins every row
    assert vote.vote([[1, 2, 3], [4, 5, 6]]).tolist() == [1, 2, 3]


def test_mismatched_image_ids_are_named_by_file_and_row(three, tmp_path):
    swapped = IDS[:3] + [IDS[4], IDS[3], IDS[5]]
    d = write_sub(tmp_path / "d.csv", [0] * 6, ids=swapped)
    with pytest.raises(DataError) as err:
        vote.run([*three, d], tmp_path / "vote.csv")
    message = str(err.value)
    assert f"{d} row 5 has ImageID '{IDS[4]}'" in message and f"{three[0]} row 5 has '{IDS[3]}'" in message
    short = write_sub(tmp_path / "short.csv", [0] * 5, ids=IDS[:5])
    with pytest.raises(DataError, match=rf"short\.csv has 5 rows but .*a\.csv has 6: .*a\.csv row 7 "
                                        rf"\(ImageID '{IDS[5]}'\) is missing from .*short\.csv"):
        vote.run([three[0], short], tmp_path / "vote.csv")
    assert "vote.csv" not in only_files(tmp_path)


def test_bad_columns_and_answers_are_named(three, tmp_path, capsys):
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"ImageID": IDS, "class": [0] * 6}).to_csv(wrong, index=False)
    code, _ = run_vote(three[0], wrong, "--out", tmp_path / "vote.csv")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "wrong.csv: missing column(s) ans" in err
    assert "Traceback" not in err
    bad = write_sub(tmp_path / "bad.csv", [0, 18, "x", -1, 2.5, 3])
    with pytest.raises(DataError) as caught:
        vote.run([three[0], bad], tmp_path / "vote.csv")
    message = str(caught.value)
    assert message.startswith("4 bad submission rows found")
    for row, value in ((3, "18"), (4, "x"), (5, "-1"), (6, "2.5")):
        assert f"bad.csv row {row}: ans must be a whole number 0..17, got '{value}'" in message, row
    doubled = write_sub(tmp_path / "doubled.csv", [0] * 6, ids=IDS[:5] + IDS[:1])
    with pytest.raises(DataError, match=rf"doubled\.csv row 7: ImageID '{IDS[0]}' is listed more than once"):
        vote.run([three[0], doubled], tmp_path / "vote.csv")
    assert "vote.csv" not in only_files(tmp_path)


def test_bad_arguments_stop_before_anything_is_written(three, tmp_path):
    with pytest.raises(ConfigError, match="at least 2 submissions"):
        vote.run(three[:1], tmp_path / "vote.csv")
    with pytest.raises(ConfigError, match="got 2 number"):
        vote.run(three, tmp_path / "vote.csv", weights=[1, 2])
    with pytest.raises(ConfigError, match="positive"):
        vote.run(three, tmp_path / "vote.csv", weights=[1, 0, 2])
    with pytest.raises(DataError, match="submission CSV not found: .*missing.csv"):
        vote.run([three[0], tmp_path / "missing.csv"], tmp_path / "vote.csv")
    code, _ = run_vote(*three, "--out", tmp_path / "no" / "such" / "vote.csv")
    assert code == 2
    with pytest.raises(ConfigError, match="is a folder"):
        vote.run(three, tmp_path)
    assert only_files(tmp_path) == ["a.csv", "b.csv", "c.csv"]


def test_command_line_help_and_error_exit(three, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mtl.vote", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "ties" in done.stdout and "--weights" in done.stdout
    done = subprocess.run([sys.executable, "-m", "mtl.vote", str(three[0]), "--out", str(tmp_path / "v.csv")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "error: give at least 2 submissions to vote on, got 1"
