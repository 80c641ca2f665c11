"""Fault injection for the decoded-image cache: whatever happens to it between runs (pixels.u8 truncated or
deleted, index.json corrupted, deleted or truncated, rows swapped, a zero-filled tail, a SIGKILL while it fills),
the next run's predictions and the photos a FaceDataset serves are identical to those from a fresh cache.

Run alone with `python -m pytest -m faults`.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mtl import predict
from mtl.dataset import DataSpec, FaceDataset, load_fold
from mtl.images import ImageCache
from mtl.transforms import eval_transform, make_preprocess
from tests.conftest import TINY
from tests.helpers import ROOT, run_command

pytestmark = pytest.mark.faults

SIZE = tuple(TINY["img_size"])  # the checkpoint's load size: training and prediction share one cache


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small data set, a checkpoint trained on it for one epoch, and what a fresh cache gives."""
    from data_tools.make_synthetic import make_synthetic
    from mtl import config
    from mtl.train import train
    base = tmp_path_factory.mktemp("cache_faults")
    data = make_synthetic(base / "data", people=20, seed=5, eval_people=5, size=(96, 128), progress=False)
    cfg = config.build({**TINY, "epochs": 1, "log_images": 0, "data": str(data), "cache_dir": str(base / "train_cache"),
                        "out": str(base / "run")})
    checkpoint = Path(train(cfg, log=lambda *_: None).out) / "best.pt"
    world = {"base": base, "data": data, "checkpoint": checkpoint}
    world["fresh"] = observe(world, base / "fresh")
    assert world["fresh"]["notes"] == []
    return world


def observe(world, cache_dir) -> dict:
    """What a run sees through this cache: every photo a FaceDataset of fold 0 serves, and predict's answers."""
    notes = []
    fold = load_fold(DataSpec(world["data"]), SIZE, cache_dir=cache_dir, workers=0, progress=False, log=notes.append)
    pixels = [FaceDataset(s, images, eval_transform(make_preprocess(SIZE))).pixels(i)
              for s, images in ((fold.train_samples, fold.train_images), (fold.val_samples, fold.val_images))
              for i in range(len(s))]
    out = world["base"] / "sub.csv"
    result = run_command(predict, "--checkpoint", world["checkpoint"], "--data", world["data"], "--out", out,
                         cache_dir=cache_dir)
    notes += [line for line in result["log"].splitlines() if line.startswith("image cache")]
    return {"pixels": np.stack(pixels), "probs": result["member_probs"][0], "submission": out.read_bytes(),
            "notes": notes}


def assert_same_as_fresh(world, seen):
    fresh = world["fresh"]
    assert np.array_equal(seen["pixels"], fresh["pixels"])
    assert seen["probs"].keys() == fresh["probs"].keys()
    for key in fresh["probs"]:
        assert np.array_equal(seen["probs"][key], fresh["probs"][key]), key
    assert seen["submission"] == fresh["submission"]


def cut(path, keep):
    os.truncate(path, keep)


def zero_tail(pixels):
    """What the old code left: the file truncated, then grown back with zeros under an index that calls it done."""
    size = pixels.stat().st_size
    os.truncate(pixels, size // 3)
    os.truncate(pixels, size)


def swap_rows(index_file):
    index = json.loads(index_file.read_text())
    a, b = list(index["entries"].values())[:2]
    a[0], b[0] = b[0], a[0]
    index_file.write_text(json.dumps(index))


def garble(index_file):
    text = bytearray(index_file.read_bytes())
    text[len(text) // 2: len(text) // 2 + 40] = os.urandom(40)
    index_file.write_bytes(bytes(text))


FAULTS = {  # fault: (what it does to the cache folder, a word the run's note must hold)
    "pixels truncated mid-row": (lambda d: cut(d / "pixels.u8", (d / "pixels.u8").stat().st_size * 2 // 5 + 13),
                                 "truncated"),
    "pixels truncated to nothing": (lambda d: cut(d / "pixels.u8", 0), "truncated"),
    "pixels deleted": (lambda d: (d / "pixels.u8").unlink(), "truncated"),
    "pixels zero-filled tail": (lambda d: zero_tail(d / "pixels.u8"), "checksum"),
    "index corrupted": (lambda d: garble(d / "index.json"), "rebuilding"),
    "index deleted": (lambda d: (d / "index.json").unlink(), "rebuilding"),
    "index truncated": (lambda d: cut(d / "index.json", (d / "index.json").stat().st_size // 2), "rebuilding"),
    "index rows swapped": (lambda d: swap_rows(d / "index.json"), "checksum"),
    "index of another format": (lambda d: (d / "index.json").write_text(json.dumps(
        {**json.loads((d / "index.json").read_text()), "format": 1})), "rebuilding"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_cache_gives_what_a_fresh_one_gives(world, tmp_path, fault):
    damage, word = FAULTS[fault]
    cache = tmp_path / "cache"
    observe(world, cache)
    damage(cache / f"{SIZE[0]}x{SIZE[1]}")
    seen = observe(world, cache)
    assert_same_as_fresh(world, seen)
    assert any(word in note for note in seen["notes"]), seen["notes"]  # and the run said what it repaired
    assert observe(world, cache)["notes"] == []  # repaired for good: the next run finds nothing to fix


KILLER = textwrap.dedent("""
    import os, signal, sys
    from mtl import images
    cache_dir, paths_file, when = sys.argv[1:4]
    real, calls = images.read_photo, [0]

    def read_then_die(path, size=None):  # SIGKILL once `when` photos have been decoded into their rows
        if calls[0] == int(when):
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        return real(path, size)

    def die(*_):  # SIGKILL after every row is written, just before the index that names them
        os.kill(os.getpid(), signal.SIGKILL)

    if when == "index":
        images.ImageCache._write_index = die
    else:
        images.read_photo = read_then_die
    images.ImageCache(cache_dir, ({w}, {h})).ensure(open(paths_file).read().splitlines(), workers=1, progress=False)
    """).format(w=SIZE[0], h=SIZE[1])


def fill_and_kill(cache, paths_file, when):
    done = subprocess.run([sys.executable, "-c", KILLER, str(cache), str(paths_file), str(when)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr  # killed, mid-fill


@pytest.mark.slow
def test_sigkill_while_the_cache_fills_loses_nothing(world, tmp_path):
    from mtl import data
    samples, _ = data.train_samples(world["data"])
    _, eval_table = data.eval_samples(world["data"])
    paths = list(samples["image_path"]) + list(eval_table["image_path"])
    paths_file = tmp_path / "paths.txt"
    paths_file.write_text("\n".join(paths))
    cache = tmp_path / "cache"
    folder = cache / f"{SIZE[0]}x{SIZE[1]}"
    # a first fill killed at once, then fills that get further each time, then one killed before its index
    for when in (0, 1, len(paths) // 3, len(paths) - 1, "index"):
        fill_and_kill(cache, paths_file, when)
        assert (folder / "pixels.u8").is_file()
    assert_same_as_fresh(world, observe(world, cache))
    # rows rewritten in place (every photo touched, so stale) and killed half-way: the old index still names them
    for path in paths:
        os.utime(path)
    fill_and_kill(cache, paths_file, len(paths) // 2)
    assert_same_as_fresh(world, observe(world, cache))
    rows = json.loads((folder / "index.json").read_text())["rows"]
    assert rows == len(paths) and (folder / "pixels.u8").stat().st_size == rows * ImageCache(cache, SIZE).row_bytes
