"""bench/gpu_check.py in its CPU mode: every stage that makes sense on the CPU passes, so the GPU check never rots.

The stages themselves are the GPU's checks run on the CPU (bf16 autocast, channels_last, the pinned-memory
fallback, predict CPU vs CPU, MTCNN boxes, torchrun and DDP with gloo, the speed runs at tiny sizes); the
watching process is tested too: a stage that raises, overruns its time or does not fit the budget is
recorded as such and the others still run.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from bench import gpu_check, gpu_stages
from tests.helpers import ROOT

SKIPPED_ON_CPU = {"train_fp16", "train_compile"}


def run_check(tmp_path, *args, timeout=900):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else None
    return done, report, out


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    """The whole CPU twin, run once as a user would run it."""
    return run_check(tmp_path_factory.mktemp("gpu_check"))


@pytest.mark.slow
def test_cpu_quick_mode_passes_every_stage(quick_check):
    done, report, out = quick_check
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    stages = report["stages"]
    assert list(stages) == gpu_stages.ORDER
    for name, result in stages.items():
        expected = "skipped" if name in SKIPPED_ON_CPU else "ok"
        assert result["status"] == expected, (name, result.get("summary"), result.get("traceback", "")[-2000:])
    assert all(stages[name]["summary"] for name in SKIPPED_ON_CPU)  # each says why
    markdown = (out / "gpu_check.md").read_text()
    for name in gpu_stages.ORDER:
        assert f"| {name} |" in markdown
    assert "## Architectures" in markdown and "## Our training step" in markdown and "## DataLoader" in markdown


@pytest.mark.slow
def test_cpu_twin_resumes_bitwise_and_compares_predictions(quick_check):
    stages = quick_check[1]["stages"]
    for name in ("train_fp32", "train_bf16"):
        result = stages[name]
        assert result["bitwise"] and result["finite"] and len(result["losses"]) == 4, name
        assert result["losses"][:2] == result["losses"][2:]  # straight run vs stopped + resumed, epoch by epoch
    rows = {(r["amp"], r["tta"]): r for r in stages["predict"]["rows"]}
    assert rows[("off", "none")]["max_prob_diff"] == 0 and rows[("off", "hflip")]["max_prob_diff"] == 0
    assert 0 < rows[("bf16", "none")]["max_prob_diff"] <= gpu_stages.PREDICT_TOL["bf16"]  # autocast did run
    loader = stages["pinned_loader"]["rows"]
    assert [r["workers"] for r in loader] == [0, 2] and not any(r["pinned"] for r in loader)
    assert stages["crop_faces"]["both_found"] > 0 and stages["crop_faces"]["max_shift_px"] == 0
    runs = {r["run"]: r for r in stages["torchrun"]["rows"]}
    assert runs["ddp_one_rank"]["ok"] and runs["ddp_one_rank"]["backend"] == "gloo" and runs["torchrun 1 process"]["ok"]


@pytest.mark.slow
def test_cpu_twin_measures_each_speed(quick_check):
    stages = quick_check[1]["stages"]
    speed = {(r["arch"], r["precision"]): r for r in stages["speed_archs"]["rows"]}
    archs, precisions = ("multihead", "joint18", "separate"), ("fp32", "bf16 + channels_last")
    assert set(speed) == {(a, p) for a in archs for p in precisions}
    assert all(r["train_img_s"] > 0 and r["infer_img_s"] > 0 for r in speed.values())
    steps = {(r["step"], r["precision"]): r for r in stages["train_step"]["rows"]}
    assert set(steps) == {(w, p) for w in ("ours", "timm-style") for p in ("fp32", "bf16")}
    assert all(r["vs_timm"] > 0 for r in steps.values())
    assert stages["train_step"]["model_img_s"] == steps[("ours", "bf16")]["img_s"]
    loader = stages["loader"]["rows"]
    assert {r["augment"] for r in loader} == {"strong", "flip"}
    assert all(r["loader_img_s"] > 0 and r["model_img_s"] == stages["train_step"]["model_img_s"] for r in loader)


def test_a_stage_that_raises_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_stages.STAGES, "boom", gpu_stages.Stage("boom", boom, "raises", max_s=30, min_s=0))
    monkeypatch.setitem(gpu_stages.STAGES, "after", gpu_stages.Stage(
        "after", lambda ctx: {"ok": True, "summary": f"ran on {ctx.device}"}, "runs", max_s=30, min_s=0))
    args = gpu_check.get_args_parser().parse_args(
        ["--device", "cpu", "--quick", "--runner", "--stages", "boom,after", "--deadline", str(time.time() + 60),
         "--work", str(tmp_path)])
    assert gpu_check.runner(args) == 0
    records = gpu_stages.read_records(tmp_path / "records.jsonl")
    assert records["boom"]["status"] == "error" and "illegal memory access" in records["boom"]["summary"]
    assert "RuntimeError" in records["boom"]["traceback"]
    assert records["after"]["status"] == "ok" and records["after"]["summary"] == "ran on cpu"


@pytest.mark.slow
def test_an_overrunning_stage_is_stopped_and_the_next_still_runs(tmp_path):
    done, report, out = run_check(tmp_path, "--only", "environment", "pinned_loader", "--limit", "environment=0",
                                  "--grace", "0", timeout=600)
    assert done.returncode == 1  # not everything passed
    stages = report["stages"]
    assert stages["environment"]["status"] == "timeout" and "stopped" in stages["environment"]["summary"]
    assert stages["pinned_loader"]["status"] == "ok"
    assert "| environment | timeout |" in (out / "gpu_check.md").read_text()


def test_stages_the_budget_cannot_fit_are_skipped(tmp_path):
    done, report, _ = run_check(tmp_path, "--only", "pinned_loader", "train_fp32", "--budget", "1", "--grace", "0",
                                timeout=600)
    assert done.returncode == 0
    assert {r["status"] for r in report["stages"].values()} == {"skipped"}
    assert all("out of budget" in r["summary"] for r in report["stages"].values())


@pytest.mark.parametrize("args, message", [
    (["--only", "nonsense"], "--only: unknown stage(s) nonsense"),
    (["--limit", "predict=soon"], "--limit takes STAGE=SECONDS"),
    (["--budget", "-5"], "--budget must be positive"),
    (["--device", "tpu"], "--device must be cuda, cuda:N or cpu"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_asking_for_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr and "--device cpu --quick" in done.stderr
