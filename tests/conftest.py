"""Shared fixtures: one small synthetic data set and one short training run per test session.

The tests never download weights (HF_HUB_OFFLINE) and never touch ~/.cache (each session gets its
own decoded-image cache folder, one per pytest-xdist worker). The data set and the trained run are
built once per session even with several workers (`built_once`), and only read by the tests.
"""
import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # NOTE: before timm / huggingface_hub are imported
# NOTE: tiny models run fastest on one thread; two threads on a busy 2-core machine were 20x slower. Each
# pytest-xdist worker (pytest.ini: -n 2) imports this file before torch, so two workers use one core each
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

# NOTE: configs/default.yaml is the base of every config; TINY also pins what its real-data values would change in
# the tests' meaning and cost: no age regression, plain losses, no early stopping, 10 epochs unless a test says
TINY = {"model": "test_efficientnet", "pretrained": False, "img_size": [40, 52], "augment": "flip",
        "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.2, "workers": 0, "progress": False, "drop_path_rate": 0.0,
        "head_dropout": 0.0, "log_images": 8, "folds": 5, "fold": 0, "epochs": 10, "patience": 0,
        "age_reg_weight": 0.0, "losses": {"mask": {"name": "ce"}, "gender": {"name": "bce"}, "age": {"name": "ce"}}}
SYNTHETIC_SIZE = (96, 128)
# what the shared trained run changes in TINY: enough optimizer steps for a tiny CNN to learn (~1 minute)
LEARNING = {"model": "test_resnet", "img_size": [48, 64], "batch_size": 16, "epochs": 20, "age_reg_weight": 0.1}


def built_once(tmp_path_factory, name, build):
    """build(folder) -> JSON-able value, run once per test session: with pytest-xdist the first worker to ask
    builds it under a lock in the folder all workers share, the others wait and read its value back."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # NOTE: xdist gives each worker a subfolder of this one
    record = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not record.is_file():
            folder = shared / name
            folder.mkdir()
            record.write_text(json.dumps(build(folder), default=float))  # NOTE: numpy floats as floats
        return json.loads(record.read_text())


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A synthetic data set in the competition layout: 120 train people, 30 eval people, 96x128 photos."""
    from data_tools.make_synthetic import make_synthetic

    def build(folder):
        make_synthetic(folder / "data", people=120, seed=0, eval_people=30, size=SYNTHETIC_SIZE, progress=False,
                       workers=2)
        return str(folder / "data")
    return Path(built_once(tmp_path_factory, "synthetic", build))


@pytest.fixture
def tiny_config(synthetic_data, cache_dir, tmp_path):
    """Build a TrainConfig for a tiny CPU run on the synthetic data: tiny_config(epochs=2, arch='joint18')."""
    from mtl import config

    def make(**overrides):
        values = {**TINY, "data": str(synthetic_data), "cache_dir": str(cache_dir), "out": str(tmp_path / "run"),
                  **overrides}
        return config.build(values)
    return make


@pytest.fixture(scope="session")
def trained_run(synthetic_data, cache_dir, tmp_path_factory):
    """One short multi-head training run (with age regression), shared by the tests that need a trained model."""
    from mtl import config
    from mtl.train import train

    def build(folder):
        cfg = config.build({**TINY, **LEARNING, "data": str(synthetic_data), "cache_dir": str(cache_dir),
                            "out": str(folder / "run")})
        return dataclasses.asdict(train(cfg, log=lambda *_: None))
    return built_once(tmp_path_factory, "trained", build)


@pytest.fixture(scope="session")
def ckpts(trained_run):
    """(best.pt, last.pt) of the shared trained run."""
    out = Path(trained_run["out"])
    return out / "best.pt", out / "last.pt"


def pytest_collection_modifyitems(items):
    """Every test that needs the shared trained run is slow: the run alone takes over a minute on 2 cores."""
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
