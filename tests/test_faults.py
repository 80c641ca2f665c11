"""Fault injection: training processes killed with SIGKILL at random moments and inside every checkpoint write,
resumed each time, end exactly where an uninterrupted run with the same seed ends.

The uninterrupted run is a plain `python train_multitask.py` process. The killed ones are forked by
tests/fault_runner.py, a warm parent holding torch and timm, and each runs train_multitask.main as the
command line does: a fresh interpreter per kill would cost ~10 s of imports on 2 cores. Kill points:
before and after the rename of each file a run writes (config.yaml, last.pt, best.pt, metrics.json;
both in an epoch's writes and in the repair a resumed run makes), at seeded random optimizer steps,
and as a seeded random photo of an epoch is read (mid-batch, mid-validation). Every kill point is an
event the process reaches whatever the machine's speed, so the plan's kills all land, on a busy
machine or a quiet one. After each kill the run is continued the way
a user would: `--resume OUT/last.pt`, or, when no last.pt was written yet, the same command again
(after deleting the folder, which the command refuses to reuse). Run alone with `pytest -m faults`.
"""
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, run_command

pytestmark = pytest.mark.faults

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
EPOCHS = 5
STEPS_PER_EPOCH = 5  # 168 training photos in batches of 32, the last one dropped
SEED = 20240611
TIMEOUT = 300


def flags(data, cache, out):
    return ["--data", str(data), "--cache-dir", str(cache), "--out", str(out), "--model", "test_efficientnet",
            "--no-pretrained", "--img-size", "40", "52", "--augment", "flip", "--epochs", str(EPOCHS),
            "--batch-size", "32", "--lr", "3e-3", "--warmup-epochs", "0.2", "--workers", "0", "--no-progress",
            "--drop-path-rate", "0", "--head-dropout", "0", "--log-images", "4", "--patience", "0", "--ema", "0.9",
            "--seed", "3"]


class Runner:
    """tests/fault_runner.py: start a training process, optionally kill it, return its exit status."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fault_runner"], cwd=ROOT, env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)

    def reply(self, timeout=TIMEOUT):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "fault_runner.py did not answer"
        line = self.proc.stdout.readline()
        assert line, f"fault_runner.py ended (rc {self.proc.wait()})"
        return json.loads(line)

    def run(self, argv, log, out, kill_write=None, kill_step=None, kill_item=None) -> int:
        cmd = {"argv": [str(a) for a in argv], "log": str(log), "out": str(out), "kill_write": kill_write,
               "kill_step": kill_step, "kill_item": kill_item}
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        self.reply()  # {"pid": ...}
        return self.reply()["status"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def epoch_of(path: Path):
    if not path.is_file():
        return None
    if path.suffix == ".json":
        return json.loads(path.read_text())["epoch"]
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def temps(out: Path, name: str) -> list:
    return [p.name for p in out.glob(f".{name}.*.tmp")]


def planned_writes(out: Path, improving: set) -> list:
    """The atomic writes, in order, that the next process on `out` makes: (file, epoch or 'repair')."""
    last = epoch_of(out / "last.pt") or 0
    writes = []
    if last and max(e for e in improving if e <= last) == last:  # best.pt and metrics.json may lag last.pt
        writes += [(name, "repair") for name in ("best.pt", "metrics.json") if epoch_of(out / name) != last]
    writes.append(("config.yaml", 0))
    for epoch in range(last + 1, EPOCHS + 1):
        writes.append(("last.pt", epoch))
        if epoch in improving:
            writes += [("best.pt", epoch), ("metrics.json", epoch)]
    return writes


def assert_same(a, b, where="checkpoint"):
    """Equal values, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load_for_comparison(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["config"].pop("out")  # NOTE: the only difference allowed: the two runs live in different folders
    return checkpoint


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory):
    from data_tools.make_synthetic import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("faults") / "data", people=30, seed=1, eval_people=8,
                          size=(64, 80), progress=False, workers=1)


