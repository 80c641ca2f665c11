"""Helpers the test modules share (fixtures live in conftest.py)."""
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: README.md, the root scripts, configs/
SHARED = ROOT.parent / "shared"  # NOTE: beside the checkout: a real weights file and UTKFace photos, where present


def run_command(module, *args, cache_dir=None) -> dict:
    """module.run (predict, pseudo_label, ...) in-process: no import cost, quiet, no worker processes.

    Returns run's result plus the log lines as one text under "log".
    """
    logs = []
    argv = [str(a) for a in args] + ["--workers", "0", "--no-progress"]
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir)]
    result = module.run(module.get_args_parser().parse_args(argv), log=logs.append)
    return {**result, "log": "\n".join(logs)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (servers the tests start never share one, even under xdist)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
