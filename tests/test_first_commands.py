"""The first commands a new user types: the README's two commands, the demo, and `tensorboard --logdir`."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port


def readme_commands() -> list[str]:
    """The indented command lines of the README's first code block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"\n\n((?:    .+\n)+)", text).group(1)
    return [line.strip() for line in block.splitlines()]


def test_readme_opens_with_the_two_commands_and_ci_lints_then_runs_the_second_verbatim():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install -r requirements.txt") and "demo.py" in commands[0]
    assert commands[1].startswith("pip install -r requirements-dev.txt") and "pytest" in commands[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines
    lint = [i for i, line in enumerate(ci_lines) if line.endswith("ruff check .")]
    assert lint and lint[0] < ci_lines.index(commands[1])  # the linter first: a lint error fails CI in seconds


@pytest.mark.slow
def test_demo_makes_data_trains_predicts_and_says_where_everything_is(tmp_path, monkeypatch):
    from mtl import demo
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mtl.images.DEFAULT_CACHE_DIR", tmp_path / "cache")
    lines = []
    args = demo.get_args_parser().parse_args(["--people", "12", "--epochs", "1", "--workers", "0", "--no-progress"])
    result = demo.run(args, log=lines.append)
    assert (tmp_path / "demo_data" / "train" / "train.csv").is_file()
    assert result["out"] == Path("runs/demo")
    submission = (tmp_path / "runs" / "demo" / "submission.csv").read_text().splitlines()
    info = (tmp_path / "demo_data" / "eval" / "info.csv").read_text().splitlines()
    assert submission[0] == "ImageID,ans" and len(submission) == len(info)
    assert 0.0 <= result["eval_f1"] <= 1.0
    assert lines[-1].startswith("done: submission runs/demo/submission.csv")
    assert "tensorboard --logdir runs" in lines[-1]
    # a second run reuses the data and never writes into the first run's folder
    again = demo.run(args, log=lines.append)
    assert again["out"] == Path("runs/demo-2") and (tmp_path / "runs" / "demo-2" / "best.pt").is_file()


def _get_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_tensorboard_command_serves_the_runs_scalars_and_images(trained_run, tmp_path):
    """The real `tensorboard` command, started as a user would, answers with the run's scalar and image tags."""
    exe = Path(sys.executable).parent / "tensorboard"
    command = [str(exe) if exe.exists() else "tensorboard", "--logdir", trained_run["out"], "--host", "127.0.0.1",
               "--port", str(free_port()), "--reload_interval", "1"]
    port = command[-3]
    log = tmp_path / "tensorboard.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        scalars, images, deadline = {}, {}, time.time() + 300  # a bound on the event: a busy machine is slow
        while time.time() < deadline:
            if server.poll() is not None:
                pytest.fail(f"tensorboard exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                scalars = _get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
                images = _get_json(f"http://127.0.0.1:{port}/data/plugin/images/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if scalars.get(".") and images.get("."):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve the run within 300 s:\n{log.read_text()[-3000:]}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    scalar_tags, image_tags = set(scalars["."]), set(images["."])
    metrics = json.loads((Path(trained_run["out"]) / "metrics.json").read_text())
    assert {"train/loss", "train/lr"} <= scalar_tags
    assert "val/f1_calibrated" in {f"val/{k}" for k in metrics}  # each metric is a curve; the record is not
    assert {f"val/{k}" for k in metrics if k not in ("epoch", "calibration")} <= scalar_tags
    assert {"confusion/mask", "confusion/gender", "confusion/age", "confusion/18_classes",
            "misclassified"} <= image_tags