@pytest.mark.slow
def test_kills_at_any_moment_lose_nothing(fault_data, tmp_path):
    cache, ref, out = tmp_path / "cache", tmp_path / "reference", tmp_path / "killed"
    runner = Runner()  # NOTE: imports while the reference run trains
    try:
        reference = subprocess.run([sys.executable, "train_multitask.py", *flags(fault_data, cache, ref)], cwd=ROOT,
                                   env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        assert reference.returncode == 0, reference.stderr[-3000:]
        improving = {int(m) for m in re.findall(r"^epoch (\d+)/\d+ .*\*best$", reference.stdout, re.M)}
        assert 1 in improving and len(improving) >= 2, reference.stdout
        # NOTE: the photos an epoch reads: full training batches (the last partial one is dropped), then validation
        val_photos = int(re.search(r" (\d+) val photos", reference.stdout).group(1))
        photos_per_epoch = STEPS_PER_EPOCH * 32 + val_photos
        assert runner.reply()["ready"]

        rng = random.Random(SEED)
        plan = [("config.yaml", "before"), ("last.pt", "before"), ("last.pt", "after"),
                ("best.pt", "before"), ("best.pt", "after"), ("metrics.json", "before"), ("metrics.json", "after"),
                "step", ("best.pt", "before"), ("metrics.json", "before"), "photo", ("last.pt", "before"),
                "step", ("last.pt", "after"), "photo", ("metrics.json", "after"), "photo"]
        kills, hit, logs, finished = 0, set(), [], False

        def start(**kill):
            log = tmp_path / f"process{len(logs)}.log"
            logs.append(log)
            fresh = not (out / "last.pt").exists()
            argv = flags(fault_data, cache, out) if fresh else ["--resume", out / "last.pt", "--no-progress"]
            return runner.run(argv, log, out, **kill), log

        for item in plan:
            if not (out / "last.pt").exists() and out.exists() and any(out.iterdir()):
                held = [p.name for p in out.iterdir() if not p.name.endswith(".tmp")]
                if held:  # killed before its first epoch was written: the same command refuses the folder
                    status, log = start()
                    assert status == 2 and "no last.pt to resume" in log.read_text(), log.read_text()
                    shutil.rmtree(out)
            writes = planned_writes(out, improving)
            left = EPOCHS - (epoch_of(out / "last.pt") or 0)  # NOTE: epochs this process will train
            if item in ("step", "photo") and not left:
                continue  # only the repair writes are left: no step or photo to kill at
            if item == "step":  # NOTE: within the epochs this process trains, so it always lands
                status, log = start(kill_step=rng.randint(1, min(2, left) * STEPS_PER_EPOCH))
                assert status == -signal.SIGKILL, log.read_text()
            elif item == "photo":  # NOTE: within the first epoch this process trains, so it always lands
                status, log = start(kill_item=rng.randint(1, photos_per_epoch))
                assert status == -signal.SIGKILL, log.read_text()
            else:
                name, phase = item
                names = [w[0] for w in writes]
                if name not in names:
                    continue  # no such write left in this run
                nth = names[:names.index(name) + 1].count(name)
                target = writes[names.index(name)]
                before = epoch_of(out / name) if name != "config.yaml" else None
                status, log = start(kill_write=[name, nth, phase])
                assert status == -signal.SIGKILL, log.read_text()
                if phase == "before":  # killed inside the write: its whole temporary file is there, not renamed
                    assert temps(out, name), (item, sorted(p.name for p in out.iterdir()))
                    if name != "config.yaml":
                        assert epoch_of(out / name) == before, item
                elif name != "config.yaml":
                    expected = epoch_of(out / "last.pt") if target[1] == "repair" else target[1]
                    assert epoch_of(out / name) == expected, (item, target)
                hit.add(item)
            if status == -signal.SIGKILL:
                kills += 1
            else:
                assert status == 0, log.read_text()
                finished = True
                break
        if not finished:
            status, log = start()
            assert status == 0, log.read_text()
    finally:
        runner.close()

    print(f"{kills} kills; inside writes: {sorted(hit)}; processes: {len(logs)}")
    assert kills >= 10, kills
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.json"):
        assert {(name, "before"), (name, "after")} - {("config.yaml", "after")} <= hit, (name, hit)
    assert not list(out.glob("*.tmp")), sorted(p.name for p in out.iterdir())  # every killed write's temp removed
    assert_same(load_for_comparison(ref / "last.pt"), load_for_comparison(out / "last.pt"), "last.pt")
    assert_same(load_for_comparison(ref / "best.pt"), load_for_comparison(out / "best.pt"), "best.pt")
    assert (out / "metrics.json").read_text() == (ref / "metrics.json").read_text()
    best = json.loads((out / "metrics.json").read_text())["epoch"]
    assert epoch_of(out / "best.pt") == best == torch.load(out / "last.pt", weights_only=True)["train_state"][
        "best_epoch"]
    for run in (ref, out):
        run_command(__import__("mtl.predict", fromlist=["run"]), "--checkpoint", run / "best.pt", "--data",
                    fault_data, "--out", run / "submission.csv", cache_dir=cache)
    assert (out / "submission.csv").read_bytes() == (ref / "submission.csv").read_bytes()
