#!/usr/bin/env python3
"""The GPU check: every CUDA path of the pipeline run once, and the speeds that matter, in one command.

Run it first on any machine with a GPU. In under 8 minutes it trains, resumes and predicts on a tiny
synthetic data set in fp32, fp16 (grad scaler) and bf16, each with channels_last, and once with
--compile; compares CUDA with the CPU (predictions of one checkpoint, MTCNN face boxes); runs
torchrun and a DDP step; checks the pinned-memory path of the batch ring; and, at the real size
(efficientnet_b3, 240x320, batch 64), times the three architectures in fp32 and AMP, our training
step against a timm benchmark.py-style step of the same trunk, and the DataLoader (decoded-image
cache, 4 and 8 workers) against the model. Nothing is downloaded (random weights).

Stages run in order in a worker process that this one watches: a stage that fails is recorded with
its error (after a failure on CUDA the next stage gets a fresh process), one that overruns its time
is stopped, and the rest still run; no stage starts that the budget cannot fit. Results go to
gpu_check.json and gpu_check.md in --out, rewritten after every stage, so a kill keeps what was done.
BENCHMARKS.md ("GPU check") has the one-line command for a bare GPU machine and what each row means.

    python -m bench.gpu_check                              # on a GPU: everything, under 8 minutes
    python -m bench.gpu_check --device cpu --quick         # the CPU twin (tests/test_gpu_check.py)
    python -m bench.gpu_check --only predict crop_faces --out /tmp/check
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import ROOT, table
from bench.gpu_stages import ORDER, STAGES, Context, Stage, append_record, cuda_peak_reset, read_records, say
from mtl.cli import main_guard
from mtl.errors import ConfigError
from mtl.io import atomic_write_text

GRACE_S = 15  # a stage past its time gets this long to return before its process is killed


# ---------------------------------------------------------------- the worker process
def run_stage(ctx, stage: Stage) -> dict:
    """One stage: its result with status ok / FAIL, or error with the exception; never raises."""
    t0 = time.time()
    ctx.stage_end = min(t0 + stage.max_s, ctx.deadline)
    cuda_peak_reset(ctx)
    ctx.stage_peak = 0
    try:
        result = stage.fn(ctx, **stage.kwargs)
        result["status"] = "ok" if result.pop("ok") else "FAIL"
    except Exception as exc:  # noqa: BLE001 - any failure is this stage's result, the next stages still run
        lines = traceback.format_exception(exc)
        result = {"status": "error", "summary": f"{type(exc).__name__}: {str(exc).strip()[:400]}",
                  "traceback": "".join(lines)[-4000:]}
    result["seconds"] = time.time() - t0
    with contextlib.suppress(Exception):  # NOTE: after a CUDA error even this may fail
        cuda_peak_reset(ctx)
        result["gpu_peak_mb"] = ctx.stage_peak / 2**20 if ctx.cuda else None
    return result


def runner(args):
    """The worker process: run the given stages in order, each recorded in records.jsonl as it starts and ends."""
    records = Path(args.work) / "records.jsonl"
    ctx = Context(args, args.deadline)
    for name in args.stages.split(","):
        stage = STAGES[name]
        left = args.deadline - time.time()
        if left < stage.min_s:
            result = {"status": "skipped", "summary": f"out of budget ({left:.0f} s left, needs {stage.min_s:g})"}
            append_record(records, {"event": "end", "stage": name, "result": result})
            continue
        kill_at = min(time.time() + stage.max_s, args.deadline) + args.grace
        append_record(records, {"event": "start", "stage": name, "t": time.time(), "kill_at": kill_at})
        say(f"{name}: {stage.what} ...")
        result = run_stage(ctx, stage)
        append_record(records, {"event": "end", "stage": name, "result": result})
        say(f"{name}: {result['status']} in {result['seconds']:.0f} s - {result['summary']}")
        if result["status"] == "error" and ctx.cuda:
            return 3  # NOTE: a CUDA error can leave the context unusable: the next stage gets a fresh process
    return 0


# ---------------------------------------------------------------- the watching process
def plan(args) -> list[tuple[str, str]]:
    """[(stage, reason it is left out or '')] in run order."""
    unknown = sorted(set(args.only or []) - set(STAGES))
    if unknown:
        raise ConfigError(f"--only: unknown stage(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    out = []
    for name in ORDER:
        if args.only and name not in args.only:
            continue
        reason = STAGES[name].quick_skip if (args.quick and args.device == "cpu") else ""
        out.append((name, reason))
    return out


def supervise(names, records, deadline, command_for, poll_s=0.25, on_change=None, split_groups=True) -> dict:
    """Run the stages through worker processes; returns {stage: result}. A stage past its kill time is stopped
    (its process group killed) and the next stage gets a new worker; so does the next stage after a worker died.
    With split_groups, each group of stages gets its own worker."""
    results = {}
    pending = list(names)
    while pending:
        left = deadline - time.time()
        if left < STAGES[pending[0]].min_s:  # NOTE: no worker is started just to skip a stage
            name = pending.pop(0)
            results[name] = {"status": "skipped", "summary": f"out of budget ({max(left, 0):.0f} s left, needs "
                                                             f"{STAGES[name].min_s:g})"}
            continue
        group = STAGES[pending[0]].group
        batch = []
        for name in pending:
            if split_groups and STAGES[name].group != group:
                break
            batch.append(name)
        command, env = command_for(batch, group)
        proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
        seen = {}
        try:
            while True:
                rc = proc.poll()
                now_seen = read_records(records)
                if now_seen != seen:
                    seen = now_seen
                    if on_change:
                        on_change({**results, **{k: v for k, v in seen.items() if k in batch}})
                running = [k for k in batch if seen.get(k, {}).get("status") == "running"]
                if rc is not None:
                    break
                if running and time.time() > seen[running[0]]["kill_at"]:
                    _kill(proc)
                    rc = "killed"
                    break
                time.sleep(poll_s)
        except BaseException:
            _kill(proc)
            raise
        seen = read_records(records)
        for name in batch:
            result = seen.get(name)
            if result is None:
                continue
            if result.get("status") == "running":
                why = (f"stopped: past its {STAGES[name].max_s:g} s (or the budget)" if rc == "killed"
                       else f"its worker process died (exit {rc})")
                result = {"status": "timeout" if rc == "killed" else "error", "summary": why,
                          "seconds": time.time() - result["started"]}
            results[name] = result
        if not any(name in results for name in batch):  # NOTE: the worker died before any stage began
            results[batch[0]] = {"status": "error", "summary": f"the worker process exited ({rc}) before the stage "
                                                               f"began; see the output above"}
        pending = [n for n in pending if n not in results]
        if on_change:
            on_change(results)
    return results


def _kill(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _cells(rows):
    """Rows for a Markdown table: None shows as '-'."""
    return [{k: "-" if v is None else v for k, v in row.items()} for row in rows]


def markdown(payload) -> str:
    """gpu_check.md: one row per stage, then the tables of the stages that have one."""
    env = payload["stages"].get("environment", {})
    where = env.get("gpu") or "CPU"
    lines = [f"# GPU check: {where}", "",
             f"`{payload['command']}` on {payload['date']}, git {payload['git']}: torch {env.get('torch', '?')}, "
             f"CUDA build {env.get('cuda_build', '-')}, cuDNN {env.get('cudnn', '-')}, budget "
             f"{payload['budget_s']:g} s, wall {payload['wall_s']:.0f} s. Verdict: {payload['verdict']}.", ""]
    rows = []
    for name, reason in payload["plan"]:
        result = payload["stages"].get(name, {"status": "not run", "summary": reason})
        rows.append({"stage": name, "status": result.get("status"), "checks": STAGES[name].what,
                     "result": str(result.get("summary", "")).replace("|", "/"),
                     "s": result.get("seconds", ""), "GPU peak MiB": result.get("gpu_peak_mb") or ""})
    lines.append(table(rows, ["stage", "status", "checks", "result", "s", "GPU peak MiB"]))
    for name, _ in payload["plan"]:
        extra = payload["stages"].get(name, {}).get("table")
        if extra:
            lines += ["", f"## {extra['title']}", "", table(_cells(extra["rows"]), extra["columns"])]
    errors = [(n, r) for n, r in payload["stages"].items() if r.get("traceback")]
    for name, result in errors:
        lines += ["", f"## {name}: traceback", "", "```", result["traceback"].strip()[-2500:], "```"]
    return "\n".join(lines) + "\n"


def write_outputs(args, planned, results, t0) -> dict:
    counts = {}
    for name, reason in planned:
        status = results.get(name, {}).get("status", "skipped" if reason else "not run")
        counts[status] = counts.get(status, 0) + 1
    verdict = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    stages = {name: (results.get(name) or ({"status": "skipped", "summary": reason} if reason else
                                           {"status": "not run"})) for name, reason in planned}
    payload = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
               "git": git.strip(), "device": args.device, "quick": args.quick, "budget_s": args.budget,
               "wall_s": time.time() - t0, "verdict": verdict, "counts": counts, "plan": planned, "stages": stages}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(payload, indent=2, default=str), out / "gpu_check.json")
    atomic_write_text(markdown(payload), out / "gpu_check.md")
    return payload


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (the CPU twin's mode)")
    parser.add_argument("--budget", type=float, help="seconds for the whole check (default 470; 900 with --quick)")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help=f"run these stages only: {', '.join(ORDER)}")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu_check.json and .md")
    parser.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder (checkpoints, crops)")
    parser.add_argument("--faces", help="folder of face photos (.jpg) for crop_faces (default: .whl/faces or "
                                        "../shared/data/utkface-dev where present)")
    parser.add_argument("--real-model", help="trunk of the speed stages (default efficientnet_b3)")
    parser.add_argument("--real-size", type=int, nargs=2, metavar=("W", "H"), help="image size of the speed stages")
    parser.add_argument("--real-batch", type=int, help="batch of the speed stages (default 64)")
    parser.add_argument("--limit", nargs="+", default=[], metavar="STAGE=S", help="override a stage's time limit")
    parser.add_argument("--grace", type=float, default=GRACE_S, help=argparse.SUPPRESS)
    parser.add_argument("--runner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stages", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser


def apply_limits(args):
    """The stages' time limits: three times the GPU's on the CPU, or what --limit STAGE=SECONDS says."""
    if args.device == "cpu":
        for stage in STAGES.values():
            stage.max_s *= 3  # NOTE: a shared 2-core machine, not a GPU, sets the pace
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in STAGES or not seconds.replace(".", "", 1).isdigit():
            raise ConfigError(f"--limit takes STAGE=SECONDS with a stage of {', '.join(ORDER)}, got {item!r}")
        STAGES[name].max_s = float(seconds)


def check_args(args):
    """One line for a flag that cannot work, before anything runs."""
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ConfigError(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA GPU here; run `python -m bench.gpu_check "
                              f"--device cpu --quick` for the CPU twin")
    apply_limits(args)
    if args.budget is None:
        args.budget = 900.0 if args.quick else 470.0
    if args.budget <= 0:
        raise ConfigError(f"--budget must be positive, got {args.budget}")


def main():
    args = get_args_parser().parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.runner:
        apply_limits(args)
        return runner(args)
    check_args(args)
    t0 = time.time()
    planned = plan(args)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mtl-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    records = work / "records.jsonl"
    records.unlink(missing_ok=True)
    deadline = t0 + args.budget - args.grace
    say(f"{len(planned)} stages on {args.device}, budget {args.budget:.0f} s, work {work}, results in {args.out}")
    argv = sys.argv[1:]

    def command_for(batch, group):
        """The worker's command line and environment: the correctness stages get cuBLAS's deterministic workspace."""
        command = [sys.executable, "-m", "bench.gpu_check", *argv, "--runner", "--stages", ",".join(batch),
                   "--deadline", repr(deadline), "--work", str(work), "--grace", str(args.grace)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if group == "check":
            env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # NOTE: read when cuBLAS starts: set before
        return command, env

    results = {name: {"status": "skipped", "summary": reason} for name, reason in planned if reason}
    names = [name for name, reason in planned if not reason]

    def on_change(partial):
        write_outputs(args, planned, {**results, **partial}, t0)

    try:
        # NOTE: on the CPU the groups need no environment of their own: one worker saves an import of torch
        results.update(supervise(names, records, deadline, command_for, on_change=on_change,
                                 split_groups=args.device != "cpu"))
    except KeyboardInterrupt:
        payload = write_outputs(args, planned, {**results, **read_records(records)}, t0)
        say(f"interrupted; what was done is in {Path(args.out) / 'gpu_check.md'}")
        return 130
    payload = write_outputs(args, planned, results, t0)
    print()
    print(markdown(payload))
    say(f"{payload['verdict']} in {payload['wall_s']:.0f} s; written {Path(args.out) / 'gpu_check.json'} and .md")
    if not args.work and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    bad = {k: v for k, v in payload["counts"].items() if k not in ("ok", "skipped")}
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
