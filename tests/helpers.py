"""Helpers the test modules share (fixtures live in conftest.py)."""
import dataclasses
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: README.md, the root scripts, configs/
SHARED = ROOT.parent / "shared"  # NOTE: beside the checkout: a real weights file and UTKFace photos, where present


def tiny_study_inputs(folder: Path, seed: int, epochs: int) -> tuple[Path, Path]:
    """(data, config) for tune.py tests: 20 synthetic people at 48x64 and a TINY config at 40x52, `epochs` a trial."""
    import yaml

    from data_tools.make_synthetic import make_synthetic
    from tests.conftest import TINY
    data = make_synthetic(folder / "data", people=20, seed=seed, eval_people=2, size=(48, 64), progress=False)
    base = folder / "tiny.yaml"
    base.write_text(yaml.safe_dump({**TINY, "img_size": [40, 52], "log_images": 0, "epochs": epochs}))
    return data, base


def run_command(module, *args, cache_dir=None) -> dict:
    """module.run (predict, pseudo_label, ...) in-process: no import cost, quiet, no worker processes.

    Returns run's result (a Prediction's fields, or the dict run returns) plus the log lines as one text under "log".
    """
    logs = []
    argv = [str(a) for a in args] + ["--workers", "0", "--no-progress"]
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir)]
    result = module.run(module.get_args_parser().parse_args(argv), log=logs.append)
    fields = vars(result) if dataclasses.is_dataclass(result) else result  # predict's Prediction, or a dict
    return {**fields, "log": "\n".join(logs)}


def run_predict(*args, cache_dir=None) -> dict:
    """predict.run in-process (run_command)."""
    from mtl import predict
    return run_command(predict, *args, cache_dir=cache_dir)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (servers the tests start never share one, even under xdist)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
