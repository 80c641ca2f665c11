"""Every command answers --help and a mistyped flag without importing torch (or timm, albumentations, sklearn,
optuna: seconds to load on a small machine); the model and the machine are looked at only once the flags are good."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

HEAVY = ("torch", "timm", "albumentations", "sklearn", "optuna")
# NOTE: runs a command as `python SCRIPT ...` or `python -m MODULE ...` runs it, then records what it imported
CHILD = r"""
import json, runpy, sys
target, record = sys.argv[1], sys.argv[2]
sys.argv, status = [target, *sys.argv[3:]], 0
sys.path.insert(0, ".")
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    status = exc.code
with open(record, "w") as f:
    json.dump({"status": status, "modules": sorted(sys.modules)}, f)
"""

# each command with a flag it refuses: a name outside its choices, a number out of range, flags that do not go together
BAD_FLAGS = {
    "train_multitask.py": [["--arch", "twoheads"], ["--lr", "-1"], ["--mask-loss", "nope"]],
    "predict.py": [["--ensemble", "best"], ["--checkpoint", "a.pt", "--skip-bad"]],
    "tune.py": [["--pruner", "never"], ["--trials", "0"]],
    "demo.py": [["--people", "many"]],
    "mtl.soup": [["--checkpoints", "a.pt", "--tta", "vflip"]],
    "mtl.vote": [["only.csv", "--out", "vote.csv"]],
    "mtl.export": [["--checkpoint", "a.pt", "--out", "m.onnx", "--format", "tflite"]],
    "data_tools.report": [["DATA", "--workers", "two"]],
    "data_tools.crop_faces": [["DATA", "OUT", "--margin", "-1"], ["DATA", "OUT", "--device", "tpu"]],
    "data_tools.import_faces": [["SRC", "OUT", "--format", "voc"]],
    "data_tools.make_synthetic": [["--out", "x", "--people", "0"]],
    "data_tools.pseudo_label": [["--checkpoint", "a.pt", "--out", "x.csv", "--min-confidence", "2"]],
}
CASES = [(command, ["--help"]) for command in BAD_FLAGS] + [
    (command, argv) for command, bad in BAD_FLAGS.items() for argv in bad]


@pytest.mark.parametrize("command, argv", CASES, ids=[f"{c} {' '.join(a)}" for c, a in CASES])
def test_help_and_a_bad_flag_answer_without_torch(command, argv, tmp_path):
    record = tmp_path / "record.json"
    done = subprocess.run([sys.executable, "-c", CHILD, command, str(record), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen = json.loads(record.read_text())
    if argv == ["--help"]:
        assert seen["status"] in (0, None) and "usage:" in done.stdout, done.stderr
    else:
        assert seen["status"] == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, naming the flag
    assert [m for m in HEAVY if m in seen["modules"]] == []
