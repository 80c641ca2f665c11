"""Shared by the benchmark scripts: machine facts, a results table, and JSON output."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # NOTE: the scripts run from the checkout: python -m bench.NAME
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # NOTE: benchmarks never wait on a download

SHARED = ROOT.parent / "shared"


def machine() -> dict:
    """What the numbers were measured on."""
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip()
    except OSError:
        pass
    return info


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of rows (floats to 3 significant digits)."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(results: dict, path) -> Path:
    """Results + machine + command line, as JSON."""
    from mtl.io import atomic_write_text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(), **results}
    atomic_write_text(json.dumps(payload, indent=2), path)
    return path
